"""The shadow's ONNX export cache is private to this user: nobody else can plant the model it runs."""

from __future__ import annotations

import os

import pytest

from sentinel.analysis.shadow import private_cache_dir
from sentinel.errors import InfrastructureError

pytestmark = pytest.mark.unit


def test_cache_is_created_private(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = private_cache_dir()
    assert d == tmp_path / "sentinel" / "onnx"
    assert d.stat().st_mode & 0o777 == 0o700


def test_world_writable_cache_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = tmp_path / "sentinel" / "onnx"
    d.mkdir(parents=True)
    os.chmod(d, 0o777)
    with pytest.raises(InfrastructureError, match="not a private directory"):
        private_cache_dir()
