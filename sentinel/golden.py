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

from sentinel.errors import ConfigError, IntegrityError, RegistryError, UsageError
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


MAX_META_BYTES = 16 << 20        # manifest.json, golden.yaml, contract.json: refused above this
MAX_GOLDEN_BYTES = 4 << 30       # a golden set's array files together (they are copied into memory)

# dtype kinds and number of axes each array must have (None: at least 2, the first samples)
_LAYOUT = {"ids": ("iu", 1), "labels": ("iu", 1), "inputs": ("f", 4), "logits": ("f", 2),
           "probabilities": ("f", 2), "embeddings": ("f", 2), "raw": ("buif", None)}
_FINITE = ("raw", "inputs", "logits", "probabilities", "embeddings")


def _read_small(path: Path, what: str) -> str:
    """The text of a small metadata file; UsageError when it is not a regular file or too large."""
    if not path.is_file():
        raise UsageError(f"{what}: not a regular file")
    size = path.stat().st_size
    if size > MAX_META_BYTES:
        raise UsageError(f"{what}: {size} bytes, more than the {MAX_META_BYTES >> 20} MiB a golden set's "
                         "metadata file may hold")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what}: cannot read it ({exc})") from None


def _read_manifest(root: Path) -> dict[str, Any]:
    """manifest.json as a mapping (confined to `root`, bounded), or UsageError naming what is wrong."""
    mpath = confined(root, "manifest.json", str(root))
    text = _read_small(mpath, str(mpath))
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UsageError(f"{mpath}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise UsageError(f"{mpath}: unreadable manifest (expected a JSON object, got {type(manifest).__name__})")
    return manifest


def _read_meta(root: Path) -> GoldenMeta:
    path = confined(root, "golden.yaml", str(root))
    _read_small(path, str(path))          # a regular file of bounded size, inside the golden set
    return load_mapping(read_yaml(path), GoldenMeta, str(path))


def _all_finite(arr: np.ndarray, chunk_bytes: int = 64 << 20) -> bool:
    if arr.dtype.kind != "f" or arr.size == 0:
        return True
    step = max(1, chunk_bytes // max(1, arr[0].nbytes))
    return all(bool(np.isfinite(arr[i:i + step]).all()) for i in range(0, len(arr), step))


def _content_problems(root: Path, arrays: dict[str, np.ndarray]) -> list[str]:
    """What makes an intact (digest-matching) golden set unusable: its arrays against golden.yaml and each other."""
    try:
        meta = _read_meta(root)
    except ConfigError as exc:
        return list(exc.problems)
    except UsageError as exc:
        return [str(exc)]
    problems: list[str] = []
    k = len(meta.classes)
    if meta.count < 1:
        problems.append(f"{root / 'golden.yaml'}: count: {meta.count}; a golden set needs at least one sample")
    for name, arr in sorted(arrays.items()):
        p = root / f"{name}.npy"
        kinds, ndim = _LAYOUT[name]
        if arr.dtype.kind not in kinds or arr.dtype.fields is not None:
            problems.append(f"{p}: dtype {arr.dtype}; {name} must be "
                            f"{'integers' if kinds == 'iu' else 'floating point' if kinds == 'f' else 'numbers'}")
            continue
        if (arr.ndim != ndim) if ndim is not None else (arr.ndim < 2):
            want = f"{ndim} axes" if ndim is not None else "at least 2 axes"
            problems.append(f"{p}: shape {list(arr.shape)}; {name} must have {want}, the first one samples")
            continue
        if len(arr) != meta.count:
            problems.append(f"{p}: has {len(arr)} rows; golden.yaml says count: {meta.count}")
        if name in ("logits", "probabilities") and arr.shape[1] != k:
            problems.append(f"{p}: {arr.shape[1]} columns; golden.yaml lists {k} classes")
        if name in _FINITE and not _all_finite(arr):
            problems.append(f"{p}: contains NaN or infinite values")
    lg, pr = arrays.get("logits"), arrays.get("probabilities")
    if lg is not None and pr is not None and lg.ndim == pr.ndim == 2 and lg.shape != pr.shape:
        problems.append(f"{root / 'probabilities.npy'}: shape {list(pr.shape)} differs from logits' {list(lg.shape)}")
    labels = arrays.get("labels")
    if labels is not None and labels.dtype.kind in "iu" and labels.ndim == 1:
        bad = np.flatnonzero((labels < 0) | (labels >= k))
        if len(bad):
            problems.append(f"{root / 'labels.npy'}: label {int(labels[bad[0]])} of sample {int(bad[0])} is not a "
                            f"class index (0-{k - 1}; golden.yaml lists {k} classes)")
    ids = arrays.get("ids")
    if ids is not None and ids.dtype.kind in "iu" and ids.ndim == 1:
        uniq, counts = np.unique(ids, return_counts=True)
        if len(uniq) != len(ids):
            dup = uniq[counts > 1]
            problems.append(f"{root / 'ids.npy'}: {len(ids) - len(uniq)} duplicated sample ids (e.g. {int(dup[0])}); "
                            "each sample must appear once")
    return problems


def check_golden(path: str | Path) -> list[str]:
    """Every problem with a golden set's files (empty when it is intact).

    Besides the digests, shapes and dtypes of manifest.json: every path stays inside the
    directory, golden.yaml and contract.json have digests, no array file is present unlisted,
    and the arrays are what golden.yaml says (rows = count, one column per class, labels are
    class indices, ids unique, values finite).
    """
    root = Path(path)
    problems: list[str] = []
    if not (root / "golden.yaml").exists():
        return [f"{root / 'golden.yaml'}: missing (is {root} a golden set?)"]
    for fixed in ("manifest.json", "golden.yaml", CONTRACT_FILE, *(f"{a}.npy" for a in ARRAYS)):
        try:
            confined(root, fixed, str(root))
        except RegistryError as exc:
            problems.append(str(exc))
    if problems:
        return problems
    mpath = root / "manifest.json"
    if not mpath.exists():
        return [f"{mpath}: missing"]
    try:
        manifest = _read_manifest(root)
        _read_small(root / "golden.yaml", str(root / "golden.yaml"))
    except UsageError as exc:
        return [str(exc)]
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [f"{mpath}: files must map file names to their sha256, shape and dtype"]
    ydigest = manifest.get("golden.yaml")
    if not isinstance(ydigest, str):
        problems.append(f"{mpath}: no sha256 for golden.yaml (its model, count, classes and tolerance are unverified)")
    elif sha256_file(root / "golden.yaml") != ydigest:
        problems.append(f"{root / 'golden.yaml'}: sha256 does not match manifest.json")
    cpath = root / CONTRACT_FILE
    if cpath.exists() or cpath.is_symlink():
        cdigest = manifest.get(CONTRACT_FILE)
        if not cpath.is_file():
            problems.append(f"{cpath}: not a regular file")
        elif not isinstance(cdigest, str):
            problems.append(f"{mpath}: no sha256 for {CONTRACT_FILE}")
        elif sha256_file(cpath) != cdigest:
            problems.append(f"{cpath}: sha256 does not match manifest.json")
    for req in REQUIRED:
        if f"{req}.npy" not in files:
            problems.append(f"{mpath}: files: {req}.npy is required but not listed")
    for a in ARRAYS:
        if f"{a}.npy" not in files and (root / f"{a}.npy").exists():
            problems.append(f"{root / f'{a}.npy'}: present but not listed in manifest.json (it would be used "
                            "unverified; remove it or rebuild the golden set)")
    count = None
    total = 0
    loaded: dict[str, np.ndarray] = {}
    for name, info in sorted(files.items()):
        try:
            p = confined(root, str(name), f"{mpath}: files")
        except RegistryError as exc:
            problems.append(str(exc))
            continue
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str) and isinstance(info.get("dtype"), str)
                and isinstance(info.get("shape"), list)
                and all(isinstance(d, int) and not isinstance(d, bool) for d in info["shape"])):
            problems.append(f"{mpath}: files: {name!r} needs a sha256 (string), a shape (list of integers) and a dtype")
            continue
        if not p.is_file():
            problems.append(f"{p}: missing")
            continue
        total += p.stat().st_size
        if total > MAX_GOLDEN_BYTES:
            problems.append(f"{p}: the golden set's arrays exceed {MAX_GOLDEN_BYTES >> 30} GiB; not read")
            break
        digest = sha256_file(p)
        if digest != info["sha256"]:
            problems.append(f"{p}: sha256 {digest[:12]}… does not match manifest {info['sha256'][:12]}…")
            continue
        try:
            arr = np.load(p, allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError) as exc:
            problems.append(f"{p}: not a readable .npy array ({exc})")
            continue
        if list(arr.shape) != list(info["shape"]):
            problems.append(f"{p}: shape {list(arr.shape)} does not match manifest {info['shape']}")
        if str(arr.dtype) != info["dtype"]:
            problems.append(f"{p}: dtype {arr.dtype} does not match manifest {info['dtype']}")
        if not arr.ndim:
            problems.append(f"{p}: holds a single value (shape []), not one row per sample")
            continue
        n = arr.shape[0]
        if count is None:
            count = n
        elif n != count:
            problems.append(f"{p}: has {n} rows, other files have {count}")
        if Path(str(name)).suffix == ".npy" and Path(str(name)).stem in ARRAYS and Path(str(name)).parent == Path("."):
            loaded[Path(str(name)).stem] = arr
    if problems:
        return problems
    return _content_problems(root, loaded)


