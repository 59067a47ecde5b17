"""One replay from the CLI's point of view: resolve target and samples, run, report."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from sentinel.errors import InfrastructureError, UsageError
from sentinel.golden import GoldenSet, Tolerance
from sentinel.protocols.names import WireProtocol
from sentinel.registry import ModelEntry
from sentinel.replay.http import HttpError, Target, probe
from sentinel.replay.report import DEFAULT_MAX_ERROR_RATIO, Objectives, ReplayReport, build_report
from sentinel.replay.runner import LoadPlan, Observer, Progress, Replayer, Samples
from sentinel.replay.wire import WireFormat

Send = Literal["auto", "raw", "inputs"]


@dataclass(frozen=True)
class ReplaySpec:
    """Everything a replay needs besides the model and golden set."""

    target: str
    protocol: WireProtocol | Literal["grpc"]   # grpc: OIP v2 ModelInfer over gRPC (replay.grpc_client)
    model_path_name: str
    binary: bool = False
    send: Send = "auto"     # raw inputs when the golden set has them and the model preprocesses
    headers: tuple[tuple[str, str], ...] = ()
    samples: int | None = None   # use only the first N golden samples


def select_samples(entry: ModelEntry, golden: GoldenSet, send: Send = "auto", limit: int | None = None,
                   tolerance: Tolerance | None = None) -> Samples:
    """Golden rows to send: raw form when the server preprocesses (model.yaml raw_input), else network inputs."""
    raw = golden.raw
    if send == "raw" and raw is None:
        raise UsageError(f"{golden.path}: --send raw, but the golden set has no raw inputs")
    use_raw = raw is not None and (send == "raw" or (send == "auto" and entry.manifest.raw_input is not None))
    x = raw if use_raw else golden.inputs
    n = len(x) if limit is None else min(limit, len(x))
    rows = np.asarray(x[:n])
    if use_raw and entry.manifest.raw_input is not None:
        rows = wire_dtype(rows, entry.manifest.raw_input.dtype)
    samples = Samples(ids=golden.ids[:n], inputs=rows, probabilities=golden.probabilities[:n],
                      logits=golden.logits[:n], tolerance=tolerance or golden.meta.tolerance)
    check_samples(entry, golden, samples, "raw" if use_raw else "inputs")
    return samples


def wire_dtype(rows: np.ndarray, dtype: str) -> np.ndarray:
    """Raw golden rows in the dtype model.yaml's raw_input names, when they hold exactly its values.

    Golden sets built before raw kept its dtype store uint8 images as float32: sent as FP32, a
    server declaring UINT8 refuses them, and the sidecar's input contract counts every replayed
    sample as a dtype violation. Rows that are not whole numbers in the dtype's range are sent
    as they are (a model.yaml saying uint8 for a set of float images is not replay's to fix)."""
    want = np.dtype(dtype)
    if want.kind not in "iu" or rows.dtype == want or rows.dtype.kind not in "biuf" or rows.size == 0:
        return rows
    info = np.iinfo(want)
    if rows.dtype.kind == "f":
        if not (np.isfinite(rows).all() and (rows == np.round(rows)).all()):
            return rows
    if rows.min() < info.min or rows.max() > info.max:
        return rows
    return rows.astype(want)


def check_samples(entry: ModelEntry, golden: GoldenSet, samples: Samples, form: str) -> None:
    """Refuse golden rows that do not fit the model, naming the file: they pass the digest check
    (a set built by another tool, or for another model and re-signed), and every answer would
    then be called a mismatch of the model, or every request a 400 of the server."""
    classes = len(entry.manifest.classes)
    for name in ("probabilities", "logits"):
        a = getattr(samples, name)
        where = f"{golden.path / (name + '.npy')}"
        if a.ndim != 2 or (classes and a.shape[1] != classes):
            raise UsageError(f"{where}: reference scores of shape {list(a.shape[1:])} per sample; "
                             f"{entry.spec} has {classes} classes")
        bad = np.flatnonzero(~np.isfinite(np.asarray(a, np.float64)).all(axis=1))
        if bad.size:
            raise UsageError(f"{where}: {bad.size} reference rows hold NaN or infinite scores "
                             f"(first: sample id {int(samples.ids[bad[0]])}); rebuild the golden set")
    spec = entry.manifest.raw_input if form == "raw" else entry.manifest.input
    if spec is not None and tuple(samples.inputs.shape[1:]) != tuple(spec.shape):
        field = "raw_input" if form == "raw" else "input"
        raise UsageError(f"{golden.path / (form + '.npy')}: samples of shape {list(samples.inputs.shape[1:])}; "
                         f"{entry.spec}'s model.yaml {field} is {list(spec.shape)}")
    ids, counts = np.unique(samples.ids, return_counts=True)
    if (counts > 1).any():
        dup = int(ids[np.argmax(counts)])
        raise UsageError(f"{golden.path / 'ids.npy'}: sample id {dup} appears {int(counts.max())} times; "
                         "ids name the samples in the report's mismatches and must be unique")


FD_RESERVE = 64   # descriptors kept for everything else: golden files, stdio, the event loop, the probe


def check_fd_room(plan: LoadPlan, requests: int | None = None, reserve: int = FD_RESERVE) -> None:
    """Refuse a plan needing more connections than this process may open files.

    Past the limit every further connect fails with EMFILE, which the run counted as the
    target's `connect` errors (`--concurrency 2000` under `ulimit -n 512`: 93% "errors").
    No more connections are opened than `requests` (when known). The soft limit is raised
    towards the hard one first, as far as needed."""
    from sentinel.fdlimit import raise_open_files

    wanted = (plan.connections if plan.open_loop else plan.concurrency or 1)
    if requests is not None:
        wanted = min(wanted, requests)   # never more connections than requests
    need = wanted + reserve
    soft = raise_open_files(need)
    if soft is not None and soft < need:
        flag = "--connections" if plan.open_loop else "--concurrency"
        raise UsageError(f"{flag} {wanted} needs {wanted} connections, but this process may open only {soft} "
                         f"files (ulimit -n; {reserve} kept for the rest): use at most {max(1, soft - reserve)} "
                         "or raise the limit")


def with_defaults(objectives: Objectives, tolerance: Tolerance) -> Objectives:
    """The objectives a replay is judged by when neither flags nor --slo set them: agreement
    at the golden set's `min_top1_agreement`, and no failed request (`DEFAULT_MAX_ERROR_RATIO`):
    a run whose requests mostly failed must not exit 0 because nothing asked about errors."""
    if objectives.min_agreement is None:
        objectives = replace(objectives, min_agreement=tolerance.min_top1_agreement)
    if objectives.max_error_ratio is None:
        objectives = replace(objectives, max_error_ratio=DEFAULT_MAX_ERROR_RATIO)
    return objectives


def run_replay(entry: ModelEntry, golden: GoldenSet, spec: ReplaySpec, plan: LoadPlan, objectives: Objectives, *,
               tolerance: Tolerance | None = None, observer: Observer | None = None,
               progress: Progress | None = None) -> ReplayReport:
    """Check the target is reachable, replay, and build the report (objectives evaluated)."""
    problems = plan.validate() + objectives.validate()
    if spec.samples is not None and spec.samples < 1:
        problems.append(f"--samples must be at least 1, got {spec.samples}")
    if problems:
        raise UsageError("; ".join(problems))
    n = len(golden.ids)
    check_fd_room(plan, plan.count if plan.count is not None else
                  math.ceil(plan.rate * plan.duration_s) if plan.rate is not None and plan.duration_s is not None else
                  None if plan.duration_s is not None else min(spec.samples or n, n))
    if spec.protocol == "grpc":
        return _run_grpc(entry, golden, spec, plan, objectives, tolerance=tolerance, observer=observer,
                         progress=progress)
    try:
        target = Target.parse(spec.target)
    except ValueError as exc:
        raise UsageError(f"--target: {exc}") from None
    try:
        asyncio.run(probe(target))
    except HttpError as exc:
        raise InfrastructureError(f"target unreachable: {exc}") from None
    samples = select_samples(entry, golden, spec.send, spec.samples, tolerance)
    wire = WireFormat(spec.protocol, spec.model_path_name, binary=spec.binary, classes=entry.manifest.classes)
    replayer = Replayer(target, wire, samples, headers=dict(spec.headers), observer=observer, progress=progress)
    result = replayer.run(plan, partial_on_interrupt=True)
    if result.sent and result.errors.get("connect", 0) == result.sent:
        raise InfrastructureError(f"target unreachable: every request failed to connect to {target.authority}")
    objectives = with_defaults(objectives, samples.tolerance)
    return build_report(result, model=entry.spec, target=spec.target + wire.path, protocol=spec.protocol,
                        binary=spec.binary, plan=plan, tolerance=samples.tolerance, objectives=objectives,
                        golden=str(golden.path))


def _run_grpc(entry: ModelEntry, golden: GoldenSet, spec: ReplaySpec, plan: LoadPlan, objectives: Objectives, *,
              tolerance: Tolerance | None, observer: Observer | None, progress: Progress | None) -> ReplayReport:
    """`run_replay` over gRPC: the same runner, samples, checks and report; ModelInfer calls instead of POSTs."""
    from sentinel.replay.grpc_client import GrpcReplayer, GrpcTarget, GrpcWire, probe_grpc

    try:
        target = GrpcTarget.parse(spec.target)
    except ValueError as exc:
        raise UsageError(f"--target: {exc}") from None
    try:
        asyncio.run(probe_grpc(target))
    except HttpError as exc:
        raise InfrastructureError(f"target unreachable: {exc}") from None
    samples = select_samples(entry, golden, spec.send, spec.samples, tolerance)
    wire = GrpcWire(spec.model_path_name, classes=entry.manifest.classes)
    replayer = GrpcReplayer(target, wire, samples, headers=dict(spec.headers), observer=observer, progress=progress)
    result = replayer.run(plan, partial_on_interrupt=True)
    if result.sent and result.errors.get("grpc_unavailable", 0) == result.sent:
        raise InfrastructureError(f"target unreachable: every call failed with UNAVAILABLE at {target.authority}")
    objectives = with_defaults(objectives, samples.tolerance)
    return build_report(result, model=entry.spec, target=f"grpc://{target.authority}{wire.path}", protocol="grpc",
                        binary=True, plan=plan, tolerance=samples.tolerance, objectives=objectives,
                        golden=str(golden.path))
