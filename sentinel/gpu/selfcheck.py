"""GPU self-check: NVML against nvidia-smi, process attribution, CUDA vs CPU, estimator vs measured.

Meant for one prepared run on an NVIDIA machine (scripts/gpu_check.sh). Where no GPU is
visible it raises `NoGpu` before doing anything, and the CLI exits 2 saying so (or 0
with "skipped" under `--skip-ok`). Every check adds one row to a single table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sentinel.config import GpuConfig
from sentinel.errors import InfrastructureError
from sentinel.gpu.collector import GpuCollector
from sentinel.gpu.memory import estimate, format_bytes, relative_error
from sentinel.gpu.nvml import Nvml, PynvmlBackend

MIB = 1 << 20
ESTIMATOR_TOLERANCE = 0.10          # the bar: predicted peak within 10% of measured
SMI_TOTAL_TOLERANCE_MIB = 1         # totals are static: rounding only
SMI_USED_TOLERANCE_MIB = 64         # used moves between two reads; 64 MiB or 1% of total
OUTPUT_ATOL = 1e-3                  # fp32 CUDA vs CPU with TF32 off (cuDNN vs oneDNN summation order)
GOLDEN_DIR = Path("golden_sets/digits/v3")


class NoGpu(InfrastructureError):
    """No NVIDIA GPU is visible, so the self-check cannot run."""


@dataclass(frozen=True)
class Row:
    """One line of the self-check table."""

    check: str
    measured: str
    expected: str
    ok: bool | None  # None: informational, or skipped
    note: str = ""


def parse_smi_csv(text: str) -> list[dict[str, Any]]:
    """Rows of `nvidia-smi --query-gpu=index,uuid,memory.used,memory.total --format=csv,noheader,nounits`."""
    rows = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        rows.append({"index": int(parts[0]), "uuid": parts[1],
                     "used_mib": int(float(parts[2])), "total_mib": int(float(parts[3]))})
    return rows


def compare_smi(nvml_devices: list[dict[str, Any]], smi_rows: list[dict[str, Any]]) -> list[Row]:
    """NVML memory (from `GpuCollector.status()["devices"]`) against nvidia-smi's, per GPU."""
    out = []
    by_uuid = {r["uuid"]: r for r in smi_rows}
    for d in nvml_devices:
        if d["mig_parent"] is not None or d["memory"] is None:
            continue
        smi = by_uuid.get(d["uuid"])
        label = f"nvml vs nvidia-smi gpu {d['gpu']}"
        if smi is None:
            out.append(Row(label, "missing", d["uuid"], False, "nvidia-smi does not list this uuid"))
            continue
        mem = d["memory"]
        total_mib, used_mib = mem["total_bytes"] // MIB, mem["used_bytes"] // MIB
        used_tol = max(SMI_USED_TOLERANCE_MIB, total_mib // 100)
        ok_total = abs(total_mib - smi["total_mib"]) <= SMI_TOTAL_TOLERANCE_MIB
        ok_used = abs(used_mib - smi["used_mib"]) <= used_tol
        note = ""
        if not ok_used and mem.get("reserved_bytes"):
            # Older nvidia-smi counts the driver's reservation as used; say so instead of failing.
            with_reserved = (mem["used_bytes"] + mem["reserved_bytes"]) // MIB
            if abs(with_reserved - smi["used_mib"]) <= used_tol:
                ok_used, note = True, "nvidia-smi includes reserved memory in used"
        out.append(Row(label, f"used {used_mib} / total {total_mib} MiB",
                       f"used {smi['used_mib']} / total {smi['total_mib']} MiB (±{used_tol})",
                       ok_total and ok_used, note))
    return out


def table(rows: list[Row]) -> str:
    """The self-check table as aligned text."""
    head = ("check", "measured", "expected", "result", "note")
    cells = [head] + [(r.check, r.measured, r.expected,
                       "skip" if r.ok is None else ("PASS" if r.ok else "FAIL"), r.note) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- checks that need a GPU (run by `run`) -------------------------------------------------

_CHILD = r"""
import sys, torch
from sentinel.reference.densenet import build_densenet
m = build_densenet("densenet121").cuda().eval()
x = torch.randn(16, 3, 224, 224, device="cuda")
with torch.no_grad():
    m(x)
torch.cuda.synchronize()
print(torch.cuda.memory_reserved(), flush=True)
sys.stdin.read()
"""


def check_smi(collector: GpuCollector) -> list[Row]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [Row("nvml vs nvidia-smi", "-", "-", None, "nvidia-smi not on PATH")]
    res = subprocess.run([smi, "--query-gpu=index,uuid,memory.used,memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        return [Row("nvml vs nvidia-smi", "-", "-", False, res.stderr.strip()[:80])]
    collector.snapshot()
    return compare_smi(collector.status()["devices"], parse_smi_csv(res.stdout))


def check_process(nvml: Nvml) -> list[Row]:
    """Start a torch process running densenet121 and find its memory through NVML by PID."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path.cwd())] + sys.path))
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        line = child.stdout.readline() if child.stdout else ""
        if not line.strip():
            return [Row("process attribution", "-", "-", False, "the torch child process did not start")]
        reserved = int(line)
        col = GpuCollector(nvml, config=GpuConfig(pids=(child.pid,), scrape_budget_s=5.0))
        # NVML publishes per-process figures with a short delay after allocation: poll briefly.
        found: list[dict[str, Any]] = []
        for _ in range(20):
            col.snapshot()
            st = col.status()
            found = [p for p in st["processes"]["attributed"] if p["pid"] == child.pid]
            if found:
                break
            time.sleep(0.5)
        if not found:
            problem = st["processes"]["problem"] or "NVML did not list the process"
            return [Row("process attribution", "absent", f"pid {child.pid}", False, problem[:100])]
        used = sum(p["used_bytes"] for p in found)
        # NVML's figure is torch's reserved pool plus the CUDA context, so it must be larger.
        return [Row("process attribution", f"pid {child.pid} {format_bytes(used)}",
                    f">= torch reserved {format_bytes(reserved)}", used >= reserved,
                    f"on gpu {','.join(p['gpu'] for p in found)}")]
    finally:
        if child.stdin:
            child.stdin.close()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()


def _reference_inputs() -> tuple[Any, Any, Any, str]:
    """(model, N×C×H×W inputs, stored reference logits or None, where they came from).

    The digits golden set and its registry model when present, else random inputs
    and random weights (and the table says so).
    """
    import numpy as np

    from sentinel.reference.densenet import build_densenet

    try:
        from sentinel.golden import load_golden

        gs = load_golden(GOLDEN_DIR)
        inputs = np.asarray(gs.inputs, dtype=np.float32)
        logits = np.asarray(gs.logits, dtype=np.float32)
        source = f"golden set {GOLDEN_DIR}"
    except Exception as exc:  # the golden set may be missing or fail its digest check
        inputs = np.random.default_rng(0).standard_normal((64, 1, 32, 32)).astype(np.float32)
        logits = None
        source = f"random inputs (golden set unavailable: {type(exc).__name__})"
    try:
        from sentinel.registry import Registry

        model = Registry("models").resolve("digits:v3").build_model()
        source += ", weights digits:v3"
    except Exception:
        import torch

        torch.manual_seed(0)
        model = build_densenet("densenet_digits").eval()
        source += ", random weights"
        logits = None  # stored logits belong to the registry weights
    return model, inputs, logits, source


def check_outputs(device: str = "cuda", limit: int | None = None) -> list[Row]:
    """Reference logits on `device` against CPU: max abs difference and top-1 agreement (first `limit` inputs)."""
    import numpy as np
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32, not TF32
    torch.backends.cudnn.allow_tf32 = False
    model, inputs, stored, source = _reference_inputs()
    inputs = inputs[:limit]
    stored = None if stored is None else stored[:limit]
    x = torch.from_numpy(inputs)
    with torch.no_grad():
        cpu = model.cpu().eval()(x).numpy()
        dev = model.to(device).eval()(x.to(device)).cpu().numpy()
    diff = float(np.abs(cpu - dev).max())
    agree = float((cpu.argmax(1) == dev.argmax(1)).mean())
    rows = [Row(f"{device} vs cpu max |diff| (logits)", f"{diff:.2e}", f"<= {OUTPUT_ATOL:g}", diff <= OUTPUT_ATOL,
                f"{len(inputs)} inputs: {source}"),
            Row(f"{device} vs cpu top-1 agreement", f"{agree:.4f}", ">= 0.99", agree >= 0.99, "")]
    if stored is not None:
        sdiff = float(np.abs(stored - dev).max())
        rows.append(Row(f"{device} vs golden logits max |diff|", f"{sdiff:.2e}", f"<= {OUTPUT_ATOL:g}",
                        sdiff <= OUTPUT_ATOL, "reference outputs stored in the golden set"))
    return rows


def check_estimator(batches: tuple[int, ...] = (1, 16, 64), resolution: int = 224,
                    measure: Callable[..., Any] | None = None) -> list[Row]:
    """Predicted against measured peak (torch.cuda.max_memory_allocated) for densenet121."""
    from sentinel.gpu.measure import measure_cuda
    from sentinel.reference.densenet import ARCHS

    measure_cuda = measure or measure_cuda
    rows = []
    for mode in ("inference", "training"):
        for b in batches:
            training = mode == "training"
            est = estimate(ARCHS["densenet121"], batch=b, resolution=resolution, training=training, backend="cuda")
            got = measure_cuda(ARCHS["densenet121"], batch=b, resolution=resolution, training=training)
            err = relative_error(est.activation_peak_bytes, got.peak_bytes)
            rows.append(Row(f"estimator densenet121 {mode} b{b} {resolution}px fp32",
                            format_bytes(got.peak_bytes), format_bytes(est.activation_peak_bytes),
                            abs(err) <= ESTIMATOR_TOLERANCE, f"error {err:+.1%}"))
    return rows


def require_gpu(nvml: Nvml) -> GpuCollector:
    """A collector over `nvml`, or NoGpu saying why there is none."""
    col = GpuCollector(nvml, config=GpuConfig(scrape_budget_s=5.0))
    snap = col.snapshot()
    if not snap.available:
        raise NoGpu(f"no NVIDIA GPU is visible ({snap.reason}); the GPU self-check needs one and did not run")
    if not any(d.leaf for d in snap.devices):
        raise NoGpu("NVML works but reports no GPU; the GPU self-check needs one and did not run")
    return col


def run(nvml: Nvml | None = None, log: Callable[[str], None] = print) -> tuple[list[Row], bool]:
    """Run every check in order; (rows, all passed). Raises NoGpu where there is no GPU."""
    nvml = nvml or PynvmlBackend()
    collector = require_gpu(nvml)
    try:
        import torch
    except ImportError as exc:
        raise NoGpu(f"torch is not importable ({exc})") from exc
    if not torch.cuda.is_available():
        raise NoGpu("NVML sees a GPU but this torch build cannot use CUDA "
                    f"(torch {torch.__version__}); install a CUDA build of torch")
    rows: list[Row] = []
    for name, fn in (("nvidia-smi", lambda: check_smi(collector)),
                     ("process attribution", lambda: check_process(nvml)),
                     ("cuda vs cpu", check_outputs),
                     ("estimator", check_estimator)):
        log(f"selfcheck: {name} ...")
        try:
            rows.extend(fn())
        except Exception as exc:  # one broken check must not hide the others' results
            rows.append(Row(name, "error", "-", False, f"{type(exc).__name__}: {exc}"[:120]))
    return rows, all(r.ok is not False for r in rows)


def rows_json(rows: list[Row]) -> str:
    return json.dumps([r.__dict__ for r in rows], indent=2)


def main(argv: list[str] | None = None) -> int:
    """`python -m sentinel.gpu.selfcheck [--skip-ok] [--json]`: the CLI command without the CLI's imports."""
    args = sys.argv[1:] if argv is None else argv
    try:
        rows, ok = run(log=lambda s: print(s, file=sys.stderr, flush=True))
    except NoGpu as exc:
        if "--skip-ok" in args:
            print(f"skipped: {exc}")
            return 0
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(table(rows))
    if "--json" in args:
        print(rows_json(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
