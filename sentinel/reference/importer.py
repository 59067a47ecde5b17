"""Bring a user's trained DenseNet into the registry (`sentinel models import`), and the
architecture and preprocessing options `models init` shares with it.

A checkpoint (safetensors, or a torch state dict read with `weights_only=True`) is read,
its keys normalised (torchvision's legacy `norm.1` names, a `module.`/`model.`/`_orig_mod.`
wrapper prefix, a one-Linear `Sequential` head, BatchNorm counters an old checkpoint lacks),
loaded strictly into the DenseNet the options describe, run once on zeros, and written as
`<registry>/<name>/<version>/{model.safetensors,model.yaml}`. The entry is assembled in a
temporary folder beside the registry's models and re-loaded through the registry before it
is moved into place, so a failed import leaves nothing behind.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

from sentinel.errors import CheckFailed, UsageError, WeightsError
from sentinel.preprocess import Preprocessing
from sentinel.reference.arch import ARCHS, DenseNetConfig, resolve_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RAW_DTYPES = ("uint8", "float32", "float16", "int64")
LAYOUTS = ("NHWC", "NCHW", "NHW")
# Prefixes a training wrapper puts before every key: DataParallel/DDP, Lightning-style `self.model`,
# torch.compile. (`module.` alone is also stripped by `remap_legacy_keys`.)
_WRAPPERS = ("module.", "model.", "_orig_mod.", "net.")
_HEAD = re.compile(r"^classifier\.(\d+)\.(weight|bias)$")
_LAYER = re.compile(r"^features\.denseblock(\d+)\.denselayer(\d+)\.")


# ----------------------------------------------------------------------------- option parsing

def parse_size(text: str | None, flag: str, *, allow_none: bool = False) -> tuple[int, int] | None:
    """`224` → (224, 224); `256,320` → (256, 320); `none` → None where allowed."""
    if text is None:
        return None
    if allow_none and text.strip().lower() == "none":
        return None
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        what = "H or H,W (positive integers)" + (", or none" if allow_none else "")
        raise UsageError(f"{flag} {text!r}: expected {what}")
    return parts[0], parts[1]


def parse_shape(text: str, flag: str) -> tuple[int, ...] | None:
    """`224,224,3` → (224, 224, 3); `none` → None."""
    if text.strip().lower() == "none":
        return None
    try:
        dims = tuple(int(p) for p in text.split(","))
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise UsageError(f"{flag} {text!r}: expected comma-separated positive integers, or none")
    return dims


def parse_floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers") from None
    return vals


def parse_scale(text: str) -> float:
    """`0.00392`, `1/255`."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"--scale {text!r}: expected a number such as 1/255 or 0.0625") from None
    if not value > 0:
        raise UsageError(f"--scale {text!r}: must be positive")
    return value


def parse_block_config(text: str) -> tuple[int, ...]:
    try:
        blocks = tuple(int(p) for p in text.split(","))
    except ValueError:
        blocks = ()
    if not blocks or min(blocks) < 1:
        raise UsageError(f"--block-config {text!r}: expected comma-separated positive layer counts, e.g. 6,12,24,16")
    return blocks


# ----------------------------------------------------------------------------- architecture

@dataclass(frozen=True)
class ArchOptions:
    """The `architecture:` fields a command line may set (None: the arch's own value)."""

    num_classes: int | None = None
    growth_rate: int | None = None
    block_config: tuple[int, ...] | None = None
    num_init_features: int | None = None
    bn_size: int | None = None
    compression: float | None = None
    in_channels: int | None = None
    small_inputs: bool | None = None


_SHAPE_FLAGS = {"growth_rate": "--growth-rate", "block_config": "--block-config",
                "num_init_features": "--num-init-features", "bn_size": "--bn-size", "compression": "--compression"}
CUSTOM_BASE = "densenet"   # the model.yaml `arch` of `--arch custom` entries; their shape is spelled out under `architecture:`


def known_archs() -> list[str]:
    return sorted(a for a in ARCHS if a != CUSTOM_BASE) + ["custom"]


