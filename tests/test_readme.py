"""Every ```bash block of README.md runs, verbatim but for port numbers, in a temporary directory.

A block preceded by `<!-- readme-test: skip ... -->` is not run (the set-up commands). The
others run in order, one command at a time, in one temporary directory holding copies of
models/, golden_sets/, examples/, slo.yaml and sentinel.yaml, so later blocks see what
earlier ones started or wrote, as a reader following along in one terminal would. Ports are
moved to free ones (the same substitution in the copied sentinel.yaml). A command ending in
`&` runs in the background until the end; every other command must exit 0. `sentinel` on
PATH is this interpreter's `python -m sentinel`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from servers import free_port
from testpaths import REPO

pytestmark = pytest.mark.slow

SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b")
FENCE = re.compile(r"^```bash\s*$")
PORT = re.compile(r"(?<=localhost:)(\d{4,5})\b|(?<=127\.0\.0\.1:)(\d{4,5})\b|(?<=--port )(\d{4,5})\b"
                  r"|(?<=--grpc-port )(\d{4,5})\b")
# Commands that need a tool the test machine may lack: run only when it is on PATH.
NEEDS = {"sentinel rules test": "promtool"}
COPIED = ("models", "golden_sets", "examples", "slo.yaml", "sentinel.yaml")


def bash_blocks(text: str) -> list[tuple[int, list[str], bool]]:
    """(line number, commands, skipped) of every ```bash block; continuation lines are joined."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            start = i
            skipped = any(SKIP.search(lines[j]) for j in range(max(0, i - 2), i))
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            commands, current = [], ""
            for line in body:
                current += line
                if current.rstrip().endswith("\\"):
                    current = current.rstrip()[:-1] + " "
                    continue
                if current.strip() and not current.strip().startswith("#"):
                    commands.append(current.strip())
                current = ""
            out.append((start + 1, commands, skipped))
        i += 1
    return out


def test_bash_blocks_are_found_and_parsed():
    blocks = bash_blocks((REPO / "README.md").read_text())
    assert blocks[0][2], "the set-up block is marked skip"
    run = [c for _, cmds, skipped in blocks if not skipped for c in cmds]
    assert any(c.startswith("curl") and "--data-binary @examples/request.json" in c for c in run)
    assert any("Inference-Header-Content-Length" in c and "request.bin" in c for c in run)
    assert any(c.startswith("sentinel drift sample") for c in run)


def test_the_documented_binary_header_length_matches_the_file():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_examples
    finally:
        sys.path.pop(0)
    assert make_examples.main(["--check"]) == 0
    readme = (REPO / "README.md").read_text()
    assert f"Inference-Header-Content-Length: {make_examples.header_length()}'" in readme


def _strip_background(cmd: str) -> tuple[str, bool]:
    """The command without a trailing `&` (and its comment), and whether it had one."""
    code = re.sub(r"\s+#[^'\"]*$", "", cmd).rstrip()
    if code.endswith("&") and not code.endswith("&&"):
        return code[:-1].rstrip(), True
    return cmd, False


def test_readme_bash_blocks_run(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for name in COPIED:
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, work / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "sentinel"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m sentinel "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))

    text = (REPO / "README.md").read_text()
    blocks = [(line, cmds) for line, cmds, skipped in bash_blocks(text) if not skipped]
    ports: dict[str, str] = {}

    def move_ports(s: str) -> str:
        def sub(m: re.Match) -> str:
            old = m.group(0)
            return ports.setdefault(old, str(free_port()))
        return PORT.sub(sub, s)

    config = work / "sentinel.yaml"
    config.write_text(move_ports(config.read_text()))
    background: list[tuple[str, subprocess.Popen]] = []
    logs = tmp_path / "logs"
    logs.mkdir()
    ran = 0
    try:
        for line, cmds in blocks:
            for raw in cmds:
                cmd, bg = _strip_background(move_ports(raw))
                need = next((tool for prefix, tool in NEEDS.items() if cmd.startswith(prefix)), None)
                if need and shutil.which(need) is None:
                    continue
                if bg:
                    log = (logs / f"bg{len(background)}.log").open("wb")
                    proc = subprocess.Popen(["bash", "-c", cmd], cwd=work, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
                    background.append((cmd, proc))
                    continue
                r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=work, env=env, capture_output=True,
                                   text=True, timeout=600)
                ran += 1
                bg_logs = "\n".join(f"--- {c}\n{(logs / f'bg{i}.log').read_text()[-2000:]}"
                                    for i, (c, _) in enumerate(background))
                assert r.returncode == 0, (f"README.md block at line {line}: `{raw}` exited {r.returncode}\n"
                                           f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}\n{bg_logs}")
                if cmd.startswith("curl") and "/infer" in cmd:
                    assert '"outputs"' in r.stdout, r.stdout
        for cmd, proc in background:
            assert proc.poll() is None, f"`{cmd}` exited {proc.returncode} before the end"
    finally:
        for _, proc in background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in background:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    assert ran >= 10
