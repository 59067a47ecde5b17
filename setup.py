"""Build hook: copy the example registry, golden set and config files into the wheel.

The repository keeps them at the top level (models/, golden_sets/, slo.yaml, sentinel.yaml),
where users and tests find them; a wheel carries a copy under sentinel/_bundled/, which
`sentinel.registry.data_home()` falls back to when neither the current directory nor a
source checkout has a registry. Editable installs skip the copy: they read the checkout.
Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
# What ships, relative to the repository root; directories are copied whole, minus caches.
BUNDLED = ("models/digits/v2", "models/digits/v3", "golden_sets/digits/v3", "slo.yaml", "sentinel.yaml")
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp")


class BuildPyWithData(build_py):
    """build_py that also lays out sentinel/_bundled/ in the build directory."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "sentinel" / "_bundled"
        if dest.exists():
            shutil.rmtree(dest)
        for rel in BUNDLED:
            src = HERE / rel
            if not src.exists():
                raise FileNotFoundError(f"{src}: listed in setup.py BUNDLED but missing")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, target, ignore=_SKIP)
            else:
                shutil.copy2(src, target)


setup(cmdclass={"build_py": BuildPyWithData})
