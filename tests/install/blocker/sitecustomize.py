"""Loaded by every Python process started with this folder on PYTHONPATH: makes the optional
dependencies (torch, kserve, scikit-learn, onnx) unimportable, as in a base-only install."""

import sys

BLOCKED = frozenset({"torch", "torchvision", "kserve", "sklearn", "onnx", "onnxscript"})


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
