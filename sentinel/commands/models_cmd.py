"""`sentinel models list|init|train-digits`: the model registry."""

from __future__ import annotations

import json
from pathlib import Path

import typer

models_app = typer.Typer(help="List, create and train registry models.", no_args_is_help=True)

_REGISTRY = typer.Option(None, "--registry", help="Registry directory (default: config's, else ./models).")
_CONFIG = typer.Option(None, "--config", "-c", help="sentinel.yaml (default: ./sentinel.yaml if present).")


@models_app.command("list")
def list_models(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    registry: Path | None = _REGISTRY,
    config: Path | None = _CONFIG,
) -> None:
    """Name, version, architecture, parameter count and weight digest status of each model."""
    from sentinel.registry import open_registry

    reg = open_registry(config, registry)
    rows = []
    for e in reg.entries():
        try:
            cfg = e.densenet_config()
            params = _param_count(cfg)
        except Exception as exc:  # noqa: BLE001 - a bad entry is reported, not fatal
            from sentinel.errors import ConfigError

            params = None
            for line in exc.problems if isinstance(exc, ConfigError) else [f"{e.manifest_path}: {exc}"]:
                typer.echo(line, err=True)
        rows.append({
            "name": e.name, "version": e.version, "arch": e.manifest.arch, "parameters": params,
            "weights": str(e.weights_path), "weights_ok": e.weights_ok(),
            "holdout_accuracy": e.manifest.metrics.get("holdout_accuracy"),
            "exports": [x.file for x in e.manifest.exports],
        })
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no models under {reg.root}/")
        return
    typer.echo(f"{'MODEL':<24} {'ARCH':<16} {'PARAMS':>12} {'WEIGHTS':<9} ACCURACY")
    for r in rows:
        acc = f"{r['holdout_accuracy']:.4f}" if r["holdout_accuracy"] is not None else "-"
        params = f"{r['parameters']:,}" if r["parameters"] is not None else "?"
        typer.echo(f"{r['name'] + ':' + r['version']:<24} {r['arch']:<16} {params:>12} "
                   f"{'ok' if r['weights_ok'] else 'MISMATCH':<9} {acc}")


def _param_count(cfg) -> int:
    # Counted from the architecture, not by building the network: `models list` runs without torch.
    from sentinel.gpu.memory import weights_bytes

    return weights_bytes(cfg)[0]


# Options `models init` and `models import` share: the `architecture:` fields of model.yaml, the
# network input and the preprocessing (defaults: what `models init` has always written for ImageNet).
_GROWTH = typer.Option(None, "--growth-rate", help="--arch custom: new feature maps per dense layer (k).")
_BLOCKS = typer.Option(None, "--block-config", help="--arch custom: dense layers per block, e.g. 6,12,24,16.")
_INIT_FEATURES = typer.Option(None, "--num-init-features",
                              help="--arch custom: width of the stem convolution (default: 2 × growth rate).")
_BN_SIZE = typer.Option(None, "--bn-size", help="--arch custom: bottleneck width factor (default 4).")
_COMPRESSION = typer.Option(None, "--compression", help="--arch custom: transition width factor (default 0.5).")
_IN_CHANNELS = typer.Option(None, "--in-channels", help="Input channels (default: the arch's, 3).")
_SMALL = typer.Option(None, "--small-inputs/--imagenet-stem",
                      help="3×3 stride-1 stem without max pooling, for 8–64 px images (default: the arch's).")
_INPUT_SIZE = typer.Option("224", "--input-size", help="Network input H or H,W.")
_RESIZE = typer.Option(None, "--resize", help="Resize raw inputs to H,W or none (default: input size × 256/224; "
                                              "none with --small-inputs).")
_CROP = typer.Option(None, "--crop", help="Center crop H,W or none (default: the input size; none with --small-inputs).")
_MEAN = typer.Option(None, "--mean", help="Per-channel mean after scaling (default: ImageNet's, 3 channels).")
_STD = typer.Option(None, "--std", help="Per-channel std after scaling (default: ImageNet's, 3 channels).")
_SCALE = typer.Option(None, "--scale", help="Multiply raw values by this first, e.g. 1/255 (the default).")
_LAYOUT = typer.Option(None, "--layout", help="Raw input layout: NHWC (default), NCHW, or NHW (one channel; its default).")
_RAW_SHAPE = typer.Option(None, "--raw-input-shape",
                          help="What the server receives, without the batch dimension, e.g. 224,224,3 (default: "
                               "the input size in --layout), or none (the server receives network inputs).")
