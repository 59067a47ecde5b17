"""Every ```bash block of README.md runs, verbatim but for port numbers, in a temporary directory.

A block preceded by `<!-- readme-test: skip ... -->` is not run (the set-up commands). The
others run in order, one command at a time, in one temporary directory holding copies of
models/, golden_sets/, examples/, slo.yaml and sentinel.yaml, so later blocks see what
earlier ones started or wrote, as a reader following along in one terminal would. Ports are
moved to free ones (the same substitution in the copied sentinel.yaml). A command ending in
`&` runs in the background until the end; every other command must exit 0. `sentinel` on
PATH is this interpreter's `python -m sentinel`. A bash block followed directly by an output
block (a plain ``` fence not starting with `$`) must print that output's shape: the same lines
in the same order, each with the same leading words and `key=` fields, numbers aside.

The fast tests below hold the README's other concrete claims to the code: every `sentinel`
command line names only flags the command has, every metric, label and label value named
in the prose exists, every config key exists with the default the README gives, every
repository path exists, every alert and recording rule named is in rules/, the gRPC
code-label table is the proxy's mapping, the `config check` example is what the command
prints, and `sentinel.yaml` shows the defaults.
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


def expected_output(text: str, line: int) -> list[str] | None:
    """The output block right after the bash block that starts at `line` (1-based), if any.

    An output block is a plain ``` fence following the bash block with only blank lines
    between, whose first line is not a `$ command` transcript.
    """
    lines = text.splitlines()
    i = line  # the line after the opening fence
    while i < len(lines) and lines[i].strip() != "```":
        i += 1
    i += 1
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i >= len(lines) or lines[i].strip() != "```":
        return None
    body = []
    i += 1
    while i < len(lines) and lines[i].strip() != "```":
        body.append(lines[i])
        i += 1
    if not body or body[0].startswith("$"):
        return None
    return body


NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")


