"""DenseNet memory model: weights, peak activation bytes and the largest batch that fits.

The model replays, tensor by tensor, what eager PyTorch allocates when it runs the
reference DenseNet (`sentinel.reference.densenet`), and tracks the live bytes:

- inference (`torch.no_grad`/`inference_mode`, eval mode): every dense layer allocates a
  fresh `torch.cat` of all earlier features, a BatchNorm output (the ReLU runs in
  place on it), the 1×1 conv output, a second BatchNorm output and the 3×3 conv
  output; temporaries die as soon as Python drops them, so the peak sits inside the
  widest layer of a block (about three times the block's width at that resolution);
- training (one forward and `backward()`, gradients set to None beforehand): autograd
  keeps each layer's concatenation, both BatchNorm outputs and the 1×1 conv output;
  the backward pass frees them node by node while it allocates input gradients,
  accumulation buffers for the dense connections and the parameter gradients;
- memory-efficient training (`torch.utils.checkpoint` around concat→BN→ReLU→conv1, as
  torchvision's `memory_efficient=True`) keeps only the 1×1 conv output and the
  second BatchNorm output, and recomputes the rest during backward.

Backends differ only in what one operator allocates besides its output:
`cpu` models oneDNN (mkldnn) convolutions, which reorder inputs and outputs into a
blocked channel layout (channels padded to the SIMD block, 8 floats on AVX2, 16 on
AVX-512) and are used unless the conv is 1×1, stride 1, batch < 16 on one thread;
`cuda` allocates only outputs (cuDNN workspaces vary by algorithm and are not modelled;
the GPU self-check measures them). Max pooling allocates int64 indices on both.

Peak figures exclude the weights and the input batch, which are reported separately,
so `total_bytes` is what a process needs on top of the framework's own context.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # the model itself needs no torch, so the sidecar can use it
    from sentinel.reference.arch import DenseNetConfig

Mode = Literal["inference", "training"]
Backend = Literal["cuda", "cpu"]
DTypeName = Literal["fp32", "fp16", "bf16"]

DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
_INDEX_BYTES = 8  # max-pool indices are int64 whatever the activation dtype
_INPUT = 0        # buffer handle of the input batch in the simulation


# Bounds on the estimator's inputs. Beyond them the model is extrapolating far past anything
# it was checked against (and the figures stop meaning anything): 1 Mi images in a batch,
# 16 Ki pixels a side; the configuration bounds match `sentinel.reference.arch`'s.
MAX_BATCH = 1 << 20
MAX_RESOLUTION = 16384
MAX_GROWTH_RATE = 1024
MAX_BN_SIZE = 64
MAX_INIT_FEATURES = 4096
MAX_IN_CHANNELS = 1024
MAX_DENSE_LAYERS = 1000


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np  # manifests parsed with numpy give numpy integers
            ok = isinstance(value, np.integer)
        except ImportError:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be at least {lo:,}, got {value:,}")
    if value > hi:
        raise ValueError(f"{name} must be at most {hi:,} (the estimator's bound), got {value:,}")


def normalize_dtype(name: str) -> str:
    """`fp32`/`fp16`/`bf16` (torch spellings accepted); ValueError otherwise."""
    key = _DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16")
    return key


_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*$")


def parse_bytes(text: str) -> int:
    """`16GiB`, `1.5TiB`, `800MiB`, `800MB`, `16G`, `1024` → bytes (GiB = 2**30; G and GB = 10**9)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 16GiB, 800MiB or 1073741824")
    value, prefix, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = " KMGT".index(prefix) if prefix else 0
    base = 1024 if (binary or not prefix) else 1000
    return int(value * base**power)


