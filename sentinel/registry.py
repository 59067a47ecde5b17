"""The model registry: `models/<name>/<version>/model.yaml` plus weights and exports.

Resolving `--model` specs:
- `digits:v3` names a model and a version;
- `v3` is a version of the default model (the config's `default_model`, else the only
  model in the registry);
- `digits` is that model's newest version.
An unknown name or version is an error listing the known ones.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from sentinel.errors import ConfigError, IntegrityError, RegistryError, WeightsError
from sentinel.preprocess import Preprocessing
from sentinel.protocols.names import WireProtocol
from sentinel.schema import load_mapping, read_yaml

DType = Literal["float32", "float16", "uint8", "int64"]


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]   # without the batch dimension
    dtype: DType = "float32"


@dataclass(frozen=True)
class WeightsRef:
    file: str
    sha256: str


@dataclass(frozen=True)
class ExportRef:
    format: Literal["onnx", "torchscript"]
    file: str
    sha256: str
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    dynamic_batch: bool = False
    # Output names in order. ("logits", "embeddings") marks an export the analysis worker can
    # run for the shadow prediction and drift embeddings without torch (sentinel.analysis.shadow).
    outputs: tuple[str, ...] = ("logits",)


@dataclass(frozen=True)
class Served:
    name: str
    protocol: WireProtocol = "v2"


@dataclass(frozen=True)
class Split:
    train: tuple[int, ...] = ()
    golden: tuple[int, ...] = ()
    holdout: tuple[int, ...] = ()

    def validate(self):
        sets = {"train": set(self.train), "golden": set(self.golden), "holdout": set(self.holdout)}
        names = list(sets)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                both = sets[a] & sets[b]
                if both:
                    yield b, f"overlaps {a} at {len(both)} indices (e.g. {min(both)})"


@dataclass(frozen=True)
class ModelManifest:
    """Contents of a model.yaml."""

    name: str
    version: str
    arch: str
    weights: WeightsRef
    input: TensorSpec
    classes: tuple[str, ...]
    served: Served
    architecture: dict[str, Any] = field(default_factory=dict)  # overrides of the arch's config
    raw_input: TensorSpec | None = None   # what the server receives when it preprocesses
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    dataset: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    split: Split | None = None
    exports: tuple[ExportRef, ...] = ()
    description: str = ""

    def validate(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name or ""):
            yield "name", f"must be letters, digits, '_', '.', '-', got {self.name!r}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.version or ""):
            yield "version", f"must be letters, digits, '_', '.', '-', got {self.version!r}"
        if not self.classes:
            yield "classes", "must list at least one class"
        if self.weights is not None and not re.fullmatch(r"[0-9a-f]{64}", self.weights.sha256):
            yield "weights.sha256", "must be 64 lowercase hex digits"
        if self.weights is not None and (why := _outside_problem(self.weights.file)):
            yield "weights.file", why
        for i, e in enumerate(self.exports):
            if why := _outside_problem(e.file):
                yield f"exports[{i}].file", why


def confined(base: str | Path, rel: str, where: str) -> Path:
    """`base/rel`, refusing a path that leaves `base` (absolute, `..`, or a symlink pointing out).

    Manifests come from outside (a registry or golden set someone hands over); a path in one
    must not make sentinel read or hash arbitrary files. Raises RegistryError naming `where`.
    """
    candidate = Path(base) / rel
    try:
        root = Path(base).resolve()
        target = candidate.resolve()
    except (ValueError, OSError) as exc:   # a NUL byte, a symlink loop, a name too long
        raise RegistryError(f"{where}: {rel!r} is not a usable path ({exc})") from None
    if Path(rel).is_absolute() or not target.is_relative_to(root):
        raise RegistryError(
            f"{where}: {rel!r} resolves to {target}, outside {root}; paths in a manifest must stay in its directory")
    return candidate


def _outside_problem(rel: str) -> str | None:
    """Why a manifest path is not a plain relative path inside its directory (lexically), or None."""
    p = Path(rel)
    if not rel or p.is_absolute() or rel.startswith(("/", "\\")) or ".." in p.parts:
        return f"must be a relative path inside the model's directory, got {rel!r}"
    return None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelEntry:
    """One registered model version."""

    directory: Path
    manifest: ModelManifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def manifest_path(self) -> Path:
        return self.directory / "model.yaml"

    @property
    def weights_path(self) -> Path:
        """The weights file, confined to this entry's directory (symlinks resolved)."""
        return confined(self.directory, self.manifest.weights.file, f"{self.manifest_path}: weights.file")

    def weights_ok(self) -> bool:
        return self.weights_path.is_file() and sha256_file(self.weights_path) == self.manifest.weights.sha256

    def check_weights(self) -> None:
        """Raise IntegrityError unless the weights file exists and matches its digest."""
        p = self.weights_path
        if not p.is_file():
            raise IntegrityError(f"{p}: weights file missing (model.yaml: weights.file)")
        got = sha256_file(p)
        if got != self.manifest.weights.sha256:
            raise IntegrityError(
                f"{p}: sha256 {got[:16]}… does not match model.yaml weights.sha256 "
                f"{self.manifest.weights.sha256[:16]}…")

    def densenet_config(self):
        import dataclasses

        from sentinel.reference.arch import DenseNetConfig, resolve_config

        known = {f.name for f in dataclasses.fields(DenseNetConfig)}
        unknown = sorted(set(self.manifest.architecture) - known)
        if unknown:
            raise ConfigError([f"{self.manifest_path}: architecture.{unknown[0]}: unknown field "
                               f"(known: {', '.join(sorted(known))})"])
        try:
            cfg = resolve_config(self.manifest.arch, **self.manifest.architecture)
        except (TypeError, ValueError) as exc:   # an unknown field, a mistyped or out-of-range value
            raise ConfigError([f"{self.manifest_path}: architecture: {exc}"]) from None
        if cfg.num_classes != len(self.manifest.classes):
            raise ConfigError([
                f"{self.manifest_path}: classes: lists {len(self.manifest.classes)} classes but "
                f"architecture has num_classes={cfg.num_classes}"])
        return cfg

    def build_model(self, *, load: bool = True, verify: bool = True):
        """The DenseNet with this entry's weights (digest checked first)."""
        from sentinel.reference.densenet import DenseNet
        from sentinel.reference.weights import load_weights

        cfg = self.densenet_config()
        if load and verify:
            self.check_weights()
        if load and self.weights_path.is_file():
            # Before the network is allocated: model.yaml's architecture decides its size, and
            # only a weights file that can hold that many parameters (at least a byte each) may
            # make sentinel allocate it.
            from sentinel.gpu.memory import weights_bytes

            params = weights_bytes(cfg)[0]
            size = self.weights_path.stat().st_size
            if params > size:
                raise WeightsError(
                    f"{self.weights_path}: {size} bytes cannot hold the {params:,} parameters {self.manifest_path}'s "
                    f"architecture needs; the weights are for another architecture")
        model = DenseNet(cfg)
        if load:
            load_weights(model, self.weights_path)
        return model.eval()

    def reference(self, device: str | None = None, batch_size: int = 64):
        from sentinel.reference.runtime import ReferenceModel

        return ReferenceModel(self.build_model(), device=device, batch_size=batch_size)

    def export(self, fmt: str, precision: str | None = None) -> ExportRef | None:
        for e in self.manifest.exports:
            if e.format == fmt and (precision is None or e.precision == precision):
                return e
        return None

    def features_export(self) -> ExportRef | None:
        """The fp32 ONNX export that outputs logits and embeddings (for the torch-free shadow)."""
        for e in self.manifest.exports:
            if e.format == "onnx" and e.precision == "fp32" and tuple(e.outputs[:2]) == ("logits", "embeddings"):
                return e
        return None

    def export_path(self, ref: ExportRef) -> Path:
        """Where an export's file is, confined to this entry's directory."""
        return confined(self.directory, ref.file, f"{self.manifest_path}: exports: file")

    def with_export(self, ref: ExportRef) -> ModelEntry:
        """Record an export in model.yaml (replacing one with the same file)."""
        exports = tuple(e for e in self.manifest.exports if e.file != ref.file) + (ref,)
        entry = replace(self, manifest=replace(self.manifest, exports=exports))
        write_manifest(entry.manifest, self.manifest_path)
        return entry


