"""`drift check` on an RGB model whose server takes uint8 NHWC images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rgbmodel import MEAN, PRE, STD, rgb_images, tiny_rgb_entry

from sentinel.errors import UsageError
from sentinel.preprocess import Preprocessing

pytestmark = pytest.mark.unit



@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    """A random-weight 3×16×16 DenseNet registered with raw_input uint8 16×16×3, and its golden set."""
    from sentinel.golden import build_golden

    root = tmp_path_factory.mktemp("rgb")
    entry = tiny_rgb_entry(root)
    build_golden(entry, root / "golden_sets" / "rgb" / "v1", ids=np.arange(150), raw=rgb_images(150, 0))
    return root


def _check(root, window: dict, *extra: str):
    from typer.testing import CliRunner

    from sentinel.cli import app

    f = root / "w.npz"
    np.savez(f, **window)
    return CliRunner().invoke(app, ["drift", "check", "--model", "rgb:v1", "--registry", str(root / "models"),
                                    "--golden-root", str(root / "golden_sets"), "--input", str(f), *extra])


def test_clean_network_inputs_do_not_violate_the_wire_dtype(rgb):
    """'inputs' are float32 network tensors whatever the server received: the contract's wire dtype
    check (uint8 for this model) cannot apply. It flagged all of a clean window `input_contract`."""
    res = _check(rgb, {"inputs": PRE.apply(rgb_images(60, 1))}, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout[res.stdout.index("["):] if res.stdout.lstrip().startswith("[") else res.stdout)
    win = doc[0] if isinstance(doc, list) else doc["windows"][0]
    assert win["diagnosis"]["kind"] != "input_contract", win["diagnosis"]
    assert not win["diagnosis"]["contract_violating_share"]


def test_raw_images_in_another_layout_are_refused_naming_it(rgb):
    res = _check(rgb, {"raw": rgb_images(20, 1).transpose(0, 3, 1, 2).copy()})
    assert res.exit_code != 0 and isinstance(res.exception, UsageError), res.output
    msg = str(res.exception)
    assert "N×H×W×C (NHWC)" in msg and "look like N×C×H×W (NCHW) images" in msg, msg   # was: "mean has 3 values for 16 channels"


def test_preprocessing_names_the_layout_of_an_image_with_the_wrong_channel_count():
    with pytest.raises(ValueError, match=r"read as N×C×H×W \(NCHW\) have 16 channels.*look like N×H×W×C \(NHWC\)"):
        Preprocessing(mean=MEAN, std=STD, layout="NCHW").apply(np.zeros((2, 16, 16, 3), np.float32))