def format_bytes(n: float) -> str:
    """Bytes in binary units, e.g. `1.50 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted memory of one DenseNet step at one batch size, resolution and dtype."""

    batch: int
    resolution: int
    dtype: str
    mode: Mode
    memory_efficient: bool
    backend: Backend
    parameters: int
    weights_bytes: int          # parameters and BatchNorm buffers
    input_bytes: int            # the input batch itself
    activation_peak_bytes: int  # peak of everything else (gradients included when training)
    peak_at: str                # which operation the peak occurs in

    @property
    def total_bytes(self) -> int:
        """Weights + input + activation peak: device memory the step needs beyond the context."""
        return self.weights_bytes + self.input_bytes + self.activation_peak_bytes

    @property
    def extra_bytes(self) -> int:
        """Input + activation peak: what a loaded model still needs to run this step."""
        return self.input_bytes + self.activation_peak_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        d["extra_bytes"] = self.extra_bytes
        return d


@dataclass
class _Buf:
    size: int
    refs: int = 1


@dataclass
class _Sim:
    """Live-bytes bookkeeping: allocate, reference, release, and remember the peak."""

    live: int = 0
    peak: int = 0
    where: str = "start"
    bufs: dict[int, _Buf] = field(default_factory=dict)
    next_id: int = 0

    def alloc(self, size: int, where: str) -> int:
        self.next_id += 1
        self.bufs[self.next_id] = _Buf(int(size))
        self.live += int(size)
        if self.live > self.peak:
            self.peak, self.where = self.live, where
        return self.next_id

    def ref(self, h: int) -> int:
        self.bufs[h].refs += 1
        return h

    def free(self, h: int | None) -> None:
        if h is None:
            return
        b = self.bufs[h]
        b.refs -= 1
        if b.refs == 0:
            self.live -= b.size
            del self.bufs[h]

    def temp(self, size: int, where: str) -> None:
        """A transient allocation freed before anything else happens."""
        self.free(self.alloc(size, where))


def _out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


@dataclass(frozen=True)
class _T:
    """A simulated activation: its buffer handle, channels and spatial size."""

    h: int
    c: int
    hw: int


@dataclass
class _Node:
    """One autograd node recorded during a training forward, replayed in backward."""

    name: str
    inputs: list[tuple[int, int]]  # (tensor id, bytes) whose gradients it produces
    output: int                    # tensor id of the output whose gradient it consumes
    saved: list[int]               # buffers freed once the node has run
    param_grad: int = 0            # bytes of parameter gradients it allocates (kept)
    temps: int = 0                 # transient bytes of its backward kernel
    view_inputs: bool = False      # cat: input gradients are views of the output gradient
    checkpoint: tuple[int, int] | None = None  # (concat bytes, conv1 output bytes) recomputed