def manifest_to_dict(m: ModelManifest) -> dict[str, Any]:
    """Plain data for YAML, with long index lists in flow style."""
    import dataclasses

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    d = plain(m)
    for e in d.get("exports") or []:
        if e.get("outputs") == ["logits"]:   # the default; older manifests do not carry it
            e.pop("outputs")
    if d.get("raw_input") is None:
        d.pop("raw_input", None)
    if d.get("split") is None:
        d.pop("split", None)
    return d


class _FlowList(list):
    pass


def _flow_repr(dumper: yaml.SafeDumper, data: _FlowList):
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_FlowList, _flow_repr)


def write_manifest(m: ModelManifest, path: str | Path) -> None:
    d = manifest_to_dict(m)

    def flowify(v: Any) -> Any:
        if isinstance(v, list) and all(isinstance(x, (int, float, str)) for x in v):
            return _FlowList(v)
        if isinstance(v, list):
            return [flowify(x) for x in v]
        if isinstance(v, dict):
            return {k: flowify(x) for k, x in v.items()}
        return v

    text = yaml.dump(flowify(d), Dumper=_Dumper, sort_keys=False, width=120)
    Path(path).write_text(text, encoding="utf-8")


MAX_MANIFEST_BYTES = 16 << 20   # a model.yaml larger than this is refused unread


