"""Fixtures shared by the export and verify tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from testpaths import REPO


@pytest.fixture(scope="module")
def reg_dir(tmp_path_factory) -> Path:
    """A private copy of digits:v3, so recording exports never touches the repository's model.yaml."""
    root = tmp_path_factory.mktemp("registry")
    shutil.copytree(REPO / "models" / "digits" / "v3", root / "digits" / "v3")
    return root
