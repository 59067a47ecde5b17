"""The DenseNet memory model, checked against torch's CPU allocator events (profiler)."""

from __future__ import annotations

import pytest

from sentinel.gpu.memory import (
    estimate,
    format_bytes,
    max_batch_that_fits,
    normalize_dtype,
    parse_bytes,
    relative_error,
    weights_bytes,
)
from sentinel.reference.densenet import ARCHS

TOLERANCE = 0.10  # the bar; the model is in fact within about 1% (see benchmarks/memory_bench.py)

# Small resolutions keep each measured step well under a second on two shared cores.
VALIDATION = [("densenet121", 64), ("densenet_digits", 32)]
BATCHES = (1, 2, 4)
MODES = [("inference", False, False), ("training", True, False), ("training-memory-efficient", True, True)]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: fixes the CPU conv backend choice the estimate models, and is fast."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(one_thread):
    """One DenseNet per (arch, memory_efficient), reused across batch sizes."""
    import torch

    from sentinel.reference.densenet import DenseNet

    cache: dict[tuple[str, bool], object] = {}

    def get(arch: str, me: bool):
        if (arch, me) not in cache:
            torch.manual_seed(0)
            cache[(arch, me)] = DenseNet(ARCHS[arch], memory_efficient=me)
        return cache[(arch, me)]

    return get


@pytest.mark.parametrize("mode,training,me", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("arch,res", VALIDATION, ids=[a for a, _ in VALIDATION])
def test_estimate_matches_cpu_allocations_within_10_percent(models, arch, res, mode, training, me):
    from sentinel.gpu.measure import measure_cpu

    cfg = ARCHS[arch]
    for batch in BATCHES:
        measured = measure_cpu(cfg, batch=batch, resolution=res, training=training, memory_efficient=me,
                               model=models(arch, me))
        est = estimate(cfg, batch=batch, resolution=res, training=training, memory_efficient=me,
                       backend="cpu", threads=1)
        err = relative_error(est.activation_peak_bytes, measured.peak_bytes)
        assert abs(err) <= TOLERANCE, (
            f"{arch} {mode} batch {batch} {res}px: predicted {est.activation_peak_bytes} B, "
            f"measured {measured.peak_bytes} B ({err:+.1%}), peak predicted in {est.peak_at}")


@pytest.mark.parametrize("arch,params", [("densenet121", 7_978_856), ("densenet161", 28_681_000),
                                         ("densenet169", 14_149_480), ("densenet201", 20_013_928)])
def test_parameter_counts_match_torchvision(arch, params):
    assert weights_bytes(ARCHS[arch])[0] == params


def test_weights_bytes_match_the_state_dict(one_thread):
    from sentinel.reference.densenet import build_densenet

    for arch in ("densenet121", "densenet_digits"):
        sd = build_densenet(arch).state_dict()
        assert weights_bytes(ARCHS[arch])[1] == sum(t.numel() * t.element_size() for t in sd.values())


def test_inference_peak_is_inside_the_widest_dense_layer():
    e = estimate(ARCHS["densenet121"], batch=1, resolution=224)
    # Block 1 at 56×56: the last layer holds the block input and five outputs (224 channels),
    # their concatenation, its BatchNorm output and the 128-channel bottleneck.
    assert e.peak_at == "denseblock1.denselayer6.conv1"
    assert e.activation_peak_bytes == (224 + 224 + 224 + 128) * 56 * 56 * 4


def test_batch_scales_linearly_and_fp16_halves_activations():
    cfg = ARCHS["densenet121"]
    one = estimate(cfg, batch=1, resolution=224)
    assert estimate(cfg, batch=8, resolution=224).activation_peak_bytes == 8 * one.activation_peak_bytes
    half = estimate(cfg, batch=8, resolution=224, dtype="fp16")
    assert half.activation_peak_bytes * 2 == estimate(cfg, batch=8, resolution=224).activation_peak_bytes
    assert half.weights_bytes < one.weights_bytes


def test_training_needs_far_more_and_checkpointing_cuts_it():
    cfg = ARCHS["densenet121"]
    inf = estimate(cfg, batch=32, resolution=224)
    train = estimate(cfg, batch=32, resolution=224, training=True)
    me = estimate(cfg, batch=32, resolution=224, training=True, memory_efficient=True)
    assert train.activation_peak_bytes > 10 * inf.activation_peak_bytes
    assert me.activation_peak_bytes < 0.6 * train.activation_peak_bytes
    assert me.memory_efficient and not estimate(cfg, batch=1, resolution=224, memory_efficient=True).memory_efficient


def test_max_batch_that_fits_is_the_boundary():
    cfg = ARCHS["densenet121"]
    budget = parse_bytes("16GiB")
    b = max_batch_that_fits(cfg, budget, resolution=224, dtype="fp16", training=True)
    assert b > 1
    need = lambda n: estimate(cfg, batch=n, resolution=224, dtype="fp16", training=True).total_bytes  # noqa: E731
    assert need(b) <= budget < need(b + 1)
    assert max_batch_that_fits(cfg, 1000, resolution=224) == 0


@pytest.mark.parametrize("text,n", [("16GiB", 16 << 30), ("16G", 16_000_000_000), ("800MiB", 800 << 20),
                                    ("1.5TiB", int(1.5 * (1 << 40))), ("800MB", 800_000_000), ("1024", 1024)])
def test_parse_bytes(text, n):
    assert parse_bytes(text) == n


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="cannot read 'lots'"):
        parse_bytes("lots")
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        normalize_dtype("int8")
    with pytest.raises(ValueError, match="batch must be at least 1"):
        estimate(ARCHS["densenet121"], batch=0, resolution=224)
    with pytest.raises(ValueError, match="too small"):
        estimate(ARCHS["densenet121"], batch=1, resolution=16)
    assert normalize_dtype("float16") == "fp16"
    assert format_bytes(1536) == "1.50 KiB"
