"""Write the generated artifacts (rule files, promtool tests, PrometheusRule) to disk, and run promtool."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sentinel.errors import CheckFailed, InfrastructureError, UsageError
from sentinel.slo.model import RuleFile, dump_yaml
from sentinel.slo.rules import generate_rule_files
from sentinel.slo.spec import SloFile
from sentinel.slo.unittests import GeneratedTests, Pins, generate_tests

TESTS_DIR = "tests"
PROMETHEUSRULE_NAME = "sentinel-slo"


@dataclass(frozen=True)
class RulesOutput:
    """What `write_rules` wrote."""

    paths: tuple[Path, ...]
    pins: tuple[Pins, ...]


def prometheus_rule(files: tuple[RuleFile, ...], spec: SloFile) -> str:
    """A prometheus-operator PrometheusRule holding exactly the groups of the rule files."""
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": PROMETHEUSRULE_NAME,
            "labels": {"app.kubernetes.io/name": "sentinel", "app.kubernetes.io/component": "slo-rules",
                       "release": "prometheus"},
        },
        "spec": {"groups": [g.as_dict() for f in files for g in f.groups]},
    }
    return files[0].header + dump_yaml(doc)


def render_rules(spec: SloFile) -> tuple[tuple[RuleFile, ...], GeneratedTests]:
    files = generate_rule_files(spec)
    return files, generate_tests(spec, files)


def write_rules(spec: SloFile, out_dir: Path, prometheusrule: Path | None) -> RulesOutput:
    """Write rule files to `out_dir`, their promtool tests to `out_dir/tests`, and the PrometheusRule."""
    files, tests = render_rules(spec)
    written: list[Path] = []
    for f in files:
        written.append(write_file(out_dir / f.filename, f.render()))
    written.append(write_file(out_dir / TESTS_DIR / tests.filename, tests.text))
    if prometheusrule is not None:
        written.append(write_file(prometheusrule, prometheus_rule(files, spec)))
    return RulesOutput(tuple(written), tests.pins)


def write_file(path: Path, text: str) -> Path:
    """Write `text` to `path`, making its folders; UsageError (exit 2) when that cannot be done."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except FileExistsError as exc:  # --out (or a folder above it) names a file
        raise UsageError(f"cannot write {path}: {exc.filename} is a file, not a directory") from None
    except OSError as exc:  # a read-only place, no permission...
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def find_promtool() -> str:
    """Path of promtool, or InfrastructureError saying how to get it."""
    found = shutil.which("promtool")
    if not found:
        raise InfrastructureError(
            "promtool not found on PATH: install it (Debian/Ubuntu: `apt-get install prometheus`; "
            "or unpack a release from https://prometheus.io/download/) and run again")
    return found


def promtool(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run promtool; output is captured and returned, failures are the caller's to judge."""
    try:
        return subprocess.run([find_promtool(), *args], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise InfrastructureError(f"promtool {' '.join(args)} took longer than {timeout:.0f}s") from exc


def check_rules(rule_dir: Path) -> str:
    """`promtool check rules` on every rule file in `rule_dir`; CheckFailed with its output."""
    files = sorted(str(p) for p in rule_dir.glob("*.yml"))
    if not files:
        raise InfrastructureError(f"no rule files (*.yml) in {rule_dir}")
    proc = promtool("check", "rules", *files)
    if proc.returncode != 0:
        raise CheckFailed(f"promtool check rules failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def test_rules(rule_dir: Path) -> str:
    """`promtool test rules` on the generated tests in `rule_dir/tests`; CheckFailed with its output."""
    tests = sorted(str(p.resolve()) for p in (rule_dir / TESTS_DIR).glob("*.yml"))
    if not tests:
        raise InfrastructureError(f"no promtool tests in {rule_dir / TESTS_DIR}; run `sentinel rules generate` first")
    proc = promtool("test", "rules", *tests, cwd=rule_dir / TESTS_DIR)
    if proc.returncode != 0:
        raise CheckFailed(f"promtool test rules failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr
