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


@models_app.command("init")
def init(
    arch: str = typer.Argument(..., help="densenet121, densenet161, densenet169 or densenet201."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    num_classes: int = typer.Option(1000, "--num-classes"),
    name: str | None = typer.Option(None, "--name", help="Registry name (default: the arch)."),
    version: str | None = typer.Option(None, "--version", help="Version (default: seed-S)."),
    registry: Path | None = _REGISTRY,
    config: Path | None = _CONFIG,
) -> None:
    """Create a seeded, randomly initialised ImageNet-shaped entry for benchmarks.

    No pretrained weights can be downloaded (sentinel never fetches from the network);
    to use real weights, convert a torchvision checkpoint to safetensors and point
    model.yaml's weights.file at it.
    """
    import torch

    from sentinel.preprocess import Preprocessing
    from sentinel.reference.densenet import ARCHS, DenseNet, resolve_config
    from sentinel.reference.weights import save_weights
    from sentinel.registry import (
        ModelManifest,
        Served,
        TensorSpec,
        WeightsRef,
        open_registry,
        refuse_bundled,
        sha256_file,
        write_manifest,
    )

    if arch not in ARCHS:
        from sentinel.errors import UsageError

        raise UsageError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHS))}")
    reg = open_registry(config, registry)
    name = name or arch
    version = version or f"seed-{seed}"
    out = reg.root / name / version
    refuse_bundled(out, "models init")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = resolve_config(arch, num_classes=num_classes)
    model = DenseNet(cfg).eval()
    w = out / "model.safetensors"
    save_weights(model, w)
    m = ModelManifest(
        name=name, version=version, arch=arch, architecture={"num_classes": num_classes},
        weights=WeightsRef(w.name, sha256_file(w)), input=TensorSpec((cfg.in_channels, 224, 224)),
        classes=tuple(str(i) for i in range(num_classes)), served=Served(name=name, protocol="v2"),
        preprocessing=Preprocessing(scale=1 / 255, resize=(256, 256), crop=(224, 224),
                                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), layout="NHWC"),
        raw_input=TensorSpec((224, 224, 3), "uint8"),
        description=f"{arch} with random weights (seed {seed}); for benchmarks only, not a trained model",
    )
    write_manifest(m, out / "model.yaml")
    typer.echo(f"wrote {out}/model.yaml ({w.stat().st_size / 1e6:.1f} MB of random weights, seed {seed})")


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
