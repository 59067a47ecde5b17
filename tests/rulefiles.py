"""Helpers for tests that run `promtool test rules` on a copy of a rules directory."""

from __future__ import annotations

from pathlib import Path

import yaml


def keep_test_groups(rules_dir: Path, name_prefix: str) -> list[str]:
    """Keep only the test groups whose name starts with `name_prefix` in every tests/*.test.yml.

    The full generated suite takes ~20 s of promtool on an idle core; tests about one alert or
    about the CLI's path handling need one group. Returns the names kept (never empty).
    """
    kept: list[str] = []
    for path in sorted((rules_dir / "tests").glob("*.test.yml")):
        doc = yaml.safe_load(path.read_text())
        doc["tests"] = [t for t in doc["tests"] if t.get("name", "").startswith(name_prefix)]
        kept += [t["name"] for t in doc["tests"]]
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert kept, f"no test group named {name_prefix!r}... in {rules_dir}/tests"
    return kept
