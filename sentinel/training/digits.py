"""Train the bundled digits DenseNet-BC on scikit-learn's handwritten digits.

Reproducible: fixed seeds, single-threaded-deterministic CPU kernels, a recorded split.
The raw server-side input is the 8×8 image of `load_digits().images` (float, 0–16);
preprocessing scales it to 0–1, resizes to 32×32 and normalizes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from sentinel.preprocess import Preprocessing

# Split sizes over the 1,797 digits: train / golden / holdout (disjoint).
N_GOLDEN = 300
N_HOLDOUT = 497
SPLIT_SEED = 20261126

PREPROCESSING = Preprocessing(scale=1 / 16, resize=(32, 32), mean=(0.3,), std=(0.4,), layout="NHW")
CLASSES = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class TrainSettings:
    version: str = "v3"
    epochs: int = 12
    seed: int = 3
    lr: float = 3e-3
    batch_size: int = 64
    growth_rate: int = 12
    block_config: tuple[int, ...] = (4, 4, 4)
    num_init_features: int = 24
    augment: bool = True


PRESETS = {
    "v3": TrainSettings(),
    # An older, weaker version: fewer epochs, narrower, no augmentation.
    "v2": TrainSettings(version="v2", epochs=4, seed=2, growth_rate=8, block_config=(3, 3, 3),
                        num_init_features=16, augment=False),
}


def load_split() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Images (N×8×8 float32, 0–16), labels, and the fixed split as index arrays."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.float32)
    labels = d.target.astype(np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    golden = np.sort(perm[:N_GOLDEN])
    holdout = np.sort(perm[N_GOLDEN:N_GOLDEN + N_HOLDOUT])
    train = np.sort(perm[N_GOLDEN + N_HOLDOUT:])
    return images, labels, {"train": train, "golden": golden, "holdout": holdout}


def _shift_batch(x, rng: np.random.Generator, max_shift: int = 2):
    import torch

    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
        out[i] = torch.roll(x[i], shifts=(dy, dx), dims=(1, 2))
    return out


def train(settings: TrainSettings, out_root: Path, log=print) -> Path:
    """Train, evaluate on the holdout split, and write models/digits/<version>/."""
    import torch
    import torch.nn.functional as F

    from sentinel.reference.densenet import DenseNet, DenseNetConfig
    from sentinel.reference.weights import save_weights
    from sentinel.registry import (
        ModelManifest,
        Served,
        Split,
        TensorSpec,
        WeightsRef,
        sha256_file,
        write_manifest,
    )

    torch.manual_seed(settings.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    rng = np.random.default_rng(settings.seed)
    images, labels, split = load_split()
    x_train = torch.from_numpy(PREPROCESSING.apply(images[split["train"]]))
    y_train = torch.from_numpy(labels[split["train"]])
    x_hold = torch.from_numpy(PREPROCESSING.apply(images[split["holdout"]]))
    y_hold = labels[split["holdout"]]

    cfg = DenseNetConfig(settings.growth_rate, settings.block_config, settings.num_init_features,
                         num_classes=10, in_channels=1, small_inputs=True)
    model = DenseNet(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    steps = settings.epochs * ((len(x_train) + settings.batch_size - 1) // settings.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=max(steps, 1))
    t0 = time.perf_counter()
    for epoch in range(settings.epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(x_train)))
        total = 0.0
        for i in range(0, len(order), settings.batch_size):
            idx = order[i:i + settings.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            if settings.augment:
                xb = _shift_batch(xb, rng)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}/{settings.epochs} loss {total / len(x_train):.4f}")
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.inference_mode():
        pred = model(x_hold).argmax(1).numpy()
    acc = float((pred == y_hold).mean())
    log(f"holdout accuracy {acc:.4f} ({len(y_hold)} images), trained in {train_s:.1f} s")

    out = out_root / "digits" / settings.version
    out.mkdir(parents=True, exist_ok=True)
    wpath = out / "model.safetensors"
    save_weights(model, wpath)
    arch = {k: v for k, v in cfg.to_dict().items()}
    manifest = ModelManifest(
        name="digits",
        version=settings.version,
        arch="densenet_digits",
        architecture={k: arch[k] for k in ("growth_rate", "block_config", "num_init_features", "num_classes",
                                           "in_channels", "small_inputs")},
        weights=WeightsRef(file=wpath.name, sha256=sha256_file(wpath)),
        input=TensorSpec(shape=(1, 32, 32), dtype="float32"),
        raw_input=TensorSpec(shape=(8, 8), dtype="float32"),
        classes=CLASSES,
        served=Served(name="digits", protocol="v2"),
        preprocessing=PREPROCESSING,
        dataset="sklearn.datasets.load_digits",
        metrics={"holdout_accuracy": round(acc, 4), "holdout_count": float(len(y_hold))},
        training={"command": f"sentinel models train-digits --version {settings.version}",
                  "epochs": settings.epochs, "seed": settings.seed, "lr": settings.lr,
                  "batch_size": settings.batch_size, "augment": settings.augment,
                  "train_seconds": round(train_s, 1), "torch": str(torch.__version__)},
        split=Split(train=tuple(int(i) for i in split["train"]), golden=tuple(int(i) for i in split["golden"]),
                    holdout=tuple(int(i) for i in split["holdout"])),
        description=f"DenseNet-BC (k={cfg.growth_rate}, blocks {list(cfg.block_config)}) on 32×32 digits",
    )
    write_manifest(manifest, out / "model.yaml")
    return out


def settings_for(version: str, epochs: int | None = None, seed: int | None = None) -> TrainSettings:
    base = PRESETS.get(version, replace(PRESETS["v3"], version=version))
    if epochs is not None:
        base = replace(base, epochs=epochs)
    if seed is not None:
        base = replace(base, seed=seed)
    return base
