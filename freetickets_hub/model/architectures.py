"""Small-image architectures registered in timm's registry, so every member is a plain timm model.

Importing this module registers the CIFAR-style Wide ResNets (Zagoruyko & Komodakis, 2016) used by
the FreeTickets paper: ``timm.create_model("cifar_wrn28_10", num_classes=10, in_chans=1)``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["WideResNet"]


class _PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice, with a 1x1 projection shortcut when the shape changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.drop = nn.Dropout(drop_rate)
        self.shortcut = (
            nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False) if stride != 1 or in_chs != out_chs else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        # the projection sees the pre-activated input, as in the reference WRN code
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.drop(torch.relu(self.bn2(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """CIFAR-style WRN-d-k: a 3x3 stem, three groups of (d-4)/6 pre-activation blocks, widths 16k/32k/64k."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 (10, 16, 22, 28, ...), got {depth}")
        if global_pool != "avg":
            raise ValueError(f"WideResNet supports global_pool='avg' only, got {global_pool!r}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes, self.in_chans = num_classes, in_chans  # timm reads both as the model's traits
        self.num_features = self.head_hidden_size = widths[-1]
        self.drop_rate = drop_rate
        self.conv_stem = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            layers = [
                _PreActBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1], stride if j == 0 else 1, drop_rate)
                for j in range(blocks)
            ]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.conv_stem(x))
        return torch.relu(self.norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        "first_conv": "conv_stem",
        "classifier": "fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {"cifar_wrn10_2": _cfg(), "cifar_wrn16_4": _cfg(), "cifar_wrn16_8": _cfg(), "cifar_wrn28_10": _cfg()}
)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> WideResNet:
    return build_model_with_cfg(WideResNet, variant, pretrained, **kwargs)


@register_model
def cifar_wrn10_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-10-2 (0.3M parameters): the CPU-sized member used by the Fashion-MNIST recipes."""
    model_args = dict(depth=10, widen_factor=2)
    return _create("cifar_wrn10_2", pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_wrn16_4(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-16-4 (2.7M parameters)."""
    model_args = dict(depth=16, widen_factor=4)
    return _create("cifar_wrn16_4", pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_wrn16_8(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-16-8 (11M parameters): an over-parameterised member for GPU runs."""
    model_args = dict(depth=16, widen_factor=8)
    return _create("cifar_wrn16_8", pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_wrn28_10(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-28-10 (36.5M parameters): the paper's CIFAR-10/100 architecture."""
    model_args = dict(depth=28, widen_factor=10)
    return _create("cifar_wrn28_10", pretrained, **dict(model_args, **kwargs))
