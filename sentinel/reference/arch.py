"""DenseNet-BC shapes: the configuration type and the known architectures (no torch import).

Kept apart from the module so the sidecar (GPU headroom estimate) and the registry can
reason about architectures without importing torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

# Bounds on what a model.yaml may ask for (DenseNet-264, the largest published, has 124 dense
# layers, growth rate 32 and 1000 classes; ImageNet-21k has 21,841 classes).
MAX_LAYERS = 1000
_LIMITS = {"growth_rate": 1024, "num_init_features": 4096, "bn_size": 64, "num_classes": 1_000_000,
           "in_channels": 1024}


@dataclass(frozen=True)
class DenseNetConfig:
    """Shape of a DenseNet-BC."""

    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    drop_rate: float = 0.0
    num_classes: int = 1000
    in_channels: int = 3
    small_inputs: bool = False   # 3×3 stride-1 stem without max pooling, for 8–64 px images
    compression: float = 0.5     # transition width factor

    def __post_init__(self) -> None:
        import numbers

        for name in ("growth_rate", "num_init_features", "bn_size", "num_classes", "in_channels"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        if not isinstance(self.block_config, (tuple, list)) or not all(
                isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in self.block_config):
            raise ValueError(f"block_config must be a list of integers, got {self.block_config!r}")
        for name in ("drop_rate", "compression"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise ValueError(f"{name} must be a number, got {v!r}")
        for name, most in _LIMITS.items():
            if getattr(self, name) > most:
                raise ValueError(f"{name} {getattr(self, name)} is more than {most:,} (a model.yaml sets the size "
                                 "of the network sentinel allocates)")
        if sum(int(n) for n in self.block_config) > MAX_LAYERS or len(self.block_config) > 32:
            raise ValueError(f"block_config {list(self.block_config)} has more than {MAX_LAYERS} dense layers "
                             "or 32 blocks")
        if self.growth_rate < 1 or self.num_init_features < 1 or self.bn_size < 1:
            raise ValueError("growth_rate, num_init_features and bn_size must be positive")
        if not self.block_config or any(int(n) < 1 for n in self.block_config):
            raise ValueError(f"block_config must be non-empty positive integers, got {self.block_config}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {self.in_channels}")
        if not 0 < self.compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {self.compression}")
        object.__setattr__(self, "block_config", tuple(int(n) for n in self.block_config))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["block_config"] = list(self.block_config)
        return d

    @property
    def feature_width(self) -> int:
        """Width of the pooled penultimate features (input of `classifier`)."""
        c = self.num_init_features
        for i, n in enumerate(self.block_config):
            c += n * self.growth_rate
            if i != len(self.block_config) - 1:
                c = int(c * self.compression)
        return c


ARCHS: dict[str, DenseNetConfig] = {
    "densenet121": DenseNetConfig(32, (6, 12, 24, 16), 64),
    "densenet161": DenseNetConfig(48, (6, 12, 36, 24), 96),
    "densenet169": DenseNetConfig(32, (6, 12, 32, 32), 64),
    "densenet201": DenseNetConfig(32, (6, 12, 48, 32), 64),
    # A DenseNet-BC whose model.yaml `architecture:` spells out its shape (`models import/init
    # --arch custom`); its own defaults are DenseNetConfig's.
    "densenet": DenseNetConfig(),
    # Small variant for 32×32 single-channel inputs (the digits model).
    "densenet_digits": DenseNetConfig(12, (4, 4, 4), 24, num_classes=10, in_channels=1, small_inputs=True),
}


def resolve_config(arch_or_config: str | DenseNetConfig | dict[str, Any], **overrides: Any) -> DenseNetConfig:
    """An architecture name, a config, or a mapping of config fields → DenseNetConfig."""
    if isinstance(arch_or_config, DenseNetConfig):
        base = arch_or_config
    elif isinstance(arch_or_config, str):
        try:
            base = ARCHS[arch_or_config]
        except KeyError:
            from sentinel.errors import UsageError

            raise UsageError(
                f"unknown architecture {arch_or_config!r}; known: {', '.join(sorted(ARCHS))}"
            ) from None
    elif isinstance(arch_or_config, dict):
        d = dict(arch_or_config)
        if "arch" in d:
            base = resolve_config(d.pop("arch"))
            return replace(base, **{k: (tuple(v) if k == "block_config" else v) for k, v in d.items()},
                           **{k: v for k, v in overrides.items() if v is not None})
        base = DenseNetConfig(**{k: (tuple(v) if k == "block_config" else v) for k, v in d.items()})
    else:
        raise TypeError(f"expected an arch name, DenseNetConfig or dict, got {type(arch_or_config).__name__}")
    ov = {k: v for k, v in overrides.items() if v is not None}
    return replace(base, **ov) if ov else base


