"""Self-check pieces that need no GPU: parsing, comparison, the table, refusing to run without a GPU."""

from __future__ import annotations

import pytest
from gpu_fakes import FakeNvml

from sentinel.gpu import selfcheck as sc

MIB = 1 << 20


def _device(used_mib: int, total_mib: int, reserved_mib: int | None = 0) -> dict:
    return {"gpu": "0", "uuid": "GPU-1", "mig_parent": None,
            "memory": {"used_bytes": used_mib * MIB, "total_bytes": total_mib * MIB, "free_bytes": 0,
                       "reserved_bytes": None if reserved_mib is None else reserved_mib * MIB}}


def test_parse_smi_csv():
    rows = sc.parse_smi_csv("0, GPU-1, 1024, 81559\n1, GPU-2, 0, 81559\n")
    assert rows[1] == {"index": 1, "uuid": "GPU-2", "used_mib": 0, "total_mib": 81559}
    with pytest.raises(ValueError, match="unexpected nvidia-smi line"):
        sc.parse_smi_csv("0, GPU-1, 1024")


def test_compare_smi_pass_fail_and_reserved_note():
    smi = [{"index": 0, "uuid": "GPU-1", "used_mib": 1000, "total_mib": 81559}]
    assert sc.compare_smi([_device(1010, 81559)], smi)[0].ok is True
    assert sc.compare_smi([_device(5000, 81559)], smi)[0].ok is False
    assert sc.compare_smi([_device(1000, 80000)], smi)[0].ok is False
    small = [{"index": 0, "uuid": "GPU-1", "used_mib": 1000, "total_mib": 8000}]
    row = sc.compare_smi([_device(400, 8000, reserved_mib=600)], small)[0]
    assert row.ok is True and "reserved" in row.note
    assert sc.compare_smi([dict(_device(1, 2), uuid="GPU-9")], smi)[0].ok is False


def test_table_has_one_row_per_check():
    rows = [sc.Row("a", "1", "2", True), sc.Row("bb", "3", "4", False, "why"), sc.Row("c", "-", "-", None)]
    text = sc.table(rows).splitlines()
    assert text[0].split() == ["check", "measured", "expected", "result", "note"]
    assert [line.split()[3] for line in text[2:]] == ["PASS", "FAIL", "skip"]


def test_refuses_to_run_without_a_gpu():
    with pytest.raises(sc.NoGpu, match="no NVIDIA GPU is visible .* did not run"):
        sc.run(FakeNvml(unavailable="library_not_found"), log=lambda s: None)
    with pytest.raises(sc.NoGpu, match="reports no GPU"):
        sc.run(FakeNvml([]), log=lambda s: None)


def test_output_check_runs_end_to_end_with_cpu_standing_in_for_cuda():
    rows = sc.check_outputs(device="cpu", limit=4)
    assert [r.ok for r in rows[:2]] == [True, True]
    assert rows[0].measured == "0.00e+00"
    if (sc.GOLDEN_DIR).is_dir():  # the digits golden set is in the checkout
        assert "golden set" in rows[0].note and rows[0].note.startswith("4 inputs")


def test_estimator_check_rows_with_an_injected_measurement():
    from sentinel.gpu.measure import Measured
    from sentinel.gpu.memory import estimate

    def fake_measure(cfg, *, batch, resolution, training):
        e = estimate(cfg, batch=batch, resolution=resolution, training=training, backend="cuda")
        return Measured(int(e.activation_peak_bytes * (1.2 if batch == 16 else 1.0)), 0)

    rows = sc.check_estimator(batches=(1, 16), resolution=64, measure=fake_measure)
    assert [r.ok for r in rows] == [True, False, True, False]
    assert rows[1].note == "error -16.7%"
