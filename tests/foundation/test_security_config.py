"""Security promises of the configuration: the /ingest token is never quoted back (errors,
`sentinel config check`, repr), and a listener address without a host is refused instead of
binding every interface."""

from __future__ import annotations

import subprocess
import sys

import pytest
from testpaths import REPO

from sentinel.config import AnalysisConfig, Config, ModelConfig, load_config, parse_hostport
from sentinel.errors import ConfigError

SECRET = "8675309424242"   # a token someone wrote unquoted: YAML reads it as an integer


def _config(tmp_path, body: str):
    p = tmp_path / "sentinel.yaml"
    p.write_text("models:\n  - {name: digits, version: v3}\n" + body)
    return p


@pytest.mark.parametrize("value", [SECRET, f"[{SECRET}]", f"{{token: {SECRET}}}", f"{SECRET}.5"])
def test_a_mistyped_ingest_token_is_reported_without_its_value(tmp_path, value):
    p = _config(tmp_path, f"analysis:\n  ingest_token: {value}\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    text = "\n".join(err.value.problems)
    assert "analysis.ingest_token" in text          # the field is still named
    assert SECRET not in text, text


def test_config_check_does_not_print_the_token(tmp_path):
    p = _config(tmp_path, f"analysis:\n  ingest_token: {SECRET}\n  queue_size: none\n")
    out = subprocess.run([sys.executable, "-m", "sentinel", "config", "check", str(p)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "analysis.ingest_token" in out.stdout + out.stderr
    assert SECRET not in out.stdout + out.stderr


def test_the_token_is_not_in_repr():
    cfg = Config(models=(ModelConfig(name="digits", version="v3"),),
                 analysis=AnalysisConfig(ingest_token="s3cr3t-" + SECRET))
    assert SECRET not in repr(cfg) and SECRET not in repr(cfg.analysis)
    assert cfg.analysis.ingest_token == "s3cr3t-" + SECRET


@pytest.mark.parametrize("field", ["listen", "admin", "grpc_listen"])
@pytest.mark.parametrize("addr", [":8080", "[]:8080"])
def test_a_listener_without_a_host_is_refused_not_bound_to_every_interface(tmp_path, field, addr):
    extra = "grpc_upstream: 127.0.0.1:8082\n" if field == "grpc_listen" else ""
    p = _config(tmp_path, f"{field}: '{addr}'\n{extra}")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert any(line.startswith(f"{p}: {field}: no host in") for line in err.value.problems), err.value.problems
    with pytest.raises(ValueError):
        parse_hostport(addr)
    # an address that names its host is taken as written, every interface included
    assert parse_hostport("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert parse_hostport("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_hostport("[::1]:9464") == ("::1", 9464)