def load_golden(path: str | Path, *, check: bool = True) -> GoldenSet:
    """Load a golden set; with `check`, raise IntegrityError naming the first bad file."""
    root = Path(path)
    if check:
        problems = check_golden(root)
        if problems:
            raise IntegrityError("golden set failed its check: " + "; ".join(problems))
    elif not (root / "golden.yaml").exists():
        raise UsageError(f"{root}: not a golden set (no golden.yaml)")
    return GoldenSet(root, _read_meta(root))


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
    # A golden set without a weights digest (or one edited) may still be for another network:
    # its shapes must be this model's, or every consumer fails deep inside with a broadcast error.
    if tuple(g.meta.classes) != tuple(entry.manifest.classes):
        raise UsageError(f"{g.path}: golden.yaml lists {len(g.meta.classes)} classes "
                         f"({', '.join(g.meta.classes[:5])}{', …' if len(g.meta.classes) > 5 else ''}), "
                         f"{entry.spec} has {len(entry.manifest.classes)} "
                         f"({', '.join(entry.manifest.classes[:5])}{', …' if len(entry.manifest.classes) > 5 else ''})")
    shape = tuple(g.inputs.shape[1:])
    if shape != tuple(entry.manifest.input.shape):
        raise UsageError(f"{g.path}: inputs have shape {shape} per sample; {entry.spec} expects "
                         f"{tuple(entry.manifest.input.shape)}")
    width = entry.densenet_config().feature_width
    if g.embeddings.shape[1] != width:
        raise UsageError(f"{g.path}: embeddings have {g.embeddings.shape[1]} features; {entry.spec}'s network "
                         f"has {width}")
    return g


