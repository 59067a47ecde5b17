"""`sentinel golden build|check|show`: golden sets."""

from __future__ import annotations

import json
from pathlib import Path

import typer

golden_app = typer.Typer(help="Build, check and inspect golden sets.", no_args_is_help=True)


@golden_app.command("build")
def build(
    model: str = typer.Option(..., "--model", "-m", help="Model spec: v3, digits:v3 or digits."),
    source: str = typer.Option(..., "--from",
                               help="An .npz/.npy file or directory with 'raw' or 'inputs' (and optional "
                                    "'labels', 'ids'), or 'sklearn-digits' to use the model's recorded split."),
    split: str = typer.Option("golden", "--split", help="With --from sklearn-digits: which split."),
    count: int | None = typer.Option(None, "--count", min=1, help="Use the first N samples."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Default: golden_sets/<model>/<version>."),
    golden_root: Path = typer.Option(Path("golden_sets"), "--golden-root"),
    registry: Path | None = typer.Option(None, "--registry"),
    config: Path | None = typer.Option(None, "--config", "-c"),
) -> None:
    """Compute reference outputs for inputs and write a golden set with its sha256 manifest."""
    import numpy as np

    from sentinel.errors import UsageError
    from sentinel.golden import build_golden, golden_path, load_source
    from sentinel.registry import open_registry

    entry = open_registry(config, registry).resolve(model)
    if source == "sklearn-digits":
        from sentinel.training.digits import load_split

        if entry.manifest.split is None:
            raise UsageError(f"{entry.manifest_path}: split: no recorded split to build from")
        if split == "train":
            raise UsageError("--split train: golden sets never use training data")
        idx = np.asarray(getattr(entry.manifest.split, split, None) or (), np.int64)
        if idx.size == 0:
            raise UsageError(f"--split {split!r}: not a recorded split (golden or holdout)")
        images, labels, _ = load_split()
        arrays = {"raw": images[idx], "labels": labels[idx], "ids": idx}
        desc = f"sklearn.datasets.load_digits split={split}"
    else:
        arrays = load_source(source)
        desc = str(source)
    n = len(arrays.get("raw", arrays.get("inputs")))
    if count is not None:
        n = min(n, count)
        arrays = {k: v[:n] for k, v in arrays.items()}
    ids = arrays.get("ids", np.arange(n, dtype=np.int64))
    from sentinel.registry import refuse_bundled

    target = out or golden_path(golden_root, entry)
    refuse_bundled(target, "golden build")
    g = build_golden(entry, target, ids=ids, inputs=arrays.get("inputs"),
                     raw=arrays.get("raw"), labels=arrays.get("labels"), source=desc)
    acc = ""
    if g.labels is not None:
        acc = f", reference accuracy {(g.probabilities.argmax(1) == g.labels).mean():.4f}"
    typer.echo(f"wrote {g.path} ({len(g)} samples of {entry.spec}{acc})")


@golden_app.command("check")
def check(path: Path = typer.Argument(..., help="Golden set directory.")) -> None:
    """Exit 0 when every digest, shape and dtype matches the manifest; 1 naming each bad file."""
    from sentinel.golden import check_golden

    problems = check_golden(path)
    if problems:
        for p in problems:
            typer.echo(p, err=True)
        raise typer.Exit(1)
    typer.echo(f"{path}: ok")


@golden_app.command("show")
def show(
    path: Path = typer.Argument(..., help="Golden set directory."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Describe a golden set: model, count, files, tolerance, label balance."""
    import dataclasses

    import numpy as np

    from sentinel.golden import check_golden, load_golden

    problems = check_golden(path)
    g = load_golden(path, check=False)
    files = _listed_files(path) if not any("manifest.json" in p for p in problems) else {}
    info = {
        "path": str(g.path), "model": g.meta.model, "version": g.meta.version, "count": g.meta.count,
        "source": g.meta.source, "created": g.meta.created, "intact": not problems, "problems": problems,
        "tolerance": dataclasses.asdict(g.meta.tolerance), "files": files,
    }
    if g.labels is not None and not problems:
        info["labels"] = {str(k): int(v) for k, v in zip(*np.unique(g.labels, return_counts=True), strict=False)}
        info["reference_accuracy"] = float((g.probabilities.argmax(1) == g.labels).mean())
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"{info['path']}: {g.meta.model}:{g.meta.version}, {g.meta.count} samples, "
               f"{'intact' if not problems else 'FAILS CHECK'}")
    typer.echo(f"  source: {g.meta.source}  created: {g.meta.created}")
    for name, f in sorted(files.items()):
        typer.echo(f"  {name:<20} {str(f.get('shape')):<18} {str(f.get('dtype')):<8} {str(f.get('sha256'))[:16]}…")
    if "reference_accuracy" in info:
        typer.echo(f"  reference accuracy on labels: {info['reference_accuracy']:.4f}")
    typer.echo(f"  tolerance: {info['tolerance']}")
    for p in problems:
        typer.echo(f"  problem: {p}")


def _listed_files(path: Path) -> dict:
    """manifest.json's `files` entries that are mappings (what `show` can print), else nothing."""
    from sentinel.errors import UsageError
    from sentinel.golden import _read_manifest

    try:
        files = _read_manifest(Path(path)).get("files")
    except UsageError:
        return {}
    return {str(k): v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


def register(app: typer.Typer) -> None:
    app.add_typer(golden_app, name="golden")
