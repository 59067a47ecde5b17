"""Paths tests share: the repository root and the test data folder.

A module of its own (not `conftest`): tests/proxy has a conftest.py too, and `from conftest
import ...` would pick whichever was imported first.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_DATA = Path(__file__).resolve().parent / "data"