def load_manifest(path: str | Path) -> ModelManifest:
    """A model.yaml: a regular file of bounded size (a FIFO would block the reader forever)."""
    p = Path(path)
    if p.exists() and not p.is_file():
        raise ConfigError([f"{p}: not a regular file"])
    if p.is_file() and p.stat().st_size > MAX_MANIFEST_BYTES:
        raise ConfigError([f"{p}: {p.stat().st_size} bytes, more than the {MAX_MANIFEST_BYTES >> 20} MiB a "
                           "model.yaml may hold"])
    return load_mapping(read_yaml(p), ModelManifest, str(p))


class Registry:
    """Model versions under a root directory."""

    def __init__(self, root: str | Path = "models", default_model: str | None = None):
        self.root = Path(root)
        self.default_model = default_model

    def entries(self) -> list[ModelEntry]:
        """Every valid entry, sorted by name then version; invalid manifests raise ConfigError."""
        out = []
        if not self.root.is_dir():
            return out
        for path in sorted(self.root.glob("*/*/model.yaml")):
            confined(path.parent, "model.yaml", str(path.parent))   # a symlink to a file elsewhere is refused
            out.append(ModelEntry(path.parent, load_manifest(path)))
        return sorted(out, key=lambda e: (e.name, _version_key(e.version)))

    def names(self) -> list[str]:
        return sorted({e.name for e in self.entries()})

    def resolve(self, spec: str | None = None) -> ModelEntry:
        """Resolve `name:version`, `version` (default model) or `name` (newest version)."""
        entries = self.entries()
        if not entries:
            raise RegistryError(f"no models registered under {self.root}/ (expected {self.root}/<name>/<version>/model.yaml)")
        names = sorted({e.name for e in entries})
        if spec is None or spec == "":
            name, version = self._default(names), None
        elif ":" in spec:
            name, version = spec.split(":", 1)
        elif spec in names:
            name, version = spec, None
        else:
            name, version = self._default(names, spec), spec
        of_model = [e for e in entries if e.name == name]
        if not of_model:
            raise RegistryError(f"unknown model {name!r}; known models: {', '.join(names)}")
        if version is None:
            return of_model[-1]
        for e in of_model:
            if e.version == version:
                return e
        known = ", ".join(e.version for e in of_model)
        raise RegistryError(f"unknown version {version!r} of model {name!r}; known versions: {known}")

    def _default(self, names: list[str], spec: str | None = None) -> str:
        if self.default_model:
            return self.default_model
        if len(names) == 1:
            return names[0]
        what = f"{spec!r} is not a model name, and " if spec else ""
        raise RegistryError(
            f"{what}no default model is set and the registry holds several ({', '.join(names)}); "
            "write NAME:VERSION")