def _write_array(root: Path, name: str, arr: np.ndarray, files: dict[str, Any]) -> None:
    p = root / f"{name}.npy"
    np.save(p, np.ascontiguousarray(arr), allow_pickle=False)
    files[p.name] = {"sha256": sha256_file(p), "shape": list(arr.shape), "dtype": str(arr.dtype)}


def _golden_files() -> set[str]:
    """The file names a golden set owns (what `build_golden` replaces in an existing one)."""
    return {f"{a}.npy" for a in ARRAYS} | {"golden.yaml", "manifest.json", CONTRACT_FILE}


def _check_out_dir(root: Path) -> None:
    """Refuse to write a golden set where it would replace anything but a golden set's own files."""
    if root.exists() and not root.is_dir():
        raise UsageError(f"--out {root}: exists and is not a directory")
    if root.is_dir() and not (root / "golden.yaml").is_file() and any(root.iterdir()):
        raise UsageError(f"--out {root}: not empty and not a golden set (no golden.yaml); name a new or empty "
                         "directory (building replaces a golden set's files)")


def _check_build_inputs(entry: ModelEntry, inputs: np.ndarray, raw: np.ndarray | None, ids: np.ndarray,
                        labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """ids and labels as int64 once every array fits the inputs; UsageError naming the first that does not."""
    n = len(inputs)
    if n < 1:
        raise UsageError("a golden set needs at least one sample (got 0)")
    if not _all_finite(np.asarray(inputs)):
        bad = int(np.flatnonzero(~np.isfinite(np.asarray(inputs).reshape(n, -1)).all(axis=1))[0])
        raise UsageError(f"inputs: sample {bad} contains NaN or infinite values")
    if raw is not None and len(raw) != n:
        raise UsageError(f"raw: {len(raw)} samples for {n} inputs")
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) != n:
        raise UsageError(f"ids: shape {tuple(ids.shape)}; one id per sample ({n}) expected")
    if ids.dtype.kind not in "iu":
        raise UsageError(f"ids: {ids.dtype} values; ids are integers")
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != n:
        raise UsageError(f"ids: {n - len(uniq)} duplicated (e.g. {int(uniq[counts > 1][0])}); each sample must "
                         "appear once in a golden set")
    if labels is not None:
        labels = class_labels(labels, n, len(entry.manifest.classes), "labels")
    return ids.astype(np.int64), None if labels is None else labels.astype(np.int64)


