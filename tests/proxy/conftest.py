"""Proxy tests treat ResourceWarning (an unclosed socket, file or transport) as an error.

The project-wide filter ignores ResourceWarning (torch, kserve and subprocess pipes raise
them in other suites); here a leak is a bug: the proxy holds sockets for a living. Each test
ends with a garbage collection so a leaked object warns inside the test that leaked it.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.filterwarnings("error::ResourceWarning"))


@pytest.fixture(autouse=True)
def _collect_leaks():
    yield
    gc.collect()
