"""The reference DenseNet matches torchvision's names, shapes and counts, and loads weights safely."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from testpaths import TEST_DATA

from sentinel.errors import UsageError, WeightsError
from sentinel.reference import (
    build_densenet,
    count_parameters,
    load_weights,
    remap_legacy_keys,
    save_weights,
)

TV = json.loads((TEST_DATA / "torchvision_densenet_state_dicts.json").read_text())
ARCHS = ["densenet121", "densenet161", "densenet169", "densenet201"]
ANCHOR_PARAMS = {"densenet121": 7_978_856, "densenet161": 28_681_000,
                 "densenet169": 14_149_480, "densenet201": 20_013_928}


@pytest.mark.parametrize("arch", ARCHS)
def test_names_shapes_and_counts_equal_torchvision(arch):
    model = build_densenet(arch)
    state = model.state_dict()
    expected = TV[arch]["keys"]
    assert list(state) == list(expected)  # same names, same order
    for k, shape in expected.items():
        assert list(state[k].shape) == shape, k
    assert count_parameters(model) == ANCHOR_PARAMS[arch] == TV[arch]["params"]


def test_embed_width_and_forward_shapes():
    m = build_densenet("densenet121").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        emb = m.embed(x)
        logits = m(x)
        from_emb = m.classifier(emb)
    assert emb.shape == (2, 1024)
    assert logits.shape == (2, 1000)
    torch.testing.assert_close(from_emb, logits)


def test_small_variant_options():
    m = build_densenet({"growth_rate": 8, "block_config": [2, 2], "num_init_features": 16,
                        "small_inputs": True}, num_classes=7, in_channels=1)
    assert "pool0" not in dict(m.features.named_children())
    assert m.features.conv0.kernel_size == (3, 3)
    out = m.eval()(torch.randn(3, 1, 16, 16))
    assert out.shape == (3, 7)
    assert m.embedding_width == m.config.feature_width


def test_unknown_arch_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown architecture 'densenet999'.*densenet121"):
        build_densenet("densenet999")


def _tiny():
    return build_densenet({"growth_rate": 4, "block_config": [2, 2], "num_init_features": 8,
                           "small_inputs": True}, num_classes=3, in_channels=1)


def test_safetensors_round_trip(tmp_path):
    a, b = _tiny().eval(), _tiny().eval()
    save_weights(a, tmp_path / "w.safetensors")
    load_weights(b, tmp_path / "w.safetensors")
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(a(x), b(x))


def test_legacy_keys_are_remapped(tmp_path):
    a = _tiny()
    legacy = {}
    for k, v in a.state_dict().items():
        for old, new in (("norm1", "norm.1"), ("conv1", "conv.1"), ("norm2", "norm.2"), ("conv2", "conv.2")):
            if "denselayer" in k and f".{old}." in k:
                k = k.replace(f".{old}.", f".{new}.")
        legacy[k] = v
    assert any("norm.1" in k for k in legacy)
    assert remap_legacy_keys(legacy).keys() == a.state_dict().keys()
    torch.save(legacy, tmp_path / "old.pth")
    b = load_weights(_tiny(), tmp_path / "old.pth")
    torch.testing.assert_close(b.state_dict(), a.state_dict())


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    state = _tiny().state_dict()
    broken = dict(state)
    broken.pop("classifier.bias")
    broken["extra.weight"] = torch.zeros(1)
    broken["features.conv0.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(broken, tmp_path / "bad.pth")
    with pytest.raises(WeightsError) as err:
        load_weights(_tiny(), tmp_path / "bad.pth")
    msg = str(err.value)
    assert "missing key 'classifier.bias'" in msg
    assert "unexpected key 'extra.weight'" in msg
    assert "'features.conv0.weight' has shape (1, 1, 1, 1)" in msg


class _Evil:
    def __reduce__(self):
        return (print, ("this would run arbitrary code",))


def test_pickle_only_checkpoint_is_refused(tmp_path, capsys):
    p = tmp_path / "evil.pth"
    with open(p, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(WeightsError, match="refused: this checkpoint needs unrestricted unpickling"):
        load_weights(_tiny(), p)
    assert "arbitrary code" not in capsys.readouterr().out


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    p = tmp_path / "w.safetensors"
    p.write_bytes(b"\x00garbage")
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_weights(_tiny(), p)
