"""The reference DenseNet run on sampled inputs: embeddings for drift and a shadow prediction.

CPU: the model is exported once to ONNX (cached by weights digest) and run by onnxruntime;
CUDA, or when the export cannot be made or does not reproduce torch: torch itself. A token
bucket caps the samples per second at a fraction of the throughput measured at start-up, so
the reference never falls behind the sampled traffic; samples over the cap are skipped, and
counted.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from sentinel.errors import (
    CheckFailed,
    InfrastructureError,
    IntegrityError,
    MissingExtra,
    SentinelError,
)

log = logging.getLogger(__name__)

Backend = Literal["onnxruntime", "torch"]

# The exported graph must reproduce torch to this absolute tolerance on golden inputs.
EXPORT_ATOL = 1e-4
# The registry's features export must reproduce the golden set's stored reference outputs
# (computed by torch when the set was built) to this absolute tolerance.
GOLDEN_ATOL = 1e-4
# Share of the measured throughput the shadow may use: the analysis process has other work
# (decoding, detectors) and the host has other tenants.
THROUGHPUT_SHARE = 0.5


@dataclass(frozen=True)
class ReferenceOutputs:
    logits: np.ndarray        # N×K float32
    embeddings: np.ndarray    # N×D float32


def _installed(module: str) -> bool:
    """Whether `module` can be imported (a blocked or broken one counts as absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _cuda_available() -> bool:
    """Whether torch sees a CUDA device. On Linux with no GPU device node, no, without importing
    torch, which takes seconds and would be the larger part of a CPU host's start-up."""
    if "torch" not in sys.modules and sys.platform.startswith("linux") and not _gpu_device_nodes():
        return False
    import torch

    return bool(torch.cuda.is_available())


def _gpu_device_nodes(dev: Path = Path("/dev")) -> bool:
    """Any device node a CUDA runtime needs: NVIDIA's, ROCm's (/dev/kfd) or WSL2's (/dev/dxg)."""
    return any(dev.glob("nvidia[0-9]*")) or (dev / "kfd").exists() or (dev / "dxg").exists()


def export_features_onnx(model, input_shape: tuple[int, ...], path: str | Path) -> None:
    """Write an ONNX graph with outputs (logits, embeddings) for a DenseNet (torch needed).

    Opset 17, the TorchScript exporter, batch dimension `n` dynamic; written to a temporary
    file and renamed, so a reader never sees half a file. The same model gives the same bytes.
    """
    import torch

    path = Path(path)
    model = copy.deepcopy(model).cpu().eval()
    # The TorchScript exporter mistraces in-place ReLUs whose input is also concatenated
    # later (a dense block's), giving wrong outputs; out-of-place ReLUs export correctly.
    for mod in model.modules():
        if isinstance(mod, torch.nn.ReLU):
            mod.inplace = False

    class _Both(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.forward_with_embedding(x)

    x = torch.zeros((2, *input_shape), dtype=torch.float32)
    tmp = path.with_suffix(".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Both(model), (x,), str(tmp), input_names=["input"],
                          output_names=["logits", "embeddings"], opset_version=17, dynamo=False,
                          dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}, "embeddings": {0: "n"}})
    tmp.replace(path)


def private_cache_dir() -> Path:
    """This user's cache of shadow ONNX exports: a 0700 directory no other local user can write.

    `$XDG_CACHE_HOME/sentinel/onnx` (default ~/.cache), else a per-uid folder under the temp
    directory; a folder owned by someone else, or writable by others, is refused (another local
    user could otherwise plant the model the shadow runs).
    """
    import os

    home = os.environ.get("XDG_CACHE_HOME") or (str(Path.home() / ".cache") if Path.home().is_dir() else "")
    root = Path(home) / "sentinel" / "onnx" if home else Path(tempfile.gettempdir()) / f"sentinel-onnx-{os.getuid()}"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = root.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise InfrastructureError(f"{root}: shadow export cache is not a private directory of this user "
                                  f"(owner uid {st.st_uid}, mode {st.st_mode & 0o777:o})")
    return root