class _Model:
    """Replays a DenseNet's allocations for one configuration."""

    def __init__(self, cfg: DenseNetConfig, batch: int, dtype: str, backend: Backend,
                 training: bool, memory_efficient: bool, simd_block: int, threads: int):
        self.cfg = cfg
        self.n = batch
        self.b = DTYPE_BYTES[dtype]
        self.backend = backend
        self.training = training
        self.me = memory_efficient and training
        self.block = simd_block
        self.threads = threads
        self.sim = _Sim()
        self.tape: list[_Node] = []

    # -- helpers ---------------------------------------------------------------------
    def nbytes(self, c: int, hw: int, b: int | None = None) -> int:
        return self.n * c * hw * (self.b if b is None else b)

    def new(self, c: int, hw: int, where: str) -> _T:
        h = self.sim.alloc(self.nbytes(c, hw), where)
        return _T(h, c, hw)

    def _save(self, h: int) -> int:
        """Autograd keeps a reference to `h` (only when training)."""
        return self.sim.ref(h) if self.training else h

    def record(self, node: _Node) -> None:
        if self.training:
            self.tape.append(node)

    def _pad(self, c: int) -> int:
        return -(-c // self.block) * self.block

    def _uses_mkldnn(self, x: _T, k: int, s: int) -> bool:
        # Mirrors ATen's backend choice for CPU float convs: oneDNN unless the conv is a
        # 1×1 stride-1 GEMM on a small batch with one thread, or a small single-image
        # 3×3 conv (both then run as slow_conv2d, which im2col's kernels wider than 1).
        plain_gemm = k == 1 and s == 1 and self.n < 16 and self.threads == 1
        small = k <= 3 and self.n == 1 and self.n * x.c * x.hw <= 20480
        return not plain_gemm and not small

    # -- operators ----------------------------------------------------------------------
    def conv(self, x: _T, cout: int, k: int, s: int, p: int, side: int, where: str) -> tuple[_T, int]:
        """Convolution; returns the output and its spatial side."""
        oside = _out_size(side, k, s, p)
        ohw = oside * oside
        columns = self.nbytes(x.c * k * k, ohw) if k > 1 else 0  # im2col buffer of slow_conv2d
        backward_temp = 0
        if self.backend == "cpu" and self._uses_mkldnn(x, k, s):
            # oneDNN: input reordered to the blocked layout (not for narrow first-layer
            # inputs), weights reordered, output computed blocked then reordered back.
            blocked_in = x.c >= self.block
            cin_pad = self._pad(x.c) if blocked_in else x.c
            hs = []
            if blocked_in:
                hs.append(self.sim.alloc(self.nbytes(cin_pad, x.hw), where))
            w = self.sim.alloc(self._pad(cout) * cin_pad * k * k * self.b, where)
            blk = self.sim.alloc(self.nbytes(self._pad(cout) if blocked_in else cout, ohw), where)
            self.sim.free(w)
            for h in hs:
                self.sim.free(h)
            out = self.new(cout, ohw, where)
            self.sim.free(blk)
        elif self.backend == "cpu" and columns:
            cols = self.sim.alloc(columns, where)
            out = self.new(cout, ohw, where)
            self.sim.free(cols)
            backward_temp = columns
        else:
            out = self.new(cout, ohw, where)
        self.record(_Node(where, [(x.h, self.nbytes(x.c, x.hw))], out.h, [self._save(x.h)],
                          param_grad=cout * x.c * k * k * self.b, temps=backward_temp))
        return out, oside

    def bn(self, x: _T, where: str) -> _T:
        out = self.new(x.c, x.hw, where)
        # Batch statistics (mean, invstd) are per channel: negligible, not modelled.
        # The CPU backward kernel allocates one input-sized scratch tensor.
        size = self.nbytes(x.c, x.hw)
        self.record(_Node(where, [(x.h, size)], out.h, [self._save(x.h)],
                          param_grad=2 * x.c * self.b, temps=size if self.backend == "cpu" else 0))
        return out

    def relu_(self, x: _T, where: str) -> _T:
        # In place: no new memory; autograd saves the result (the same buffer).
        self.record(_Node(where, [(x.h, self.nbytes(x.c, x.hw))], x.h, [self._save(x.h)]))
        return x

    def relu(self, x: _T, where: str) -> _T:
        out = self.new(x.c, x.hw, where)
        self.record(_Node(where, [(x.h, self.nbytes(x.c, x.hw))], out.h, [self._save(out.h)]))
        return out

    def maxpool(self, x: _T, side: int, where: str) -> tuple[_T, int]:
        oside = _out_size(side, 3, 2, 1)
        out = self.new(x.c, oside * oside, where)
        idx = self.sim.alloc(self.nbytes(x.c, oside * oside, _INDEX_BYTES), where)
        if self.training:
            self.record(_Node(where, [(x.h, self.nbytes(x.c, x.hw))], out.h, [self._save(x.h), idx]))
        else:
            self.sim.free(idx)
        return out, oside

    def avgpool(self, x: _T, side: int, where: str) -> tuple[_T, int]:
        oside = side // 2
        out = self.new(x.c, oside * oside, where)
        self.record(_Node(where, [(x.h, self.nbytes(x.c, x.hw))], out.h, [self._save(x.h)]))
        return out, oside

    def cat(self, xs: list[_T], where: str) -> _T:
        c = sum(t.c for t in xs)
        out = self.new(c, xs[0].hw, where)
        self.record(_Node(where, [(t.h, self.nbytes(t.c, t.hw)) for t in xs], out.h, [], view_inputs=True))
        return out

    # -- network ------------------------------------------------------------------------
    def dense_layer(self, feats: list[_T], c_in: int, side: int, where: str) -> _T:
        k = self.cfg.growth_rate
        mid = self.cfg.bn_size * k
        if self.me:
            # Checkpointed bottleneck: runs without saving, so cat and norm1 output die
            # at once; backward recomputes them (recorded as one node).
            mark = len(self.tape)
            cat = self.cat(feats, where + ".cat")
            n1 = self.bn(cat, where + ".norm1")
            self.sim.free(cat.h)
            c1, _ = self.conv(n1, mid, 1, 1, 0, side, where + ".conv1")
            self.sim.free(n1.h)
            for node in self.tape[mark:]:
                for h in node.saved:
                    self.sim.free(h)
            del self.tape[mark:]
            hw = feats[0].hw
            # The non-reentrant checkpoint keeps its inputs (all earlier features of the
            # block) alive until its backward, so they outlive the block's forward.
            self.record(_Node(where + ".checkpoint", [(t.h, self.nbytes(t.c, t.hw)) for t in feats], c1.h,
                              [self._save(t.h) for t in feats],
                              param_grad=(2 * c_in + mid * c_in) * self.b, checkpoint=(
                                  self.nbytes(c_in, hw), self.nbytes(mid, hw))))
        else:
            cat = self.cat(feats, where + ".cat")
            n1 = self.relu_(self.bn(cat, where + ".norm1"), where + ".relu1")
            c1, _ = self.conv(n1, mid, 1, 1, 0, side, where + ".conv1")
            self.sim.free(n1.h)
            self.sim.free(cat.h)
        n2 = self.relu_(self.bn(c1, where + ".norm2"), where + ".relu2")
        out, _ = self.conv(n2, k, 3, 1, 1, side, where + ".conv2")
        self.sim.free(n2.h)
        self.sim.free(c1.h)
        return out

    def forward(self, side: int) -> None:
        cfg = self.cfg
        # The input batch is reported separately (input_bytes): a zero-size buffer that is
        # never released stands for it, and needs no gradient.
        self.sim.bufs[_INPUT] = _Buf(0, refs=1 << 30)
        x = _T(_INPUT, cfg.in_channels, side * side)
        if cfg.small_inputs:
            a, side = self.conv(x, cfg.num_init_features, 3, 1, 1, side, "conv0")
            y = self.relu_(self.bn(a, "norm0"), "relu0")
            self.sim.free(a.h)
        else:
            a, side = self.conv(x, cfg.num_init_features, 7, 2, 3, side, "conv0")
            b = self.relu_(self.bn(a, "norm0"), "relu0")
            self.sim.free(a.h)
            y, side = self.maxpool(b, side, "pool0")
            self.sim.free(b.h)
        c = cfg.num_init_features
        last = len(cfg.block_config) - 1
        for bi, n_layers in enumerate(cfg.block_config):
            feats = [y]
            for li in range(n_layers):
                feats.append(self.dense_layer(feats, c + li * cfg.growth_rate, side,
                                              f"denseblock{bi + 1}.denselayer{li + 1}"))
            blk = self.cat(feats, f"denseblock{bi + 1}.cat")
            for t in feats:
                self.sim.free(t.h)
            c += n_layers * cfg.growth_rate
            if bi != last:
                out_c = int(c * cfg.compression)
                t1 = self.relu_(self.bn(blk, f"transition{bi + 1}.norm"), f"transition{bi + 1}.relu")
                t2, _ = self.conv(t1, out_c, 1, 1, 0, side, f"transition{bi + 1}.conv")
                self.sim.free(t1.h)
                y, side = self.avgpool(t2, side, f"transition{bi + 1}.pool")
                self.sim.free(t2.h)
                self.sim.free(blk.h)
                c = out_c
            else:
                y = blk
        f5 = self.bn(y, "norm5")
        self.sim.free(y.h)
        r = self.relu(f5, "relu")
        self.sim.free(f5.h)
        pooled = self.sim.alloc(self.n * c * self.b, "avgpool")
        self.record(_Node("avgpool", [(r.h, self.nbytes(c, r.hw))], pooled, [self._save(r.h)]))
        self.sim.free(r.h)
        logits = self.sim.alloc(self.n * cfg.num_classes * self.b, "classifier")
        self.record(_Node("classifier", [(pooled, self.n * c * self.b)], logits, [self._save(pooled)],
                          param_grad=(c + 1) * cfg.num_classes * self.b))
        self.sim.free(pooled)
        if self.training:
            self.backward(logits)
        else:
            self.sim.free(logits)

    def backward(self, logits: int) -> None:
        """Replay the tape in reverse: input gradients, accumulation, saved tensors freed."""
        sim = self.sim
        # tensor id -> (gradient buffer handle, whether it is a view sharing another buffer)
        grads: dict[int, tuple[int, bool]] = {logits: (sim.alloc(sim.bufs[logits].size, "loss"), False)}
        sim.free(logits)
        for node in reversed(self.tape):
            g = grads.pop(node.output, None)
            if g is None:
                for h in node.saved:
                    sim.free(h)
                continue
            where = node.name + " (backward)"
            new: list[tuple[int, int, bool, int]] = []  # (tensor id, handle, is view, bytes)
            if node.checkpoint is not None:
                cat_b, mid_b = node.checkpoint
                # Recompute concat → norm1 (ReLU in place) → conv1, keep what conv1's
                # backward needs, then run conv1, relu1 and norm1 backward.
                rcat = sim.alloc(cat_b, where)
                rn1 = sim.alloc(cat_b, where)
                sim.temp(mid_b, where)
                g1 = sim.alloc(cat_b, where)
                sim.alloc(node.param_grad, where)
                sim.free(g[0])
                g2 = sim.alloc(cat_b, where)
                sim.free(g1)
                gcat = sim.alloc(cat_b, where)
                sim.free(g2)
                sim.free(rn1)
                sim.free(rcat)
                for tid, size in node.inputs:
                    new.append((tid, sim.ref(gcat), True, size))
                sim.free(gcat)
            elif node.view_inputs:
                for tid, size in node.inputs:
                    new.append((tid, sim.ref(g[0]), True, size))
                sim.free(g[0])
            else:
                for tid, size in node.inputs:
                    if tid != _INPUT:
                        new.append((tid, sim.alloc(size, where), False, size))
                if node.param_grad:
                    sim.alloc(node.param_grad, where)  # parameter gradients stay
                if node.temps:
                    sim.temp(node.temps, where)
                sim.free(g[0])
            for h in node.saved:
                sim.free(h)
            for tid, gh, is_view, size in new:
                if tid not in grads:
                    grads[tid] = (gh, is_view)
                    continue
                old, old_view = grads[tid]
                if not old_view:
                    sim.free(gh)      # added in place into the owned buffer
                elif not is_view:
                    sim.free(old)     # the new, owned gradient absorbs the old one
                    grads[tid] = (gh, False)
                else:
                    # Two views of shared storage: autograd makes a fresh sum buffer.
                    acc = sim.alloc(size, where)
                    sim.free(old)
                    sim.free(gh)
                    grads[tid] = (acc, False)
        for gh, _ in grads.values():
            sim.free(gh)


def weights_bytes(cfg: DenseNetConfig, dtype: str = "fp32") -> tuple[int, int]:
    """(parameter count, bytes of parameters plus BatchNorm buffers) for a config."""
    k, bn = cfg.growth_rate, cfg.bn_size
    params = 0
    bn_channels = 0
    c = cfg.num_init_features
    stem_k = 3 if cfg.small_inputs else 7
    params += c * cfg.in_channels * stem_k * stem_k
    bn_channels += c
    last = len(cfg.block_config) - 1
    for i, n in enumerate(cfg.block_config):
        for j in range(n):
            cin = c + j * k
            bn_channels += cin + bn * k
            params += cin * bn * k + bn * k * k * 9
        c += n * k
        if i != last:
            out = int(c * cfg.compression)
            bn_channels += c
            params += c * out
            c = out
    bn_channels += c
    params += 2 * bn_channels + c * cfg.num_classes + cfg.num_classes
    # BatchNorm running mean/var are float buffers of the same dtype; num_batches_tracked is int64.
    n_bn = _count_bn(cfg)
    total = (params + 2 * bn_channels) * DTYPE_BYTES[dtype] + 8 * n_bn
    return params, total


def _count_bn(cfg: DenseNetConfig) -> int:
    return 1 + 2 * sum(cfg.block_config) + (len(cfg.block_config) - 1) + 1


def _cpu_defaults() -> tuple[int, int]:
    """SIMD channel block and thread count of this process's CPU backend."""
    try:
        import torch
    except ImportError:  # the estimator itself does not need torch
        return 8, 1
    cap = str(torch.backends.cpu.get_cpu_capability())
    return (16 if "512" in cap else 8), torch.get_num_threads()


def estimate(
    cfg: DenseNetConfig,
    *,
    batch: int,
    resolution: int,
    dtype: str = "fp32",
    training: bool = False,
    memory_efficient: bool = False,
    backend: Backend = "cuda",
    simd_block: int | None = None,
    threads: int | None = None,
) -> MemoryEstimate:
    """Predict weights, input and peak activation bytes of one inference or training step.

    ValueError (saying which input and its bounds) for a batch outside 1..MAX_BATCH, a
    resolution outside the architecture's minimum..MAX_RESOLUTION, non-integer sizes, or a
    config whose growth rate, width or depth is out of range.
    """
    _check_int("batch", batch, 1, MAX_BATCH)
    min_res = 1 if cfg.small_inputs else 2 ** (len(cfg.block_config) + 1)
    _check_int("resolution", resolution, 1, MAX_RESOLUTION)
    if resolution < min_res:
        raise ValueError(f"resolution {resolution} is too small for this architecture (minimum {min_res})")
    _check_int("growth_rate", cfg.growth_rate, 1, MAX_GROWTH_RATE)
    _check_int("bn_size", cfg.bn_size, 1, MAX_BN_SIZE)
    _check_int("num_init_features", cfg.num_init_features, 1, MAX_INIT_FEATURES)
    _check_int("in_channels", cfg.in_channels, 1, MAX_IN_CHANNELS)
    if not cfg.block_config or sum(cfg.block_config) > MAX_DENSE_LAYERS or min(cfg.block_config) < 1:
        raise ValueError(f"block_config {list(cfg.block_config)} must be 1 to {MAX_DENSE_LAYERS} dense layers "
                         "in blocks of at least one")
    dt = normalize_dtype(dtype)
    if backend == "cpu" and (simd_block is None or threads is None):
        blk, thr = _cpu_defaults()
        simd_block = simd_block or blk
        threads = threads or thr
    model = _Model(cfg, batch, dt, backend, training, memory_efficient, simd_block or 8, threads or 1)
    model.forward(resolution)
    params, wbytes = weights_bytes(cfg, dt)
    return MemoryEstimate(
        batch=batch, resolution=resolution, dtype=dt,
        mode="training" if training else "inference",
        memory_efficient=bool(memory_efficient and training), backend=backend,
        parameters=params, weights_bytes=wbytes,
        input_bytes=batch * cfg.in_channels * resolution * resolution * DTYPE_BYTES[dt],
        activation_peak_bytes=model.sim.peak, peak_at=model.sim.where,
    )


def max_batch_that_fits(
    cfg: DenseNetConfig,
    budget_bytes: int,
    *,
    resolution: int,
    dtype: str = "fp32",
    training: bool = False,
    memory_efficient: bool = False,
    backend: Backend = "cuda",
    include_weights: bool = True,
    limit: int = 1 << 20,
) -> int:
    """Largest batch whose predicted need fits `budget_bytes` (0 if not even batch 1)."""

    def need(b: int) -> int:
        e = estimate(cfg, batch=b, resolution=resolution, dtype=dtype, training=training,
                     memory_efficient=memory_efficient, backend=backend)
        return e.total_bytes if include_weights else e.extra_bytes

    if need(1) > budget_bytes:
        return 0
    # Need grows (almost exactly) linearly in the batch: bracket, then bisect.
    lo, hi = 1, 2
    while hi <= limit and need(hi) <= budget_bytes:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if need(mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo


def relative_error(predicted: float, measured: float) -> float:
    """(predicted − measured) / measured; inf when nothing was measured."""
    return (predicted - measured) / measured if measured else math.inf
