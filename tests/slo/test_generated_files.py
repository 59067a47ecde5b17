"""The committed rules/, dashboards/ and PrometheusRule are exactly what the generators make from slo.yaml.

Set SENTINEL_UPDATE_GOLDEN=1 to rewrite them instead of failing (or run the commands in
the failure message).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sentinel.cli import app

REPO = Path(__file__).resolve().parents[2]
UPDATE = os.environ.get("SENTINEL_UPDATE_GOLDEN") == "1"
HINT = ("regenerate with `sentinel rules generate --slo slo.yaml -o rules/` and "
        "`sentinel dashboards generate --slo slo.yaml -o dashboards/` (or SENTINEL_UPDATE_GOLDEN=1), "
        "then review and commit the diff")


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    runner = CliRunner()
    args = ["rules", "generate", "--slo", str(REPO / "slo.yaml"), "-o", str(out / "rules"),
            "--prometheusrule", str(out / "deploy/k8s/prometheusrule.yaml")]
    if UPDATE:
        args = args[:4] + ["-o", str(REPO / "rules"), "--prometheusrule",
                           str(REPO / "deploy/k8s/prometheusrule.yaml")]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    target = REPO / "dashboards" if UPDATE else out / "dashboards"
    res = runner.invoke(app, ["dashboards", "generate", "--slo", str(REPO / "slo.yaml"), "-o", str(target)])
    assert res.exit_code == 0, res.output
    return REPO if UPDATE else out


@pytest.mark.parametrize("sub", ["rules", "dashboards"])
def test_committed_directory_matches_the_generator(generated, sub):
    fresh, committed = _tree(generated / sub), _tree(REPO / sub)
    assert sorted(fresh) == sorted(committed), f"files differ in {sub}/: {HINT}"
    for name, text in fresh.items():
        assert committed[name] == text, f"{sub}/{name} is stale: {HINT}"


def test_committed_prometheusrule_matches_the_generator(generated):
    rel = "deploy/k8s/prometheusrule.yaml"
    assert (REPO / rel).read_text() == (generated / rel).read_text(), f"{rel} is stale: {HINT}"