class ReferenceRunner:
    """Runs a registry entry's reference model on network inputs with one backend.

    Backends, in order: the registry's own features export (an fp32 ONNX file whose outputs
    are logits and embeddings, `ModelEntry.features_export`) through onnxruntime on CPU,
    which needs no torch; else, with torch installed, an ONNX export made here and cached,
    or torch itself (CUDA, or when the export fails). Without torch and without a features
    export it raises MissingExtra, and the analysis worker goes on without a shadow.
    """

    def __init__(self, entry, *, device: str | None = None, cache_dir: str | Path | None = None,
                 check_inputs: np.ndarray | None = None, prefer: Backend | None = None, threads: int = 1,
                 check_outputs: tuple[np.ndarray, np.ndarray] | None = None):
        self.entry = entry
        self.model = None
        self.device = None
        self._torch = None
        self._session = None
        self.backend: Backend = "torch"
        self.note = ""
        self.embedding_width = 0
        # One intra-op thread by default: the sidecar shares the pod's CPUs with the model server.
        self.threads = threads
        self._check_outputs = check_outputs
        has_torch = _installed("torch")
        registered = entry.features_export()
        if registered is not None and prefer != "torch" and device in (None, "cpu") and (
                not has_torch or device == "cpu" or not _cuda_available()):
            try:
                self._session = self._registered_session(registered, check_inputs)
                self.backend = "onnxruntime"
                return
            except SentinelError as exc:
                if not has_torch:
                    raise
                self.note = f"registered export {registered.file} unusable, exporting from torch: {exc}"
                log.warning("%s: %s", entry.spec, self.note)
        if not has_torch:
            raise MissingExtra(f"the shadow reference of {entry.spec} (no ONNX export with embeddings "
                               "in model.yaml)", "torch")
        import torch

        from sentinel.reference.runtime import select_device

        self.model = entry.build_model()
        self.device = select_device(device)
        self.model = self.model.to(self.device).eval()
        self.embedding_width = self.model.embedding_width
        self._torch = torch
        want_ort = (prefer or ("onnxruntime" if self.device.type == "cpu" else "torch")) == "onnxruntime"
        if want_ort:
            try:
                self._session = self._onnx_session(Path(cache_dir) if cache_dir else private_cache_dir(),
                                                   check_inputs)
                self.backend = "onnxruntime"
            except Exception as exc:  # noqa: BLE001 - any export/runtime failure falls back to torch, logged
                self.note = f"onnxruntime unavailable, using torch: {exc}"
                log.warning("%s: %s", entry.spec, self.note)

    def _ort_session(self, path: Path):
        import onnxruntime as ort

        from sentinel.verify.runtime import check_onnx_file

        # verify's checks before any byte of external data is read: confined to the model's
        # directory, sized as declared, bounded (onnxruntime's own checks vary by version)
        check_onnx_file(path)

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        try:
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's pybind errors have no common base
            raise InfrastructureError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None

    def _registered_session(self, ref, check_inputs: np.ndarray | None):
        """The registry's features export, digest-checked, compared with the golden outputs when given."""
        from sentinel.registry import sha256_file

        path = self.entry.export_path(ref)
        if not path.is_file():
            raise InfrastructureError(f"{path}: features export missing ({self.entry.manifest_path}: exports)")
        got = sha256_file(path)
        if got != ref.sha256:
            raise IntegrityError(f"{path}: sha256 {got[:16]}… does not match model.yaml {ref.sha256[:16]}…")
        sess = self._ort_session(path)
        names = [o.name for o in sess.get_outputs()]
        if names[:2] != ["logits", "embeddings"]:
            raise InfrastructureError(f"{path}: outputs are {names}, model.yaml says logits, embeddings")
        x = check_inputs if check_inputs is not None else np.zeros((2, *self.entry.manifest.input.shape), np.float32)
        x = np.ascontiguousarray(x[:8], dtype=np.float32)
        lg, em = sess.run(["logits", "embeddings"], {sess.get_inputs()[0].name: x})
        self.embedding_width = int(em.shape[1])
        if self._check_outputs is not None:
            want_lg, want_em = (np.asarray(a[:len(x)], np.float32) for a in self._check_outputs)
            err = max(float(np.abs(lg - want_lg).max()), float(np.abs(em - want_em).max()))
            if err > GOLDEN_ATOL:
                raise CheckFailed(f"{path}: differs from the golden set's reference outputs by {err:.3g} "
                                  f"(> {GOLDEN_ATOL})")
        return sess

    def _onnx_session(self, cache: Path, check_inputs: np.ndarray | None):
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / f"{self.entry.name}-{self.entry.version}-{self.entry.manifest.weights.sha256[:16]}.onnx"
        if not path.is_file():
            self._export(path)
        try:
            sess = self._ort_session(path)
        except InfrastructureError:   # a corrupt or truncated cached export: make it again, once
            path.unlink(missing_ok=True)
            self._export(path)
            sess = self._ort_session(path)
        x = check_inputs if check_inputs is not None else np.zeros((2, *self.entry.manifest.input.shape), np.float32)
        x = np.ascontiguousarray(x[:8], dtype=np.float32)
        lg, em = sess.run(None, {"input": x})
        ref = self._run_torch(x)
        err = max(float(np.abs(lg - ref.logits).max()), float(np.abs(em - ref.embeddings).max()))
        if err > EXPORT_ATOL:
            path.unlink(missing_ok=True)
            raise RuntimeError(f"exported ONNX differs from torch by {err:.3g} (> {EXPORT_ATOL})")
        return sess

    def _export(self, path: Path) -> None:
        export_features_onnx(self.model, tuple(self.entry.manifest.input.shape), path)

    def _run_torch(self, x: np.ndarray) -> ReferenceOutputs:
        torch = self._torch
        with torch.inference_mode():
            lg, em = self.model.forward_with_embedding(torch.from_numpy(x).to(self.device))
        return ReferenceOutputs(lg.float().cpu().numpy(), em.float().cpu().numpy())

    def run(self, inputs: np.ndarray, batch_size: int = 64) -> ReferenceOutputs:
        """Logits and embeddings for N×C×H×W float32 network inputs."""
        x_all = np.ascontiguousarray(inputs, dtype=np.float32)
        lgs, ems = [], []
        for i in range(0, len(x_all), batch_size):
            x = x_all[i:i + batch_size]
            if self._session is not None:
                lg, em = self._session.run(["logits", "embeddings"], {self._session.get_inputs()[0].name: x})
                lgs.append(lg)
                ems.append(em)
            else:
                out = self._run_torch(x)
                lgs.append(out.logits)
                ems.append(out.embeddings)
        if not lgs:
            return ReferenceOutputs(np.zeros((0, len(self.entry.manifest.classes)), np.float32),
                                    np.zeros((0, self.embedding_width), np.float32))
        return ReferenceOutputs(np.concatenate(lgs), np.concatenate(ems))

    def measure_throughput(self, inputs: np.ndarray, seconds: float = 0.5) -> float:
        """Samples per second of `run` on `inputs` (at least one pass, about `seconds` long)."""
        self.run(inputs[:8])                      # warm-up
        done, t0 = 0, time.perf_counter()
        while True:
            self.run(inputs)
            done += len(inputs)
            dt = time.perf_counter() - t0
            if dt >= seconds:
                return done / dt


class TokenBucket:
    """At most `rate` tokens per second, bursts up to `burst`; `take(n)` grants what is available."""

    def __init__(self, rate: float, burst: float | None = None, clock=time.monotonic):
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, rate))
        self._clock = clock
        self._tokens = self.burst
        self._last = clock()

    def take(self, n: int) -> int:
        """How many of `n` samples may run now (0..n)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        k = int(min(n, np.floor(self._tokens)))
        self._tokens -= k
        return k