_RAW_DTYPE = typer.Option(None, "--raw-input-dtype", help="uint8 (default), float32, float16 or int64.")


def _arch_options(num_classes, growth_rate, block_config, num_init_features, bn_size, compression, in_channels,
                  small_inputs):
    from sentinel.reference.importer import ArchOptions, parse_block_config

    return ArchOptions(num_classes=num_classes, growth_rate=growth_rate,
                       block_config=parse_block_config(block_config) if block_config is not None else None,
                       num_init_features=num_init_features, bn_size=bn_size, compression=compression,
                       in_channels=in_channels, small_inputs=small_inputs)


def _input_options(input_size, resize, crop, mean, std, scale, layout, raw_shape, raw_dtype):
    from sentinel.reference.importer import (
        InputOptions,
        parse_floats,
        parse_scale,
        parse_shape,
        parse_size,
    )

    size = parse_size(input_size, "--input-size")
    assert size is not None
    return InputOptions(
        input_size=size,
        resize=parse_size(resize, "--resize", allow_none=True) if resize is not None else "default",
        crop=parse_size(crop, "--crop", allow_none=True) if crop is not None else "default",
        mean=parse_floats(mean, "--mean") if mean is not None else None,
        std=parse_floats(std, "--std") if std is not None else None,
        scale=parse_scale(scale) if scale is not None else None,
        layout=layout.upper() if layout is not None else None,
        raw_input_shape=parse_shape(raw_shape, "--raw-input-shape") if raw_shape is not None else "default",
        raw_input_dtype=raw_dtype)