def resolve_architecture(arch: str, opts: ArchOptions, flag: str = "--arch") -> tuple[str, DenseNetConfig, dict[str, Any]]:
    """(model.yaml `arch`, the config, model.yaml `architecture`) for `--arch ARCH` and its options.

    A named arch takes `--in-channels`, `--small-inputs` and `--num-classes`; the shape options
    (`--growth-rate`, `--block-config`, ...) need `--arch custom`, which needs `--growth-rate` and
    `--block-config` (`--num-init-features` defaults to twice the growth rate, as in DenseNet-BC).
    """
    if arch not in ARCHS and arch != "custom":
        raise UsageError(f"{flag} {arch!r}: unknown architecture; known: {', '.join(known_archs())}")
    num_classes = opts.num_classes if opts.num_classes is not None else (1000 if arch == "custom" else None)
    try:
        if arch == "custom":
            if opts.growth_rate is None or opts.block_config is None:
                raise UsageError("--arch custom needs --growth-rate and --block-config (and usually "
                                 "--num-init-features, --in-channels, --small-inputs)")
            cfg = DenseNetConfig(
                growth_rate=opts.growth_rate, block_config=tuple(opts.block_config),
                num_init_features=opts.num_init_features or 2 * opts.growth_rate,
                bn_size=opts.bn_size if opts.bn_size is not None else 4,
                compression=opts.compression if opts.compression is not None else 0.5,
                num_classes=num_classes if num_classes is not None else 1000,
                in_channels=opts.in_channels if opts.in_channels is not None else 3,
                small_inputs=bool(opts.small_inputs))
            d: dict[str, Any] = {"growth_rate": cfg.growth_rate, "block_config": list(cfg.block_config),
                                 "num_init_features": cfg.num_init_features}
            if cfg.bn_size != 4:
                d["bn_size"] = cfg.bn_size
            if cfg.compression != 0.5:
                d["compression"] = cfg.compression
            d.update(num_classes=cfg.num_classes, in_channels=cfg.in_channels, small_inputs=cfg.small_inputs)
            base = CUSTOM_BASE
        else:
            given = [flag for f, flag in _SHAPE_FLAGS.items() if getattr(opts, f) is not None]
            if given:
                raise UsageError(f"{', '.join(given)}: shape options need --arch custom ({arch} has a fixed shape)")
            cfg = resolve_config(arch, num_classes=num_classes, in_channels=opts.in_channels,
                                 small_inputs=opts.small_inputs)
            base_cfg = ARCHS[arch]
            d = {"num_classes": cfg.num_classes}
            if cfg.in_channels != base_cfg.in_channels:
                d["in_channels"] = cfg.in_channels
            if cfg.small_inputs != base_cfg.small_inputs:
                d["small_inputs"] = cfg.small_inputs
            base = arch
    except ValueError as exc:
        raise UsageError(f"{flag} {arch}: {exc}") from None
    assert resolve_config(base, **d) == cfg, (base, d, cfg)   # what model.yaml says is what was validated
    return base, cfg, d


def describe(cfg: DenseNetConfig) -> str:
    stem = "3×3 stem (small inputs)" if cfg.small_inputs else "7×7 stem"
    return (f"growth rate {cfg.growth_rate}, blocks {list(cfg.block_config)}, {cfg.num_init_features} initial "
            f"features, {cfg.in_channels} input channels, {stem}, {cfg.num_classes} classes")


# ----------------------------------------------------------------------------- preprocessing

@dataclass(frozen=True)
class InputOptions:
    """Input and preprocessing options; None means the default for the network's shape."""

    input_size: tuple[int, int] = (224, 224)
    resize: tuple[int, int] | None | str = "default"   # "default", None (no resize) or (H, W)
    crop: tuple[int, int] | None | str = "default"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float | None = None
    layout: str | None = None
    raw_input_shape: tuple[int, ...] | None | str = "default"   # "default", None (no raw input) or a shape
    raw_input_dtype: str | None = None


