"""gRPC configuration: fields, defaults, validation messages that name the field."""

from __future__ import annotations

import pytest

from sentinel.config import Config, GrpcConfig, ModelConfig, load_config
from sentinel.errors import ConfigError

pytestmark = pytest.mark.unit

MODELS = (ModelConfig("digits", "v3"),)


def test_defaults_are_off_and_bounded():
    cfg = Config(models=MODELS)
    assert cfg.grpc_listen is None and cfg.grpc_upstream is None
    assert cfg.grpc == GrpcConfig(max_message_bytes=64 << 20, upstream_timeout_s=30.0, max_concurrent_rpcs=1024)
    assert cfg.replay.protocol == "http"
    assert list(cfg.validate()) == []


def test_listen_without_upstream_is_refused():
    problems = dict(Config(models=MODELS, grpc_listen="127.0.0.1:8082").validate())
    assert "required when grpc_listen is set" in problems["grpc_upstream"]


def test_overrides_name_the_flag():
    with pytest.raises(ConfigError, match="--grpc_upstream: .*host:port"):
        Config(models=MODELS).with_overrides(grpc_listen="127.0.0.1:8082", grpc_upstream="nohostport")


def test_file_errors_name_file_and_field(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("models: [{name: digits, version: v3}]\ngrpc_listen: 127.0.0.1:8082\n"
                 "grpc_upstream: 127.0.0.1:8083\ngrpc: {max_message_bytes: 0, max_concurrent_rpcs: 0}\n"
                 "replay: {protocol: h2}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    text = str(ei.value)
    assert "grpc.max_message_bytes: must be positive" in text
    assert "grpc.max_concurrent_rpcs" in text and "replay.protocol" in text
    p.write_text("models: [{name: digits, version: v3}]\ngrpc_listen: 127.0.0.1:8082\n"
                 "grpc_upstream: 127.0.0.1:8083\nreplay: {protocol: grpc}\n")
    cfg = load_config(p)
    assert (cfg.grpc_listen, cfg.grpc_upstream, cfg.replay.protocol) == ("127.0.0.1:8082", "127.0.0.1:8083", "grpc")


def test_example_config_shows_the_defaults(repo):
    cfg = load_config(repo / "sentinel.yaml")
    assert cfg.grpc == GrpcConfig() and cfg.grpc_listen is None and cfg.replay.protocol == "http"
