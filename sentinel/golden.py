"""Golden sets: pinned inputs and reference outputs for one model version.

Layout of `golden_sets/<model>/<version>/`:
    golden.yaml       what it is: model, version, count, source, preprocessing, tolerance
    manifest.json     sha256, shape and dtype of every array file (checked before use)
    ids.npy           int64 sample ids (for digits: indices into load_digits() order)
    raw.npy           inputs as the server receives them (optional)
    inputs.npy        inputs as the network sees them, N×C×H×W float32
    labels.npy        int64 labels (optional)
    logits.npy, probabilities.npy, embeddings.npy   reference outputs

Arrays are plain .npy files read with allow_pickle=False.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sentinel.errors import IntegrityError, RegistryError, UsageError
from sentinel.preprocess import Preprocessing
from sentinel.registry import ModelEntry, confined, manifest_to_dict, sha256_file
from sentinel.schema import load_mapping, read_yaml

ARRAYS = ("ids", "raw", "inputs", "labels", "logits", "probabilities", "embeddings")
REQUIRED = ("ids", "inputs", "logits", "probabilities", "embeddings")


@dataclass(frozen=True)
class Tolerance:
    """How close a served or exported output must be to the reference.

    A probability or logit passes when |a - b| <= atol + rtol·|b| (numpy.isclose);
    top-1 agreement is the fraction of samples whose argmax matches.
    """

    prob_atol: float = 1e-3
    logits_atol: float = 1e-3
    logits_rtol: float = 1e-3
    min_top1_agreement: float = 1.0

    def validate(self):
        for name in ("prob_atol", "logits_atol", "logits_rtol"):
            if getattr(self, name) < 0:
                yield name, "must not be negative"
        if not 0 <= self.min_top1_agreement <= 1:
            yield "min_top1_agreement", "must be between 0 and 1"


@dataclass(frozen=True)
class GoldenMeta:
    """Contents of golden.yaml."""

    model: str
    version: str
    count: int
    classes: tuple[str, ...]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    tolerance: Tolerance = field(default_factory=Tolerance)
    source: str = ""
    weights_sha256: str = ""
    created: str = ""


@dataclass(frozen=True)
class GoldenSet:
    """A loaded (and, unless told otherwise, verified) golden set."""

    path: Path
    meta: GoldenMeta

    def _load(self, name: str) -> np.ndarray | None:
        """The array, memory-mapped copy-on-write: a slice (`inputs[:32]`) reads only the pages it
        touches, a second access shares the page cache instead of reading the file again (a
        densenet121 golden set's inputs are ~150 MB), and a caller writing into it changes
        its own copy, never the file."""
        p = confined(self.path, f"{name}.npy", f"{self.path}: {name}.npy")
        if not p.exists():
            return None
        return np.load(p, allow_pickle=False, mmap_mode="c")

    @property
    def ids(self) -> np.ndarray:
        return self._load("ids")  # type: ignore[return-value]

    @property
    def raw(self) -> np.ndarray | None:
        return self._load("raw")

    @property
    def inputs(self) -> np.ndarray:
        return self._load("inputs")  # type: ignore[return-value]

    @property
    def labels(self) -> np.ndarray | None:
        return self._load("labels")

    @property
    def logits(self) -> np.ndarray:
        return self._load("logits")  # type: ignore[return-value]

    @property
    def probabilities(self) -> np.ndarray:
        return self._load("probabilities")  # type: ignore[return-value]

    @property
    def embeddings(self) -> np.ndarray:
        return self._load("embeddings")  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.meta.count


def check_golden(path: str | Path) -> list[str]:
    """Every problem with a golden set's files (empty when it is intact)."""
    root = Path(path)
    problems: list[str] = []
    mpath = root / "manifest.json"
    if not (root / "golden.yaml").is_file():
        return [f"{root / 'golden.yaml'}: missing (is {root} a golden set?)"]
    if not mpath.is_file():
        return [f"{mpath}: missing"]
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return [f"{mpath}: unreadable manifest ({exc})"]
    if not isinstance(files, dict):
        return [f"{mpath}: files must map file names to their sha256, shape and dtype"]
    for fixed in ("golden.yaml", *(f"{a}.npy" for a in ARRAYS)):
        try:
            confined(root, fixed, str(root))
        except RegistryError as exc:
            problems.append(str(exc))
    if problems:
        return problems
    ydigest = manifest.get("golden.yaml")
    if ydigest and sha256_file(root / "golden.yaml") != ydigest:
        problems.append(f"{root / 'golden.yaml'}: sha256 does not match manifest.json")
    for req in REQUIRED:
        if f"{req}.npy" not in files:
            problems.append(f"{mpath}: files: {req}.npy is required but not listed")
    count = None
    for name, info in sorted(files.items()):
        try:
            p = confined(root, str(name), f"{mpath}: files")
        except RegistryError as exc:
            problems.append(str(exc))
            continue
        if not p.is_file():
            problems.append(f"{p}: missing")
            continue
        digest = sha256_file(p)
        if digest != info.get("sha256"):
            problems.append(f"{p}: sha256 {digest[:12]}… does not match manifest {str(info.get('sha256'))[:12]}…")
            continue
        try:
            arr = np.load(p, allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError) as exc:
            problems.append(f"{p}: not a readable .npy array ({exc})")
            continue
        if list(arr.shape) != list(info.get("shape", [])):
            problems.append(f"{p}: shape {list(arr.shape)} does not match manifest {info.get('shape')}")
        if str(arr.dtype) != info.get("dtype"):
            problems.append(f"{p}: dtype {arr.dtype} does not match manifest {info.get('dtype')}")
        n = arr.shape[0] if arr.ndim else None
        if count is None:
            count = n
        elif n != count:
            problems.append(f"{p}: has {n} rows, other files have {count}")
    return problems


def load_golden(path: str | Path, *, check: bool = True) -> GoldenSet:
    """Load a golden set; with `check`, raise IntegrityError naming the first bad file."""
    root = Path(path)
    if check:
        problems = check_golden(root)
        if problems:
            raise IntegrityError("golden set failed its check: " + "; ".join(problems))
    elif not (root / "golden.yaml").is_file():
        raise UsageError(f"{root}: not a golden set (no golden.yaml)")
    meta = load_mapping(read_yaml(root / "golden.yaml"), GoldenMeta, str(root / "golden.yaml"))
    return GoldenSet(root, meta)


def golden_path(root: str | Path, entry: ModelEntry) -> Path:
    return Path(root) / entry.name / entry.version


def default_golden_root(entry: ModelEntry | None = None) -> Path:
    """Golden sets when none is configured: ./golden_sets when present, else the one beside
    the entry's registry (`<home>/models/<m>/<v>` → `<home>/golden_sets`), else `data_home()`'s."""
    from sentinel.registry import data_home

    here = Path.cwd() / "golden_sets"
    if here.is_dir():
        return here
    if entry is not None:
        beside = entry.directory.parent.parent.parent / "golden_sets"
        if beside.is_dir():
            return beside
    return data_home() / "golden_sets"


def golden_for(entry: ModelEntry, root: str | Path | None = "golden_sets",
               path: str | Path | None = None) -> GoldenSet:
    """The golden set of `entry` (verified), refusing one built for another model or weights.

    `root=None`, or the default relative `golden_sets` when no such folder is in the current
    directory, means `default_golden_root(entry)`.
    """
    if root is None or (str(root) == "golden_sets" and not Path(root).is_dir()):
        root = default_golden_root(entry)
    g = load_golden(path or golden_path(root, entry))
    if (g.meta.model, g.meta.version) != (entry.name, entry.version):
        raise UsageError(
            f"{g.path}: golden set is for {g.meta.model}:{g.meta.version}, not {entry.spec}")
    if g.meta.weights_sha256 and g.meta.weights_sha256 != entry.manifest.weights.sha256:
        raise UsageError(
            f"{g.path}: golden set was computed with other weights than {entry.spec}'s model.yaml names; rebuild it")
    return g


def _write_array(root: Path, name: str, arr: np.ndarray, files: dict[str, Any]) -> None:
    p = root / f"{name}.npy"
    np.save(p, np.ascontiguousarray(arr), allow_pickle=False)
    files[p.name] = {"sha256": sha256_file(p), "shape": list(arr.shape), "dtype": str(arr.dtype)}


def build_golden(
    entry: ModelEntry,
    out: str | Path,
    *,
    ids: np.ndarray,
    inputs: np.ndarray | None = None,
    raw: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    source: str = "",
    tolerance: Tolerance | None = None,
    device: str | None = None,
) -> GoldenSet:
    """Compute reference outputs for the inputs and write a golden set with its manifest."""
    pre = entry.manifest.preprocessing
    if inputs is None:
        if raw is None:
            raise UsageError("a golden set needs raw or preprocessed inputs")
        inputs = pre.apply(raw)
    expected = tuple(entry.manifest.input.shape)
    if tuple(inputs.shape[1:]) != expected:
        raise UsageError(f"inputs have shape {tuple(inputs.shape[1:])} per sample; {entry.spec} expects {expected}")
    ref = entry.reference(device=device)
    outs = ref.run(inputs)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*.npy"):
        stale.unlink()
    files: dict[str, Any] = {}
    _write_array(root, "ids", np.asarray(ids, np.int64), files)
    if raw is not None:
        _write_array(root, "raw", np.asarray(raw, np.float32), files)
    _write_array(root, "inputs", np.asarray(inputs, np.float32), files)
    if labels is not None:
        _write_array(root, "labels", np.asarray(labels, np.int64), files)
    _write_array(root, "logits", outs.logits, files)
    _write_array(root, "probabilities", outs.probabilities, files)
    _write_array(root, "embeddings", outs.embeddings, files)
    meta = GoldenMeta(
        model=entry.name, version=entry.version, count=int(len(inputs)), classes=entry.manifest.classes,
        preprocessing=pre, tolerance=tolerance or Tolerance(), source=source,
        weights_sha256=entry.manifest.weights.sha256,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    # golden.yaml has the same shape as model.yaml's dataclasses; reuse its serializer.
    (root / "golden.yaml").write_text(yaml.safe_dump(manifest_to_dict(meta), sort_keys=False), encoding="utf-8")
    manifest = {"golden.yaml": sha256_file(root / "golden.yaml"), "files": files}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_contract(root, np.asarray(inputs, np.float32),
                  np.dtype(np.asarray(raw).dtype if raw is not None else entry.manifest.input.dtype).kind)
    return load_golden(root)


CONTRACT_FILE = "contract.json"


def save_contract(root: str | Path, inputs: np.ndarray, dtype_kind: str = "f") -> Path:
    """Derive the input contract from golden network inputs; write contract.json, its digest into manifest.json."""
    from sentinel.drift.inputcontract import InputContract

    root = Path(root)
    path = root / CONTRACT_FILE
    path.write_text(InputContract.derive(inputs, dtype_kind).to_json(), encoding="utf-8")
    mpath = root / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest[CONTRACT_FILE] = sha256_file(path)
    mpath.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def load_contract(golden: GoldenSet):
    """The golden set's stored input contract (None when it has none); IntegrityError when its digest is off."""
    from sentinel.drift.inputcontract import InputContract

    path = golden.path / CONTRACT_FILE
    if not path.is_file():
        return None
    try:
        digest = json.loads((golden.path / "manifest.json").read_text()).get(CONTRACT_FILE)
    except (OSError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{golden.path / 'manifest.json'}: unreadable ({exc})") from None
    if digest is None or sha256_file(path) != digest:
        raise IntegrityError(f"{path}: sha256 does not match manifest.json (rebuild the golden set)")
    try:
        return InputContract.from_json(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise IntegrityError(f"{path}: {exc}") from None


MAX_ARRAY_FILE_BYTES = 4 << 30   # an input file's arrays, uncompressed: refused above this


def read_arrays(path: str | Path, what: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz or .npy file (or a directory of .npy files), with errors that name the file.

    No pickle (object arrays are refused), and at most MAX_ARRAY_FILE_BYTES of array data,
    checked from the headers before anything is read. `what` names the file in errors
    (e.g. "--input window.npz").
    """
    import zipfile

    p = Path(path)
    files = sorted(p.glob("*.npy")) if p.is_dir() else [p]
    if not p.exists():
        raise UsageError(f"{what}: no such file or directory")
    if not p.is_dir() and p.suffix not in (".npz", ".npy"):
        raise UsageError(f"{what}: expected an .npz or .npy file or a directory of .npy files")
    try:
        if p.suffix == ".npz" and not p.is_dir():
            with zipfile.ZipFile(p) as zf:
                size = sum(i.file_size for i in zf.infolist())
            _check_size(size, what)
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        _check_size(sum(f.stat().st_size for f in files), what)
        if p.is_dir():
            return {f.stem: np.load(f, allow_pickle=False) for f in files}
        return {"inputs": np.load(p, allow_pickle=False)}
    except UsageError:
        raise
    except zipfile.BadZipFile as exc:
        raise UsageError(f"{what}: not a readable .npz ({exc})") from None
    except ValueError as exc:   # object arrays (would need pickle), a bad header, a truncated array
        raise UsageError(f"{what}: cannot read its arrays: {exc}") from None
    except (OSError, EOFError) as exc:
        raise UsageError(f"{what}: cannot read it: {exc}") from None


def _check_size(size: int, what: str) -> None:
    if size > MAX_ARRAY_FILE_BYTES:
        raise UsageError(f"{what}: {size / 2**30:.1f} GiB of arrays, more than the {MAX_ARRAY_FILE_BYTES >> 30} GiB "
                         "an input file may hold; split it")


def numeric_samples(arr: np.ndarray, name: str, what: str) -> np.ndarray:
    """`arr` if it holds at least one sample of numbers (bool, integer or float), else a UsageError."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf":
        raise UsageError(f"{what}: array '{name}' holds {arr.dtype} values, not numbers")
    if arr.ndim == 0 or len(arr) == 0:
        raise UsageError(f"{what}: array '{name}' has no samples (shape {arr.shape})")
    return arr


def class_labels(labels: np.ndarray, n: int, num_classes: int, what: str) -> np.ndarray:
    """Integer labels in [0, num_classes), one per sample, or a UsageError naming the first bad one."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n:
        raise UsageError(f"{what}: {labels.shape} labels for {n} inputs (one class index per sample)")
    if labels.dtype.kind not in "iu":
        raise UsageError(f"{what}: labels are {labels.dtype}, not integer class indices")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise UsageError(f"{what}: label {int(labels[bad[0]])} of sample {int(bad[0])} is not a class index "
                         f"of this model (0-{num_classes - 1})")
    return labels


def load_source(path: str | Path) -> dict[str, np.ndarray]:
    """Read inputs for `golden build --from`: an .npz with raw/inputs, labels, ids."""
    p = Path(path)
    arrays = read_arrays(p, str(p))
    if "raw" not in arrays and "inputs" not in arrays:
        raise UsageError(f"{p}: needs an array named 'raw' (server-side inputs) or 'inputs' (network inputs)")
    for name in ("raw", "inputs"):
        if name in arrays:
            numeric_samples(arrays[name], name, str(p))
    return arrays


def with_tolerance(meta: GoldenMeta, tol: Tolerance) -> GoldenMeta:
    return replace(meta, tolerance=tol)
