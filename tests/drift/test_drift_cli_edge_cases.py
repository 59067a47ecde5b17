"""`drift check` inputs and golden sets at their edges: forged array headers, windows that expand past
the memory bound, golden sets too small for the detectors."""

from __future__ import annotations

import io
import shutil
import zipfile

import numpy as np
import pytest
from numpy.lib import format as npformat

from sentinel.errors import UsageError
from sentinel.golden import read_arrays

pytestmark = pytest.mark.unit


def _npy(shape, dtype="<f4", payload=b"") -> bytes:
    b = io.BytesIO()
    npformat.write_array_header_1_0(b, {"descr": dtype, "fortran_order": False, "shape": shape})
    return b.getvalue() + payload


@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_forged_header_declaring_petabytes_is_refused_before_allocating(tmp_path, suffix):
    p = tmp_path / f"w{suffix}"
    data = _npy((2**40, 1, 32, 32))
    if suffix == ".npz":
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("inputs.npy", data)
    else:
        p.write_bytes(data)
    # was: numpy's MemoryError ("Unable to allocate 4.00 PiB") as a traceback
    with pytest.raises(UsageError, match=r"header declares 4,503,599,627,370,496 bytes .* holds 0"):
        read_arrays(p, f"--input {p.name}")


def test_object_array_in_a_directory_is_refused(tmp_path):
    np.save(tmp_path / "inputs.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UsageError, match="Object arrays cannot be loaded without pickle"):
        read_arrays(tmp_path, "--from dir")


def test_raw_window_that_expands_past_the_bound_is_refused(tmp_path, monkeypatch):
    """8×8 raw digits are 1/16 of the 32×32 float32 network inputs: the bound applies to those."""
    from typer.testing import CliRunner

    import sentinel.golden as golden
    from sentinel.cli import app

    f = tmp_path / "w.npz"
    np.savez(f, raw=np.zeros((100, 8, 8), np.float32))         # 25.6 kB raw, 409.6 kB of network inputs
    monkeypatch.setattr(golden, "MAX_ARRAY_FILE_BYTES", 100_000)
    res = CliRunner().invoke(app, ["drift", "check", "--model", "digits:v3", "--input", str(f)])
    assert res.exit_code != 0
    assert isinstance(res.exception, UsageError), res.output   # was: preprocessed (16× the bound) and run
    assert "array 'raw' makes" in str(res.exception) and "split it" in str(res.exception)


def test_golden_set_too_small_for_the_detectors_is_a_usage_error(tmp_path, digits_v3, digits_golden):
    from sentinel.drift import Reference
    from sentinel.golden import build_golden

    g = build_golden(digits_v3, tmp_path / "g", ids=np.arange(3), raw=np.asarray(digits_golden.raw[:3]))
    with pytest.raises(UsageError, match="3 samples; the drift detectors need a golden set of at least 10"):
        Reference.from_golden(g)   # was: ValueError from the PCA fit, as a traceback
    shutil.rmtree(tmp_path / "g")
