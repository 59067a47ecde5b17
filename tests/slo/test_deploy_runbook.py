"""deploy/RUNBOOK.md is what on-call reads at 3 a.m.: everything it names must exist.

* every alert of rules/*.yml has a section, and each alert's runbook_url anchor is a heading's;
* the ports it names are the ports deploy/k8s listens on (no `9090` where the admin port is 9464);
* each metric name is one sentinel exports; each dotted reference is a configuration key
  (sentinel/config.py) or a field of the `/status` or `/readyz` document of a real running
  `sentinel run`; each `sentinel <command> --option` is an option of that command;
* it opens with the triage that tells "the model server is down" from "the model is bad" from
  "sentinel is wrong", before any alert's section.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import typing
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from servers import free_port, stop_process

from sentinel import config as config_mod
from sentinel import metricnames

REPO = Path(__file__).resolve().parents[2]
TEXT = (REPO / "deploy/RUNBOOK.md").read_text()
SENTINEL = Path(sys.executable).with_name("sentinel")


def _alerts() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in sorted((REPO / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    out.setdefault(rule["alert"], set()).add(rule.get("annotations", {}).get("runbook_url", ""))
    return out


def _sections() -> list[str]:
    return [line[3:].strip() for line in TEXT.splitlines() if line.startswith("## ")]


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
    return s


def _every_alert_has_a_section_and_its_runbook_url_anchor_exists():
    alerts = _alerts()
    anchors = {_slug(h) for h in _sections()}
    assert set(alerts) <= set(_sections())
    for name, urls in alerts.items():
        for url in urls - {""}:
            assert url.partition("#")[2] in anchors, f"{name}: {url} points at no heading"


def _deployed_ports() -> set[int]:
    ports: set[int] = set()
    for path in (REPO / "deploy/k8s").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc["kind"] != "Deployment":
                continue
            for c in doc["spec"]["template"]["spec"]["containers"]:
                ports |= {p["containerPort"] for p in c.get("ports", [])}
                args = c.get("args", [])
                ports |= {int(args[i + 1]) for i, a in enumerate(args) if a in ("--port", "--grpc-port")}
    return ports


def test_runbook_names_only_the_deployed_ports():
    deployed = _deployed_ports()
    assert {8080, 8001, 9464, 8081, 8082} <= deployed
    named = {int(m) for m in re.findall(r"(?:\bports?\s+|:)(\d{4,5})\b", TEXT)}
    named |= {int(m) for m in re.findall(r"\b(\d{4,5})\b(?=[^\n]*\bport)", TEXT) if 1024 <= int(m) <= 65535}
    assert named - deployed == set(), f"ports the runbook names that nothing listens on: {named - deployed}"


def _get(url: str) -> dict:
    try:
        return json.loads(urllib.request.urlopen(url, timeout=3).read())
    except urllib.error.HTTPError as exc:   # /readyz is 503 without a model server
        return json.loads(exc.read())


@pytest.fixture(scope="module")
def live_documents(tmp_path_factory):
    """/status and /readyz of a real `sentinel run` (no model server behind it)."""
    tmp = tmp_path_factory.mktemp("runbook")
    admin, listen, upstream = free_port(), free_port(), free_port()
    cfg = tmp / "sentinel.yaml"
    cfg.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{listen}", "upstream": f"http://127.0.0.1:{upstream}",
        "admin": f"127.0.0.1:{admin}", "registry": str(REPO / "models"), "golden_sets": str(REPO / "golden_sets"),
        "default_model": "digits",
        "models": [{"name": "digits", "version": "v3", "endpoint": f"http://127.0.0.1:{upstream}"}]}))
    proc = subprocess.Popen([str(SENTINEL), "run", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "XDG_CACHE_HOME": str(tmp / "cache")})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status = _get(f"http://127.0.0.1:{admin}/status")
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "sentinel run did not start"
                time.sleep(0.1)
        readyz = _get(f"http://127.0.0.1:{admin}/readyz")
        yield status, readyz
    finally:
        stop_process(proc, grace=15)


def _config_has(path: list[str]) -> bool:
    cls: typing.Any = config_mod.Config
    for seg in path:
        many = seg.endswith("[]")
        seg = seg.removesuffix("[]")
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if seg not in hints:
            return False
        cls = hints[seg]
        args = [a for a in typing.get_args(cls) if a is not type(None) and a is not Ellipsis]
        if many or (typing.get_origin(cls) is not None and args):
            cls = args[0] if args else cls
    return True


def _status_has(path: list[str], status: dict, readyz: dict) -> bool:
    monitor_src = (REPO / "sentinel/analysis/monitor.py").read_text()
    for doc in (status, readyz):
        node: typing.Any = doc
        for i, seg in enumerate(path):
            if seg == "<model>":
                if not isinstance(node, dict):
                    break
                if "digits" in node:
                    node = node["digits"]
                    continue
                if path[i - 1] == "last_results":
                    # no analysis has run yet: a model's entry is ModelMonitor/RefusedMonitor.status()
                    if all(f'"{s}"' in monitor_src for s in path[i + 1:]):
                        return True
                break
            if not isinstance(node, dict) or seg not in node:
                break
            node = node[seg]
        else:
            return True
    return False


def test_runbook_references_exist(live_documents):
    _every_alert_has_a_section_and_its_runbook_url_anchor_exists()
    status, readyz = live_documents
    code = re.findall(r"`([^`\n]+)`", TEXT)
    problems = []
    # metric names
    exported = set()
    for m in metricnames.METRICS:
        exported |= {m.name, m.sample_name, m.name + "_total", m.name + "_count", m.name + "_sum", m.name + "_created"}
    for name in set(re.findall(r"(?<![:\w])(sentinel_[a-z0-9_]+)", TEXT)):
        if name not in exported:
            problems.append(f"metric {name} is not exported (sentinel/metricnames.py)")
    # dotted references: configuration keys or /status, /readyz fields
    for token in code:
        if not re.fullmatch(r"[a-z_]+(\[\])?(\.(<model>|[a-z_0-9]+(\[\])?))+", token):
            continue
        path = token.split(".")
        if not (_config_has(path) or _status_has(path, status, readyz)):
            problems.append(f"`{token}` is neither a configuration key nor a /status or /readyz field")
    # top-level /readyz and /status fields quoted as JSON keys (`upstream`, `grpc_upstream`, ...)
    for field in ("upstream", "grpc_upstream"):
        if f"`{field}`" in TEXT:
            assert field in readyz or field == "grpc_upstream", field
    assert not problems, "\n".join(problems)


def test_runbook_commands_and_options_exist():
    joined = re.sub(r"\\\n\s*", " ", TEXT)
    uses: dict[str, set[str]] = {}
    for m in re.finditer(r"(?:`|-- |^\s*)sentinel ([a-z]+)((?: +(?:--?[a-z][\w-]*|[^\s`]+))*)", joined, re.M):
        uses.setdefault(m.group(1), set()).update(re.findall(r"(?<!\S)(--[a-z][\w-]*)", m.group(2)))
    assert "replay" in uses
    for cmd, options in uses.items():
        proc = subprocess.run([str(SENTINEL), cmd, "--help"], capture_output=True, text=True,
                              env={**os.environ, "COLUMNS": "250", "NO_COLOR": "1"})
        assert proc.returncode == 0, f"`sentinel {cmd}` is not a command: {proc.stdout}{proc.stderr}"
        for opt in options:
            assert re.search(rf"{re.escape(opt)}\b", proc.stdout), f"`sentinel {cmd}` has no option {opt}"


def test_runbook_opens_with_triage_of_model_server_model_and_sentinel():
    first_alert = min(TEXT.index(f"## {a}") for a in _alerts())
    head = TEXT[:first_alert]
    triage = [h for h in _sections() if TEXT.index(f"## {h}") < first_alert]
    assert triage, "no section before the alerts' tells on-call where to start"
    for needle in ("/readyz", "model server", "sentinel replay", "--target http://127.0.0.1:8081",
                   "--target http://127.0.0.1:8080", "kubectl logs", "up{job=\"sentinel\"}",
                   "sentinel_proxy_errors_total"):
        assert needle in head, f"the triage does not mention {needle}"
    # the model server's direct replay goes to the port the model server listens on
    assert 8081 in _deployed_ports()