@models_app.command("init")
def init(
    arch: str = typer.Argument(..., help="densenet121, densenet161, densenet169, densenet201, or custom "
                                         "(with --growth-rate and --block-config)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    num_classes: int = typer.Option(1000, "--num-classes"),
    name: str | None = typer.Option(None, "--name", help="Registry name (default: the arch)."),
    version: str | None = typer.Option(None, "--version", help="Version (default: seed-S)."),
    growth_rate: int | None = _GROWTH,
    block_config: str | None = _BLOCKS,
    num_init_features: int | None = _INIT_FEATURES,
    bn_size: int | None = _BN_SIZE,
    compression: float | None = _COMPRESSION,
    in_channels: int | None = _IN_CHANNELS,
    small_inputs: bool | None = _SMALL,
    input_size: str = _INPUT_SIZE,
    resize: str | None = _RESIZE,
    crop: str | None = _CROP,
    mean: str | None = _MEAN,
    std: str | None = _STD,
    scale: str | None = _SCALE,
    layout: str | None = _LAYOUT,
    raw_input_shape: str | None = _RAW_SHAPE,
    raw_input_dtype: str | None = _RAW_DTYPE,
    registry: Path | None = _REGISTRY,
    config: Path | None = _CONFIG,
) -> None:
    """Create a seeded, randomly initialised entry for benchmarks (ImageNet-shaped by default).

    No pretrained weights can be downloaded (sentinel never fetches from the network);
    to register trained weights, use `sentinel models import CHECKPOINT`.
    """
    import torch

    from sentinel.reference.densenet import DenseNet
    from sentinel.reference.importer import check_name, input_spec, resolve_architecture
    from sentinel.reference.weights import save_weights
    from sentinel.registry import (
        ModelManifest,
        Served,
        WeightsRef,
        open_registry,
        refuse_bundled,
        sha256_file,
        write_manifest,
    )

    base, cfg, architecture = resolve_architecture(arch, _arch_options(
        num_classes, growth_rate, block_config, num_init_features, bn_size, compression, in_channels, small_inputs), flag="ARCH")
    net, pre, raw = input_spec(cfg, _input_options(input_size, resize, crop, mean, std, scale, layout,
                                                   raw_input_shape, raw_input_dtype))
    reg = open_registry(config, registry)
    name = name or arch
    version = version or f"seed-{seed}"
    check_name(name, version)
    out = reg.root / name / version
    refuse_bundled(out, "models init")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = DenseNet(cfg).eval()
    w = out / "model.safetensors"
    save_weights(model, w)
    what = "custom DenseNet-BC" if arch == "custom" else arch
    m = ModelManifest(
        name=name, version=version, arch=base, architecture=architecture,
        weights=WeightsRef(w.name, sha256_file(w)), input=net,
        classes=tuple(str(i) for i in range(cfg.num_classes)), served=Served(name=name, protocol="v2"),
        preprocessing=pre, raw_input=raw,
        description=f"{what} with random weights (seed {seed}); for benchmarks only, not a trained model",
    )
    write_manifest(m, out / "model.yaml")
    typer.echo(f"wrote {out}/model.yaml ({w.stat().st_size / 1e6:.1f} MB of random weights, seed {seed})")


@models_app.command("import")
def import_(
    checkpoint: Path = typer.Argument(..., help="Trained weights: a .safetensors file, or a .pt/.pth state dict "
                                                "(read with weights_only=True; nested under state_dict or model "
                                                "is fine)."),
    arch: str = typer.Option(..., "--arch", help="densenet121, densenet161, densenet169, densenet201, or custom "
                                                 "(with --growth-rate and --block-config)."),
    name: str = typer.Option(..., "--name", help="Registry name."),
    version: str = typer.Option(..., "--version", help="Registry version."),
    num_classes: int | None = typer.Option(None, "--num-classes",
                                           help="Default: the rows of the checkpoint's classifier.weight."),
    classes_file: Path | None = typer.Option(None, "--classes-file",
                                             help="Class names, one a line, in output order (default: 0..K-1)."),
    growth_rate: int | None = _GROWTH,
    block_config: str | None = _BLOCKS,
    num_init_features: int | None = _INIT_FEATURES,
    bn_size: int | None = _BN_SIZE,
    compression: float | None = _COMPRESSION,
    in_channels: int | None = _IN_CHANNELS,
    small_inputs: bool | None = _SMALL,
    input_size: str = _INPUT_SIZE,
    resize: str | None = _RESIZE,
    crop: str | None = _CROP,
    mean: str | None = _MEAN,
    std: str | None = _STD,
    scale: str | None = _SCALE,
    layout: str | None = _LAYOUT,
    raw_input_shape: str | None = _RAW_SHAPE,
    raw_input_dtype: str | None = _RAW_DTYPE,
    description: str | None = typer.Option(None, "--description", help="model.yaml description."),
    force: bool = typer.Option(False, "--force", help="Replace an existing NAME/VERSION entry."),
    registry: Path | None = _REGISTRY,
    config: Path | None = _CONFIG,
) -> None:
    """Register trained DenseNet weights as NAME:VERSION, after loading them strictly and running them once.

    The weights are checked against the architecture (every key present, none extra, every
    shape equal), run on zeros of the input shape, and written as safetensors with their
    sha256 beside a model.yaml; a failure writes nothing. A checkpoint that needs
    unrestricted unpickling is refused, never executed.
    """
    from sentinel.reference.importer import import_checkpoint
    from sentinel.registry import open_registry

    opts = _arch_options(num_classes, growth_rate, block_config, num_init_features, bn_size, compression,
                         in_channels, small_inputs)
    io = _input_options(input_size, resize, crop, mean, std, scale, layout, raw_input_shape, raw_input_dtype)
    reg = open_registry(config, registry)
    res = import_checkpoint(checkpoint, reg.root, arch=arch, name=name, version=version, opts=opts, io=io,
                            classes_file=classes_file, description=description, force=force,
                            log=lambda m: typer.echo(f"note: {m}", err=True))
    where = f" --registry {registry}" if registry is not None else (f" --config {config}" if config else "")
    typer.echo(f"imported {res.spec} into {res.directory}/ ({res.parameters:,} parameters, "
               f"{res.config.num_classes} classes); next: sentinel golden build --model {res.spec} "
               f"--from FILE.npz{where} (see sentinel golden build --help)")


@models_app.command("train-digits")
def train_digits(
    version: str = typer.Option("v3", "--version", help="v3 (default) or v2 (an older, weaker model)."),
    epochs: int | None = typer.Option(None, "--epochs"),
    seed: int | None = typer.Option(None, "--seed"),
    registry: Path = typer.Option(Path("models"), "--registry"),
    threads: int = typer.Option(2, "--threads", help="torch CPU threads."),
) -> None:
    """Train the digits DenseNet-BC reproducibly and register it as digits:VERSION."""
    import torch

    from sentinel.training.digits import settings_for, train

    torch.set_num_threads(threads)
    out = train(settings_for(version, epochs, seed), registry, log=lambda m: typer.echo(m, err=True))
    typer.echo(f"wrote {out}/model.yaml")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