def input_spec(cfg: DenseNetConfig, io: InputOptions):
    """(network input TensorSpec, Preprocessing, raw input TensorSpec or None), checked together.

    Defaults are what `models init` writes for ImageNet models, scaled to the input size:
    uint8 H×W×C images (NHWC; H×W for one channel), ×1/255, resized to size·256/224 and
    center-cropped to the size (no resize or crop with `--small-inputs`), ImageNet mean/std
    (three channels; other channel counts must give --mean and --std).
    """
    import numpy as np

    from sentinel.registry import TensorSpec

    c = cfg.in_channels
    h, w = io.input_size
    layout = io.layout or ("NHW" if c == 1 else "NHWC")
    if layout not in LAYOUTS:
        raise UsageError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if layout == "NHW" and c != 1:
        raise UsageError(f"--layout NHW is for one-channel inputs; the network takes {c} channels")
    if io.mean is None and io.std is None and c != 3:
        raise UsageError(f"--in-channels {c}: give --mean and --std (one value, or one per channel); "
                         "the ImageNet defaults are for 3 channels")
    mean = io.mean if io.mean is not None else IMAGENET_MEAN
    std = io.std if io.std is not None else IMAGENET_STD
    for flag, vals in (("--mean", mean), ("--std", std)):
        if len(vals) not in (1, c):
            raise UsageError(f"{flag} {','.join(f'{v:g}' for v in vals)}: {len(vals)} values; the network takes "
                             f"{c} channels (give 1 or {c})")
    if io.raw_input_dtype is not None and io.raw_input_dtype not in RAW_DTYPES:
        raise UsageError(f"--raw-input-dtype {io.raw_input_dtype!r}: expected one of {', '.join(RAW_DTYPES)}")
    resize = io.resize if io.resize != "default" else (
        None if cfg.small_inputs else (round(h * 256 / 224), round(w * 256 / 224)))
    crop = io.crop if io.crop != "default" else (None if cfg.small_inputs else (h, w))
    pre = Preprocessing(scale=io.scale if io.scale is not None else 1 / 255,
                        resize=resize, crop=crop, mean=tuple(mean), std=tuple(std),
                        layout=layout)
    problems = [f"--{f}: {why}" for f, why in pre.validate()]
    if problems:
        raise UsageError("; ".join(problems))
    if io.raw_input_shape == "default":
        raw_shape: tuple[int, ...] | None = {"NHWC": (h, w, c), "NCHW": (c, h, w), "NHW": (h, w)}[layout]
    else:
        raw_shape = io.raw_input_shape
    net = TensorSpec((c, h, w))
    if raw_shape is None:
        return net, pre, None
    raw = TensorSpec(tuple(raw_shape), io.raw_input_dtype or "uint8")
    try:
        got = pre.apply(np.zeros((1, *raw.shape), dtype=np.float32)).shape[1:]
    except ValueError as exc:
        raise UsageError(f"--raw-input-shape {','.join(map(str, raw.shape))}: preprocessing cannot read it ({exc})"
                         ) from None
    if tuple(got) != net.shape:
        raise UsageError(
            f"preprocessing turns raw inputs of shape {raw.shape} ({layout}, resize {_fmt(resize)}, crop {_fmt(crop)}) "
            f"into {tuple(got)}, but the network input is {net.shape}: check --input-size, --resize, --crop "
            "and --raw-input-shape")
    return net, pre, raw


def _fmt(size: Sequence[int] | None) -> str:
    return "none" if size is None else "×".join(map(str, size))


# ----------------------------------------------------------------------------- checkpoints