def output_shape(lines: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """Each non-empty line as (its first two words, its `key=` fields), numbers masked."""
    shape = []
    for line in lines:
        if not line.strip():
            continue
        masked = NUMBER.sub("#", line)
        shape.append((" ".join(masked.split()[:2]), tuple(sorted(set(re.findall(r"([A-Za-z_]+)=", masked))))))
    return shape


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


@pytest.mark.slow
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
            printed: list[str] = []
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
                printed += r.stdout.splitlines()
            expected = expected_output(text, line)
            if expected is not None:
                assert output_shape(printed) == output_shape(expected), (
                    f"README.md block at line {line}: the output shown below it is not what the commands print "
                    f"(lines, leading words and key= fields, numbers aside); they printed:\n" + "\n".join(printed))
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


# --- The README's other concrete claims, held to the code (fast: no servers) ---------------------

README = REPO / "README.md"


def _readme() -> str:
    return README.read_text()


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _cli():
    import typer.main

    from sentinel.cli import app

    return typer.main.get_command(app)


def _options(cmd) -> set[str]:
    names = {"--help", "-h"}
    for p in cmd.params:
        names.update(o for o in (*p.opts, *getattr(p, "secondary_opts", ())) if o.startswith("-"))
    return names


def _command_lines(text: str) -> list[str]:
    """Every `sentinel ...` command line the README shows: in inline code and in code blocks."""
    found = [m.group(1) for m in re.finditer(r"`(sentinel [^`]+)`", text)]
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            found += [m.group(1) for m in re.finditer(r"(?:^\s*|\$ |&& |\.venv/bin/)(sentinel(?: [^#&|]*)?)", line)]
    return found


def test_every_flag_of_a_sentinel_command_line_exists():
    root = _cli()
    text = _readme()
    lines = _command_lines(text)
    assert len(lines) > 30
    wrong = []
    for cmdline in lines:
        words = cmdline.split()
        cmd, i = root, 1
        while i < len(words) and getattr(cmd, "commands", None) and words[i] in cmd.commands:
            cmd, i = cmd.commands[words[i]], i + 1
        if cmd is root:
            continue
        known = _options(cmd)
        for word in words[i:]:
            flag = word.strip("[]()").split("=")[0]
            if flag.startswith("-") and not NUMBER.fullmatch(flag) and flag != "..." and flag not in known:
                wrong.append(f"`{cmdline.strip()}`: {flag} (known: {', '.join(sorted(known))})")
    assert not wrong, "README names flags its commands do not have:\n" + "\n".join(wrong)


def _metrics() -> dict:
    from sentinel import metricnames as mn

    exposed = {}
    for m in mn.METRICS:
        if m.kind == "counter":
            names = [m.name + "_total"]
        elif m.kind == "histogram":
            names = [m.name + s for s in ("", "_bucket", "_count", "_sum")]
        else:
            names = [m.sample_name]
        exposed.update(dict.fromkeys(names, m))
    return exposed


def test_every_metric_label_and_label_value_in_the_prose_exists():
    from sentinel.docs import BEGIN, END

    text = _readme()
    prose = text.split(BEGIN)[0] + text.split(END)[1]
    exposed = _metrics()
    source = "\n".join(p.read_text() for p in (REPO / "sentinel").rglob("*.py"))
    wrong = []
    found = list(re.finditer(r"(?<![\w:])(sentinel_[a-z0-9_]+)(?:\{([^}]*)\})?", prose))
    assert len(found) > 30
    for m in found:
        name, labels = m.group(1), m.group(2)
        where = f"line {_line_of(prose, m.start())}: {m.group(0)}"
        if name not in exposed:
            wrong.append(f"{where}: no metric {name} in sentinel.metricnames")
            continue
        for part in re.split(r",\s*", labels or ""):
            label = re.split(r"[=!~]", part)[0].strip()
            if label and label not in exposed[name].labels:
                wrong.append(f"{where}: {name} has no label {label!r} (labels: {exposed[name].labels})")
            value = re.match(r'\s*\w+\s*=~?\s*"?([\w|.\-]+)"?', part)
            for v in (value.group(1).split("|") if value else ()):
                if v not in ("5..", "digits") and not re.search(rf"[\"']{re.escape(v)}[\"']", source):
                    wrong.append(f"{where}: label value {v!r} appears nowhere in sentinel/")
    assert not wrong, "\n".join(wrong)


# README names for numbers with units, as config defaults are written there.
_UNITS = {"s": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def _readme_value(text: str):
    """A default as the README writes it: `30`, `120 s`, `4 GiB`, `64 MiB`, `null (off)`, `http`;
    `...` (not a value) for anything else, such as `max(16.8 Mpx, ...)` or `0.01 in the demo`."""
    m = re.fullmatch(r"([\d,]*\.?\d+)(?: (s|KiB|MiB|GiB))?(?:[:,].*)?", text.strip())
    if m:
        return float(m.group(1).replace(",", "")) * _UNITS.get(m.group(2) or "s", 1)
    m = re.fullmatch(r"(null|[a-z_]+)(?: \(off\))?", text.strip())
    if m:
        return None if m.group(1) == "null" else m.group(1)
    return ...


def _config_defaults() -> dict[str, list[tuple[str, object]]]:
    """Field name → [(section, default)] over the config: top level, `models[]` and each section."""
    import dataclasses

    from sentinel import config as C

    out: dict[str, list[tuple[str, object]]] = {}
    for f in dataclasses.fields(C.Config):
        if f.default_factory is not dataclasses.MISSING:
            for g in dataclasses.fields(f.default_factory()):
                out.setdefault(g.name, []).append((f.name, getattr(f.default_factory(), g.name)))
        elif f.name not in ("source", "models"):
            out.setdefault(f.name, []).append(("", f.default))
    for f in dataclasses.fields(C.ModelConfig):
        out.setdefault(f.name, []).append(("models[]", None if f.default is dataclasses.MISSING else f.default))
    return out


def test_every_config_key_exists_with_the_default_the_readme_gives():
    text = _readme()
    fields = _config_defaults()
    sections = {s for v in fields.values() for s, _ in v if s}
    wrong = []
    # `section.key` anywhere (grpc.aio is grpcio's module, not a key)
    for m in re.finditer(r"`((\w+|models\[\])\.(\w+))", text):
        sec, key = m.group(2), m.group(3)
        if sec in sections and m.group(1) != "grpc.aio" and (sec, key) not in {
                (s, k) for k, v in fields.items() for s, _ in v}:
            wrong.append(f"line {_line_of(text, m.start())}: `{m.group(1)}` is not a config key")
    # defaults: "`key` (VALUE", "`key`, VALUE)" and table rows "| `key` | VALUE |"
    patterns = (r"`(?:(?P<sec>\w+|models\[\])\.)?(?P<key>\w+)` \((?P<val>[^,;)]+)",
                r"`(?:(?P<sec>\w+|models\[\])\.)?(?P<key>\w+)`, (?P<val>[\d.,]+(?: [KMG]iB| s)?)[;)]",
                r"^\| `(?:(?P<sec>\w+|models\[\])\.)?(?P<key>\w+)` \| (?P<val>[^|]+?) \|")
    checked = 0
    for pattern in patterns:
        for m in re.finditer(pattern, text, flags=re.M):
            candidates = [(s, d) for s, d in fields.get(m.group("key"), ()) if m.group("sec") in (None, s)]
            value = _readme_value(m.group("val"))
            if not candidates or value is ...:
                continue
            checked += 1
            if not any(d == value for _, d in candidates):
                wrong.append(f"line {_line_of(text, m.start())}: {m.group(0)!r}, but the default is "
                             + " / ".join(f"{s or 'top level'}: {d!r}" for s, d in candidates))
    assert checked > 25
    assert not wrong, "\n".join(wrong)


def test_repository_paths_exist():
    text = _readme()
    written = set()   # files the README's own commands write (-o, --json, --prometheusrule)
    for cmdline in _command_lines(text):
        written.update(re.findall(r"(?:-o|--json|--prometheusrule|--output) (\S+)", cmdline))
    missing = []
    for m in re.finditer(r"(?<![\w./#-])((?:[\w.-]+/)+[\w.-]*\.(?:py|md|yaml|yml|json|sh|txt|toml|onnx))\b", text):
        path = m.group(1)
        if path in written or path.startswith(("/", "http")):
            continue
        if not (REPO / path).exists() and not (REPO / "sentinel" / path).exists():
            missing.append(f"line {_line_of(text, m.start())}: {path}")
    assert not missing, "README names files that do not exist:\n" + "\n".join(missing)


def test_the_grpc_code_label_table_is_the_proxys_mapping():
    from sentinel.proxy.grpc_proxy import CODE_LABELS

    text = _readme()
    table = text[text.index("| gRPC status | code |"):]
    table = table[:table.index("\n\n")]
    documented = {}
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        for statuses, code in ((cells[0], cells[1]), (cells[3], cells[4])):
            for status in statuses.split("(")[0].split(","):
                documented[status.strip()] = code
    assert documented == {s.name: c for s, c in CODE_LABELS.items()}


def test_the_config_check_example_is_what_the_command_prints(tmp_path):
    text = _readme()
    start = text.index("$ sentinel config check bad.yaml\n") + len("$ sentinel config check bad.yaml\n")
    shown = text[start:text.index("```", start)].splitlines()
    (tmp_path / "bad.yaml").write_text(
        "models:\n  - name: digits\n    version: v3\n    protocl: v2\ndrift:\n  alpha: 2.0\n")
    r = subprocess.run([sys.executable, "-m", "sentinel", "config", "check", "bad.yaml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="300"))
    assert r.returncode == 2
    assert (r.stdout + r.stderr).splitlines() == shown


def _yaml_paths(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from _yaml_paths(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v


def test_sentinel_yaml_shows_the_defaults():
    """The README: "The commented example sentinel.yaml shows every field with its default"."""
    import dataclasses

    import yaml

    from sentinel import config as C

    doc = yaml.safe_load((REPO / "sentinel.yaml").read_text())
    example = {"slo_file", "default_model", "models"}   # example values, not defaults
    wrong = []
    for path, value in _yaml_paths({k: v for k, v in doc.items() if k not in example}):
        obj: object = C.Config(models=())
        for part in path.split("."):
            obj = getattr(obj, part)
        expected = list(obj) if isinstance(obj, tuple) else obj
        if value != expected:
            wrong.append(f"{path}: {value!r}, default {expected!r}")
    for f in dataclasses.fields(C.ModelConfig):
        if f.name in doc["models"][0] and f.default is not dataclasses.MISSING:
            if doc["models"][0][f.name] != f.default:
                wrong.append(f"models[0].{f.name}: {doc['models'][0][f.name]!r}, default {f.default!r}")
    assert not wrong, "\n".join(wrong)


def test_sentinel_yaml_shows_every_field():
    import dataclasses

    import yaml

    from sentinel import config as C

    doc = yaml.safe_load((REPO / "sentinel.yaml").read_text())
    missing = [f.name for f in dataclasses.fields(C.Config) if f.name not in doc and f.name != "source"]
    for f in dataclasses.fields(C.Config):
        if f.default_factory is not dataclasses.MISSING:
            missing += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.default_factory())
                        if g.name not in (doc.get(f.name) or {})]
    missing += [f"models[].{f.name}" for f in dataclasses.fields(C.ModelConfig) if f.name not in doc["models"][0]
                and f.name not in ("raw_input_shape", "raw_input_dtype", "max_image_pixels")]   # shown commented out
    assert not missing, f"sentinel.yaml does not show {', '.join(missing)}"


def test_every_alert_and_recording_rule_named_exists():
    """Alert and recording-rule names (and alert labels) in the README are in the committed rules/."""
    import yaml

    alerts: dict[str, list[dict]] = {}
    records = set()
    for f in sorted((REPO / "rules").glob("*.yml")):
        for group in yaml.safe_load(f.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    alerts.setdefault(rule["alert"], []).append(rule.get("labels") or {})
                else:
                    records.add(rule["record"])
    text = _readme()
    wrong = []
    for m in re.finditer(r"(?<![\w:])(Sentinel[A-Z]\w+)(?:\{([^}]*)\})?", text):
        name, labels = m.group(1), m.group(2)
        if name not in alerts:
            wrong.append(f"line {_line_of(text, m.start())}: no alert {name} in rules/")
            continue
        for part in re.split(r",\s*", labels or ""):
            label, _, values = part.partition("=")
            label = label.strip()
            # labels Prometheus adds from the expression (slo, model, sli) are checked only as fixed labels
            fixed = {k for r in alerts[name] for k in r}
            if label and label not in fixed and label not in ("model", "slo", "sli"):
                wrong.append(f"line {_line_of(text, m.start())}: {name} has no label {label!r}")
            for v in (x.strip('"') for x in values.split("|") if x):
                if not any(r.get(label) == v for r in alerts[name]):
                    wrong.append(f"line {_line_of(text, m.start())}: no {name} with {label}={v!r}")
    for m in re.finditer(r"`(slo:[\w:]+)`", text):
        if m.group(1) not in records:
            wrong.append(f"line {_line_of(text, m.start())}: no recording rule {m.group(1)} in rules/")
    assert not wrong, "\n".join(wrong)