def _labels_look_unrelated(pred: np.ndarray, labels: np.ndarray, k: int) -> str | None:
    """Why `labels` look unrelated to the inputs (agreement with the reference no better than chance), or None."""
    n = len(labels)
    if n < 20 or k < 2:
        return None
    acc = float((pred == labels).mean())
    # agreement expected if labels and predictions were unrelated (Cohen's chance agreement)
    chance = float(np.dot(np.bincount(labels, minlength=k), np.bincount(pred, minlength=k)) / n / n)
    if chance > 0.99:            # one class throughout: agreement tells nothing
        return None
    if acc <= chance + 3 * float(np.sqrt(chance * (1 - chance) / n)):
        return (f"the reference model agrees with only {acc:.1%} of the labels (chance level {chance:.1%} on "
                f"{n} samples): are the labels in the same order as the inputs?")
    return None


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
    """Compute reference outputs for the inputs and write a golden set with its manifest.

    Everything is checked (shapes, ids, labels, finite inputs, labels against the reference's
    predictions) and written to a temporary folder beside `out` first: bad input leaves an
    existing golden set as it was, and a folder that is not a golden set is never written into.
    """
    import os
    import shutil
    import tempfile

    pre = entry.manifest.preprocessing
    if inputs is None:
        if raw is None:
            raise UsageError("a golden set needs raw or preprocessed inputs")
        inputs = pre.apply(raw)
    elif raw is not None:
        if len(raw) != len(inputs):
            raise UsageError(f"raw: {len(raw)} samples for {len(inputs)} inputs")
        if len(raw) and not np.allclose(pre.apply(raw), inputs, atol=1e-4, equal_nan=True):
            raise UsageError(f"raw and inputs disagree: {entry.spec}'s preprocessing of raw does not give inputs "
                             "(give one of them)")
    expected = tuple(entry.manifest.input.shape)
    if tuple(inputs.shape[1:]) != expected:
        raise UsageError(f"inputs have shape {tuple(inputs.shape[1:])} per sample; {entry.spec} expects {expected}")
    ids, labels = _check_build_inputs(entry, inputs, raw, ids, labels)
    root = Path(out)
    _check_out_dir(root)
    ref = entry.reference(device=device)
    outs = ref.run(inputs)
    if labels is not None and (why := _labels_look_unrelated(outs.probabilities.argmax(1), labels,
                                                             len(entry.manifest.classes))):
        raise UsageError(f"labels: {why}")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        files: dict[str, Any] = {}
        _write_array(tmp, "ids", ids, files)
        if raw is not None:
            # raw as the server receives it: integer images (uint8 RGB) keep their dtype, which
            # replay sends on the wire and the input contract's dtype check expects
            raw_arr = np.asarray(raw)
            _write_array(tmp, "raw", raw_arr if raw_arr.dtype.kind in "biu" else raw_arr.astype(np.float32), files)
        _write_array(tmp, "inputs", np.asarray(inputs, np.float32), files)
        if labels is not None:
            _write_array(tmp, "labels", labels, files)
        _write_array(tmp, "logits", outs.logits, files)
        _write_array(tmp, "probabilities", outs.probabilities, files)
        _write_array(tmp, "embeddings", outs.embeddings, files)
        meta = GoldenMeta(
            model=entry.name, version=entry.version, count=int(len(inputs)), classes=entry.manifest.classes,
            preprocessing=pre, tolerance=tolerance or Tolerance(), source=source,
            weights_sha256=entry.manifest.weights.sha256,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        # golden.yaml has the same shape as model.yaml's dataclasses; reuse its serializer.
        (tmp / "golden.yaml").write_text(yaml.safe_dump(manifest_to_dict(meta), sort_keys=False), encoding="utf-8")
        manifest = {"golden.yaml": sha256_file(tmp / "golden.yaml"), "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        try:
            save_contract(tmp, np.asarray(inputs, np.float32),
                          np.dtype(np.asarray(raw).dtype if raw is not None else entry.manifest.input.dtype).kind)
        except ValueError as exc:
            raise UsageError(f"inputs: cannot derive the input contract: {exc}") from None
        problems = check_golden(tmp)
        if problems:
            raise IntegrityError("the golden set built failed its check: " + "; ".join(problems))
        # Into place: the old manifest goes first, so a set caught half-replaced fails its check.
        _check_out_dir(root)
        root.mkdir(exist_ok=True)
        (root / "manifest.json").unlink(missing_ok=True)
        for name in sorted(_golden_files() - {"manifest.json"}):
            if (tmp / name).exists():
                os.replace(tmp / name, root / name)
            else:
                (root / name).unlink(missing_ok=True)
        os.replace(tmp / "manifest.json", root / "manifest.json")
    except OSError as exc:
        from sentinel.errors import InfrastructureError

        raise InfrastructureError(f"--out {root}: cannot write the golden set ({exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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

    path = confined(golden.path, CONTRACT_FILE, str(golden.path))
    if not path.exists() and not path.is_symlink():
        return None
    try:
        digest = _read_manifest(golden.path).get(CONTRACT_FILE)
        text = _read_small(path, str(path))
    except UsageError as exc:
        raise IntegrityError(str(exc)) from None
    if not isinstance(digest, str) or sha256_file(path) != digest:
        raise IntegrityError(f"{path}: sha256 does not match manifest.json (rebuild the golden set)")
    try:
        return InputContract.from_json(text)
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
                infos = zf.infolist()
                _check_size(sum(i.file_size for i in infos), what)
                declared = 0
                for info in infos:
                    if info.filename.endswith(".npy"):
                        with zf.open(info) as fp:
                            declared += _npy_data_bytes(fp, info.file_size, f"{what}: {info.filename}")
                _check_size(declared, what)
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if any(not f.is_file() for f in files):
            raise UsageError(f"{what}: not a regular file")
        _check_size(sum(f.stat().st_size for f in files), what)
        declared = 0
        for f in files:
            with open(f, "rb") as fp:
                declared += _npy_data_bytes(fp, f.stat().st_size, what if f == p else f"{what}: {f.name}")
        _check_size(declared, what)
        if p.is_dir():
            return {f.stem: np.load(f, allow_pickle=False) for f in files}
        return {"inputs": np.load(p, allow_pickle=False)}
    except UsageError:
        raise
    except MemoryError:
        raise UsageError(f"{what}: its arrays do not fit in memory; split it") from None
    except zipfile.BadZipFile as exc:
        raise UsageError(f"{what}: not a readable .npz ({exc})") from None
    except ValueError as exc:   # object arrays (would need pickle), a bad header, a truncated array
        raise UsageError(f"{what}: cannot read its arrays: {exc}") from None
    except (OSError, EOFError) as exc:
        raise UsageError(f"{what}: cannot read it: {exc}") from None


def _npy_data_bytes(fp: Any, file_bytes: int, what: str) -> int:
    """Bytes of array data an .npy header declares, checked against the bytes there are, before any is read.

    An 8-byte file can declare a 4-PiB array; numpy would allocate it before finding the file short.
    """
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = npformat.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = npformat.read_array_header_2_0(fp)
        else:
            shape, _, dtype = npformat._read_array_header(fp, version)  # noqa: SLF001 - 3.0 has no public reader
    except (ValueError, OSError, EOFError) as exc:
        raise UsageError(f"{what}: not a readable .npy array ({exc})") from None
    if dtype.hasobject:
        raise UsageError(f"{what}: cannot read its arrays: Object arrays cannot be loaded without pickle "
                         f"({dtype}); refused")
    n = 1
    for d in shape:
        n *= int(d)
    declared = n * dtype.itemsize
    available = file_bytes - fp.tell()
    if declared > available:
        raise UsageError(f"{what}: cannot read its arrays: its header declares {declared:,} bytes of {dtype} {tuple(shape)}, the file holds "
                         f"{max(available, 0):,} (truncated or forged)")
    return declared


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
