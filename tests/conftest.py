"""Shared fixtures: paths of the repository and its bundled model and golden set."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests import helpers such as tests/servers.py as `servers`.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from testpaths import REPO, TEST_DATA  # noqa: E402,F401 - re-exported for fixtures below


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def registry():
    from sentinel.registry import Registry

    return Registry(REPO / "models", default_model="digits")


@pytest.fixture(scope="session")
def digits_v3(registry):
    return registry.resolve("digits:v3")


@pytest.fixture(scope="session")
def digits_golden(digits_v3):
    from sentinel.golden import golden_for

    return golden_for(digits_v3, REPO / "golden_sets")


@pytest.fixture(autouse=True, scope="session")
def _threads():
    """Keep torch to the 2 cores CI has, and make subprocesses find the package."""
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    yield
