"""Measured peak memory of one DenseNet step, to check the estimator against.

On CPU the measure is torch's own allocator events: `torch.profiler` with
`profile_memory=True` records every allocation and free of the CPU allocator with
its size; summing them in time order gives the live bytes, whose maximum is the peak
above what was alive when profiling started (weights and the input). On CUDA it is
`torch.cuda.max_memory_allocated()` minus the allocated bytes before the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sentinel.gpu.memory import normalize_dtype
from sentinel.reference.densenet import DenseNetConfig


@dataclass(frozen=True)
class Measured:
    """Peak bytes allocated during a step, above the bytes alive before it."""

    peak_bytes: int
    events: int  # allocator events seen (CPU) or 0 (CUDA)


def _torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[normalize_dtype(name)]


def _build(cfg: DenseNetConfig, memory_efficient: bool, dtype: str, device: str) -> Any:
    import torch

    from sentinel.reference.densenet import DenseNet

    torch.manual_seed(0)
    return DenseNet(cfg, memory_efficient=memory_efficient).to(device=device, dtype=_torch_dtype(dtype))


def _step(model: Any, x: Any, training: bool) -> None:
    import torch

    if training:
        model.train()
        model(x).float().sum().backward()
    else:
        model.eval()
        with torch.no_grad():
            model(x)


def measure_cpu(cfg: DenseNetConfig, *, batch: int, resolution: int, dtype: str = "fp32",
                training: bool = False, memory_efficient: bool = False, model: Any = None) -> Measured:
    """Peak live bytes of one step on CPU from the profiler's allocator events.

    `model` (a `DenseNet` of `cfg` on CPU, built with the same `memory_efficient`) saves
    rebuilding one per call.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    model = model if model is not None else _build(cfg, memory_efficient, dtype, "cpu")
    x = torch.randn(batch, cfg.in_channels, resolution, resolution, dtype=_torch_dtype(dtype))
    _step(model, x, training)             # warm-up: lazy initialisation stays out of the count
    model.zero_grad(set_to_none=True)     # gradients are allocated inside the measured step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, x, training)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return Measured(peak, len(events))


def measure_cuda(cfg: DenseNetConfig, *, batch: int, resolution: int, dtype: str = "fp32",
                 training: bool = False, memory_efficient: bool = False, device: str = "cuda") -> Measured:
    """Peak bytes of one step on a CUDA device from the caching allocator's statistics."""
    import torch

    model = _build(cfg, memory_efficient, dtype, device)
    x = torch.randn(batch, cfg.in_channels, resolution, resolution, dtype=_torch_dtype(dtype), device=device)
    _step(model, x, training)  # warm-up: cuDNN/cuBLAS handles and workspaces that persist
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    _step(model, x, training)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del model, x
    torch.cuda.empty_cache()
    return Measured(peak, 0)
