"""The exception tree of sentinel.

    SentinelError                 base; `exit_code` says how the CLI exits
    ├── UsageError                bad arguments or configuration (exit 2)
    │   ├── ConfigError           a config/SLO/model.yaml file is invalid; lists every problem
    │   ├── RegistryError         unknown model or version, bad registry entry
    │   └── MissingExtra          an optional dependency (torch, kserve, ...) is not installed
    ├── InfrastructureError       a target or file could not be used (exit 2)
    │   ├── WeightsError          weights missing, corrupt, mis-shaped or unsafe to load
    │   └── DecodeError           a payload is not what its wire format says; `kind` labels it
    └── CheckFailed               a check ran and found a problem (exit 1)
        └── IntegrityError        a digest, shape or dtype does not match its manifest

Foreign errors (yaml, safetensors, torch, onnxruntime, pynvml, httpx) are translated
to these at the boundary where they are raised, so the CLI prints one sentence and no
traceback unless --debug is given.
"""

from __future__ import annotations


class SentinelError(Exception):
    """Base of every error sentinel raises on purpose."""

    exit_code = 2


class UsageError(SentinelError):
    """Bad arguments or configuration."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration file is invalid; `problems` holds one line per error."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class RegistryError(UsageError):
    """An unknown model or version, or a malformed registry entry."""


class InfrastructureError(SentinelError):
    """A target, file or device could not be used."""

    exit_code = 2


class WeightsError(InfrastructureError):
    """Weights are missing, corrupt, mis-shaped, or would need unsafe unpickling."""


class CheckFailed(SentinelError):
    """A check ran to completion and found a problem."""

    exit_code = 1


class IntegrityError(CheckFailed):
    """A file's digest, shape or dtype does not match its manifest."""


# Optional dependencies: which extra brings which import, and what to tell the user.
EXTRAS = {
    "torch": ("torch", "PyTorch"), "onnx": ("torch", "onnx"), "onnxscript": ("torch", "onnxscript"),
    "sklearn": ("torch", "scikit-learn"), "kserve": ("serve", "kserve"),
    # kserve's own dependencies, which `sentinel serve` imports directly; absent from a base install.
    "fastapi": ("serve", "kserve"), "uvicorn": ("serve", "kserve"), "starlette": ("serve", "kserve"),
}


class MissingExtra(UsageError):
    """A command needs an optional dependency that is not installed (exit 2).

    The message names the extra: "sentinel export needs PyTorch: pip install
    'sentinel-densenet[torch]'".
    """

    def __init__(self, what: str, module: str, extra: str | None = None):
        default, label = EXTRAS.get(module, ("full", module))
        extra = extra or default
        self.module, self.extra = module, extra
        super().__init__(f"{what} needs {label}: pip install 'sentinel-densenet[{extra}]'")


def missing_extra(exc: ModuleNotFoundError, what: str, extra: str | None = None) -> MissingExtra | None:
    """The MissingExtra for an import of an optional dependency that failed, else None.

    `extra` overrides the module's own extra (`sentinel serve` names `serve`, which brings torch too).
    """
    top = (exc.name or "").split(".")[0]
    return MissingExtra(what, top, extra) if top in EXTRAS else None


def require(what: str, *modules: str, extra: str | None = None) -> None:
    """Raise MissingExtra for the first of `modules` that cannot be imported (checked without importing)."""
    import importlib.util

    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise MissingExtra(what, module, extra)


class DecodeError(InfrastructureError, ValueError):
    """A payload (request, response, CloudEvent) that cannot be turned into arrays.

    `kind` is a short label for metrics (malformed_json, missing_field, bad_shape,
    bad_datatype, truncated, bad_header, unsupported, bad_image, too_large, too_deep,
    bad_event, nonfinite_output, unexpected).
    Every decoder in `sentinel.protocols` raises it, and only it, for malformed input.
    """

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)