def read_checkpoint(path: Path) -> tuple[dict, list[str]]:
    """The checkpoint's tensors under sentinel's (torchvision's) names, and notes on what was renamed."""
    from sentinel.reference.weights import read_state_dict, remap_legacy_keys

    if not path.exists():
        raise UsageError(f"CHECKPOINT {path}: file not found")
    state = read_state_dict(path)
    if not state:
        raise WeightsError(f"{path}: holds no tensors")
    notes: list[str] = []
    for _ in range(3):   # e.g. `model.module.` (a wrapper around DataParallel)
        prefix = next((p for p in _WRAPPERS if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
        notes.append(f"stripped the prefix {prefix!r} from every key")
    before = set(state)
    state = remap_legacy_keys(state)
    if set(state) != before:
        notes.append("renamed old torchvision keys (denselayerN.norm.1 → norm1, ...)")
    # A fine-tuned head `classifier = Sequential(Dropout(p), Linear(...))` saves `classifier.1.weight/bias`.
    heads = [m for k in state if k.startswith("classifier.") and (m := _HEAD.match(k))]
    if "classifier.weight" not in state and heads and len(heads) == sum(k.startswith("classifier.") for k in state):
        indices = {m.group(1) for m in heads}
        i = indices.pop()
        w = state.get(f"classifier.{i}.weight")
        if not indices and w is not None and w.dim() == 2:
            state = {(f"classifier.{k.rsplit('.', 1)[1]}" if k.startswith(f"classifier.{i}.") else k): v
                     for k, v in state.items()}
            notes.append(f"read the Sequential head's only weighted layer classifier.{i} as the classifier "
                         "(its other layers must have no weights and do nothing at inference, like Dropout)")
    return state, notes


def checkpoint_classes(state: dict) -> int | None:
    w = state.get("classifier.weight")
    return int(w.shape[0]) if w is not None and w.dim() == 2 else None


def looks_like(state: dict) -> str:
    """What the checkpoint's own shapes say about its architecture (for error hints), or ''."""
    parts = []
    conv0 = state.get("features.conv0.weight")
    if conv0 is not None and conv0.dim() == 4:
        parts.append(f"{conv0.shape[0]} initial features, {conv0.shape[1]} input channels, "
                     f"{conv0.shape[2]}×{conv0.shape[3]} stem")
    layers: dict[int, int] = {}
    for k in state:
        if m := _LAYER.match(k):
            layers[int(m.group(1))] = max(layers.get(int(m.group(1)), 0), int(m.group(2)))
    if layers:
        parts.append(f"blocks {[layers[b] for b in sorted(layers)]}")
    g = state.get("features.denseblock1.denselayer1.conv2.weight")
    if g is not None and g.dim() == 4:
        parts.append(f"growth rate {g.shape[0]}")
    if (k := checkpoint_classes(state)) is not None:
        parts.append(f"{k} classes")
    return ", ".join(parts)


def _hints(state: dict, cfg: DenseNetConfig) -> list[str]:
    out = []
    conv0 = state.get("features.conv0.weight")
    if conv0 is not None and conv0.dim() == 4:
        if conv0.shape[1] != cfg.in_channels:
            out.append(f"the checkpoint's first convolution takes {conv0.shape[1]} input channels: --in-channels "
                       f"{conv0.shape[1]}")
        if conv0.shape[2] == 3 and not cfg.small_inputs:
            out.append("its 3×3 stem is the small-input variant: --small-inputs")
        if conv0.shape[2] == 7 and cfg.small_inputs:
            out.append("its 7×7 stem is the ImageNet one: drop --small-inputs")
    return out


# ----------------------------------------------------------------------------- the import

@dataclass
class ImportResult:
    directory: Path
    spec: str
    parameters: int
    config: DenseNetConfig
    notes: list[str] = field(default_factory=list)


def read_classes(path: Path, num_classes: int) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--classes-file {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--classes-file {path}: cannot read it ({exc})") from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for i, line in enumerate(lines, 1):
        if not line:
            raise UsageError(f"--classes-file {path}: line {i} is empty (one class name per line)")
    seen: dict[str, int] = {}
    for i, line in enumerate(lines, 1):
        if line in seen:
            raise UsageError(f"--classes-file {path}: line {i} repeats {line!r} (line {seen[line]})")
        seen[line] = i
    if len(lines) != num_classes:
        raise UsageError(f"--classes-file {path}: {len(lines)} class names, but the model has {num_classes} "
                         "classes (one name per line, in output order)")
    return tuple(lines)


def check_name(name: str, version: str) -> None:
    for flag, v in (("--name", name), ("--version", version)):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v or ""):
            raise UsageError(f"{flag} {v!r}: must be letters, digits, '_', '.', '-' (starting with a letter or digit)")


def import_checkpoint(
    checkpoint: Path, root: Path, *, arch: str, name: str, version: str, opts: ArchOptions, io: InputOptions,
    classes_file: Path | None = None, description: str | None = None, force: bool = False,
    log: Callable[[str], None] = lambda _m: None,
) -> ImportResult:
    """Validate `checkpoint` against the architecture and write `root/name/version/`."""
    import torch

    from sentinel.reference.densenet import DenseNet, count_parameters
    from sentinel.reference.weights import load_state
    from sentinel.registry import (
        ModelEntry,
        ModelManifest,
        Served,
        WeightsRef,
        load_manifest,
        refuse_bundled,
        sha256_file,
        write_manifest,
    )

    check_name(name, version)
    out = root / name / version
    refuse_bundled(out, "models import")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists; pass --force to replace it, or choose another --version")
    # The options first (any class count will do), so a mistyped flag is not reported after a long read.
    input_spec(resolve_architecture(arch, replace(opts, num_classes=opts.num_classes or 1))[1], io)
    state, notes = read_checkpoint(checkpoint)
    found = checkpoint_classes(state)
    if opts.num_classes is not None and found is not None and opts.num_classes != found:
        raise UsageError(f"--num-classes {opts.num_classes}, but the checkpoint's classifier.weight has {found} rows "
                         f"(shape {tuple(state['classifier.weight'].shape)}): it was trained for {found} classes")
    if opts.num_classes is None:
        if found is None:
            raise UsageError(f"{checkpoint}: no 2-D 'classifier.weight' to infer the class count from; pass "
                             "--num-classes")
        opts = replace(opts, num_classes=found)
    base, cfg, architecture = resolve_architecture(arch, opts)
    net, pre, raw = input_spec(cfg, io)
    classes = (read_classes(classes_file, cfg.num_classes) if classes_file is not None
               else tuple(str(i) for i in range(cfg.num_classes)))

    model = DenseNet(cfg).eval()
    own = model.state_dict()
    counters = [k for k in own if k.endswith(".num_batches_tracked")]
    if counters and not any(k in state for k in counters):
        state = dict(state)
        for k in counters:
            state[k] = torch.zeros((), dtype=torch.long)
        notes.append("the checkpoint has no BatchNorm num_batches_tracked counters (unused at inference); wrote zeros")
    try:
        load_state(model, state, checkpoint)
    except WeightsError as exc:
        extra = _hints(state, cfg)
        seen = looks_like(state)
        msg = f"{exc}. --arch {arch} is: {describe(cfg)}"
        if seen:
            msg += f"; the checkpoint has: {seen}"
        if extra:
            msg += "; " + "; ".join(extra)
        raise WeightsError(msg) from None
    x = torch.zeros((1, *net.shape))
    with torch.inference_mode():
        try:
            logits = model(x)
        except RuntimeError as exc:
            raise UsageError(f"--input-size {net.shape[1]},{net.shape[2]}: a forward pass on zeros of shape "
                             f"{tuple(x.shape)} failed ({str(exc).splitlines()[0][:200]}); the input is too small "
                             "for this architecture's pooling") from None
    if tuple(logits.shape) != (1, cfg.num_classes):
        raise CheckFailed(f"{checkpoint}: a forward pass on zeros of shape {tuple(x.shape)} gave logits of shape "
                          f"{tuple(logits.shape)}, expected (1, {cfg.num_classes})")
    if not bool(torch.isfinite(logits).all()):
        raise CheckFailed(f"{checkpoint}: a forward pass on zeros of shape {tuple(x.shape)} gave non-finite logits "
                          "(NaN or infinite): the weights overflow float32")
    params = count_parameters(model)

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".import-{name}-{version}-", dir=root))
    try:
        w = tmp / "model.safetensors"
        from sentinel.reference.weights import save_weights

        save_weights(model, w)
        ck_sha = sha256_file(checkpoint)
        manifest = ModelManifest(
            name=name, version=version, arch=base, architecture=architecture,
            weights=WeightsRef(w.name, sha256_file(w)), input=net, classes=classes,
            served=Served(name=name, protocol="v2"), preprocessing=pre, raw_input=raw,
            training={"imported_from": checkpoint.name, "checkpoint_sha256": ck_sha},
            description=description or (f"{'custom DenseNet-BC' if arch == 'custom' else arch} imported from "
                                        f"{checkpoint.name}"),
        )
        write_manifest(manifest, tmp / "model.yaml")
        # Through the registry's own reader, as every other command will load it.
        entry = ModelEntry(tmp, load_manifest(tmp / "model.yaml"))
        again = entry.build_model()
        mine = model.state_dict()
        if again.config != cfg or any(not torch.equal(v, mine[k]) for k, v in again.state_dict().items()):
            raise CheckFailed(f"{tmp}: the written entry does not reload to the weights that were checked")
        if out.exists():   # --force: the old entry moves aside (one level down, out of the registry's glob)
            old = root / f".replaced-{name}-{version}-{tmp.name.rsplit('-', 1)[-1]}"
            out.rename(old)
            tmp.rename(out)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for n in notes:
        log(n)
    return ImportResult(out, f"{name}:{version}", params, cfg, notes)
