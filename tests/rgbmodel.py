"""A tiny RGB model for tests: a random-weight 3×16×16 DenseNet whose server takes uint8 16×16×3
(NHWC) images, ImageNet-normalised, 5 classes, registered under `root/models/rgb/v1`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sentinel.preprocess import Preprocessing

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PRE = Preprocessing(scale=1 / 255, mean=MEAN, std=STD, layout="NHWC")


def tiny_rgb_entry(root: Path):  # noqa: ANN201 - a registry entry
    import torch

    from sentinel.reference.arch import resolve_config
    from sentinel.reference.densenet import DenseNet
    from sentinel.reference.weights import save_weights
    from sentinel.registry import (
        ModelManifest,
        Registry,
        Served,
        TensorSpec,
        WeightsRef,
        sha256_file,
        write_manifest,
    )

    arch = {"growth_rate": 4, "block_config": [1, 1], "num_init_features": 8, "num_classes": 5,
            "in_channels": 3, "small_inputs": True}
    out = root / "models" / "rgb" / "v1"
    out.mkdir(parents=True)
    torch.manual_seed(0)
    w = out / "model.safetensors"
    save_weights(DenseNet(resolve_config("densenet_digits", **arch)).eval(), w)
    write_manifest(ModelManifest(
        name="rgb", version="v1", arch="densenet_digits", architecture=arch, weights=WeightsRef(w.name, sha256_file(w)),
        input=TensorSpec((3, 16, 16)), classes=("a", "b", "c", "d", "e"), served=Served("rgb", "v2"),
        preprocessing=PRE, raw_input=TensorSpec((16, 16, 3), "uint8")), out / "model.yaml")
    return Registry(root / "models").resolve("rgb:v1")


def rgb_images(n: int, seed: int = 0) -> np.ndarray:
    """n warm-toned uint8 16×16×3 images (unequal channel means, so a channel swap shows)."""
    r = np.random.default_rng(seed)
    return np.clip(r.normal([120, 90, 60], 40, (n, 16, 16, 3)), 0, 255).astype(np.uint8)