def _version_key(v: str) -> tuple:
    parts = re.findall(r"\d+|\D+", v)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def bundled_home() -> Path | None:
    """The copy of models/, golden_sets/, slo.yaml and sentinel.yaml inside an installed wheel."""
    from importlib import resources

    try:
        root = resources.files("sentinel").joinpath("_bundled")
    except (ModuleNotFoundError, TypeError):
        return None
    path = Path(str(root))
    return path if (path / "models").is_dir() else None


def refuse_bundled(path: str | Path, what: str) -> None:
    """UsageError when `path` lies inside the installed package's example data (`bundled_home()`).

    From a wheel install with no ./models, the registry commands read resolve to that copy;
    the write commands (`models init`, `export`, `golden build`) then wrote into site-packages:
    32 MB of random weights, an overwritten bundled export and model.yaml, in a place a
    read-only image cannot write and `pip uninstall` leaves behind."""
    home = bundled_home()
    if home is None:
        return
    target = Path(path).resolve()
    if target == home.resolve() or target.is_relative_to(home.resolve()):
        from sentinel.errors import UsageError

        raise UsageError(f"{what}: {path} is inside the installed package's example data ({home}); "
                         "write elsewhere: --registry DIR (a ./models of your own), or -o PATH")


def source_checkout() -> Path | None:
    """The repository this package is imported from (an editable install or PYTHONPATH), if any."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "models").is_dir():
        return root
    return None


def data_home(cwd: str | Path | None = None) -> Path:
    """Where the example data lives (models/, golden_sets/, slo.yaml, sentinel.yaml).

    The current directory when it has a models/ folder, else the source checkout (editable
    install), else the copy bundled in the installed package; failing all three, the current
    directory (so errors name ./models).
    """
    here = Path(cwd) if cwd is not None else Path.cwd()
    if (here / "models").is_dir():
        return here
    return source_checkout() or bundled_home() or here


def example_file(name: str) -> Path:
    """`slo.yaml` or `sentinel.yaml`: the one in the current directory, else the shipped example."""
    if name not in ("slo.yaml", "sentinel.yaml"):
        raise ValueError(f"no example file named {name!r}")
    here = Path.cwd() / name
    return here if here.is_file() else data_home() / name


def open_registry(config_path: str | Path | None = None, registry: str | Path | None = None) -> Registry:
    """The registry a CLI command should use: explicit path, else the config's, else `data_home()`'s.

    `data_home()` is ./models when present, else the source checkout's, else the bundled copy.
    """
    default_model = None
    root: Path | None = Path(registry) if registry else None
    cfg_file = Path(config_path) if config_path else Path("sentinel.yaml")
    if cfg_file.is_file():
        from sentinel.config import load_config

        cfg = load_config(cfg_file)
        default_model = cfg.default_model or cfg.models[0].name
        if root is None:
            root = cfg.resolve(cfg.registry)
    elif config_path:
        raise ConfigError([f"{cfg_file}: file not found"])
    if root is None:
        home = data_home()
        root = home / "models"
        shipped = home / "sentinel.yaml"
        if default_model is None and shipped.is_file():
            # The example data's own config names its default model (so `--model v3` works from
            # any directory, whatever else was added to that registry).
            from sentinel.config import load_config

            try:
                default_model = load_config(shipped).default_model
            except ConfigError:
                pass
    return Registry(root, default_model=default_model)
