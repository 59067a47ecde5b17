"""DenseNet-BC with torchvision's parameter names, plus small-input variants.

Structure (Huang et al., CVPR 2017; names as in torchvision's densenet121/161/169/201):
`features` holds the stem (`conv0`, `norm0`, `relu0`, `pool0`), then `denseblock{i}`
(each a stack of `denselayer{j}`: norm1 → relu1 → conv1 1×1 to bn_size·k → norm2 →
relu2 → conv2 3×3 to k, fed the concatenation of all earlier outputs), `transition{i}`
between blocks (norm, relu, 1×1 conv halving the channels, 2×2 average pool), and
`norm5`; then relu → global average pool → `classifier`. So a torchvision state dict
loads as is.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import checkpoint as _ckpt

from sentinel.reference.arch import ARCHS, DenseNetConfig, resolve_config

__all__ = ["ARCHS", "DenseNet", "DenseNetConfig", "build_densenet", "count_parameters", "resolve_config"]


class _DenseLayer(nn.Module):
    """Bottleneck layer: BN-ReLU-Conv1×1 then BN-ReLU-Conv3×3 producing `growth_rate` maps."""

    def __init__(self, in_ch: int, growth_rate: int, bn_size: int, drop_rate: float, memory_efficient: bool):
        super().__init__()
        mid = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_ch, mid, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def _bottleneck(self, *inputs: Tensor) -> Tensor:
        x = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(x)))

    def forward(self, inputs: list[Tensor]) -> Tensor:  # type: ignore[override]
        if self.memory_efficient and self.training and any(t.requires_grad for t in inputs):
            bottleneck = _ckpt.checkpoint(self._bottleneck, *inputs, use_reentrant=False)
        else:
            bottleneck = self._bottleneck(*inputs)
        out = self.conv2(self.relu2(self.norm2(bottleneck)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class _DenseBlock(nn.ModuleDict):
    """`n` dense layers; returns the concatenation of the block input and every layer's output."""

    def __init__(self, n: int, in_ch: int, growth_rate: int, bn_size: int, drop_rate: float, memory_efficient: bool):
        super().__init__()
        for i in range(n):
            self.add_module(
                f"denselayer{i + 1}",
                _DenseLayer(in_ch + i * growth_rate, growth_rate, bn_size, drop_rate, memory_efficient),
            )

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        feats = [x]
        for layer in self.values():
            feats.append(layer(feats))
        return torch.cat(feats, 1)


class _Transition(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(in_ch))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=1, bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNet(nn.Module):
    """DenseNet-BC; `forward` gives logits, `embed` the pooled penultimate features."""

    def __init__(self, config: DenseNetConfig, memory_efficient: bool = False):
        super().__init__()
        self.config = config
        c = config.num_init_features
        if config.small_inputs:
            stem = [
                ("conv0", nn.Conv2d(config.in_channels, c, kernel_size=3, stride=1, padding=1, bias=False)),
                ("norm0", nn.BatchNorm2d(c)),
                ("relu0", nn.ReLU(inplace=True)),
            ]
        else:
            stem = [
                ("conv0", nn.Conv2d(config.in_channels, c, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(c)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        self.features = nn.Sequential(OrderedDict(stem))
        last = len(config.block_config) - 1
        for i, n in enumerate(config.block_config):
            self.features.add_module(
                f"denseblock{i + 1}",
                _DenseBlock(n, c, config.growth_rate, config.bn_size, config.drop_rate, memory_efficient),
            )
            c += n * config.growth_rate
            if i != last:
                out = int(c * config.compression)
                self.features.add_module(f"transition{i + 1}", _Transition(c, out))
                c = out
        self.features.add_module("norm5", nn.BatchNorm2d(c))
        self.classifier = nn.Linear(c, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    @property
    def embedding_width(self) -> int:
        return self.classifier.in_features

    def embed(self, x: Tensor) -> Tensor:
        """Pooled penultimate features, N × embedding_width."""
        f = F.relu(self.features(x))
        return torch.flatten(F.adaptive_avg_pool2d(f, (1, 1)), 1)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return self.classifier(self.embed(x))

    def forward_with_embedding(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and embeddings from one pass."""
        e = self.embed(x)
        return self.classifier(e), e


def build_densenet(
    arch_or_config: str | DenseNetConfig | dict[str, Any] = "densenet121",
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
    memory_efficient: bool = False,
) -> DenseNet:
    """Build a DenseNet (random weights, train mode as torch builds it) from a name or config."""
    cfg = resolve_config(arch_or_config, num_classes=num_classes, in_channels=in_channels)
    return DenseNet(cfg, memory_efficient=memory_efficient)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
