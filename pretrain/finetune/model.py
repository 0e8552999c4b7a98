"""The classifiers fine-tuning trains: the SwinV2 backbone with a new linear head (``full``), or the frozen backbone
with MAE's probe head (``linear``). Both keep our (official) key names, so their checkpoints and consolidated files
load like any other SwinV2 classifier."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from swinv2 import SwinTransformerV2

from ..backbone import ModelConfig, backbone_kwargs

__all__ = ["LinearProbe", "ProbeHead", "build_classifier"]


class ProbeHead(nn.Module):
    """MAE's linear-probe head: a parameter-free BatchNorm over the features (affine off, eps 1e-6), then a linear
    layer initialised with trunc-normal std 0.01 (spec §6)."""

    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(features, affine=False, eps=1e-6)
        self.linear = nn.Linear(features, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class LinearProbe(SwinTransformerV2):
    """A SwinV2 whose backbone is frozen (no gradients, always in eval mode: no drop path, fixed norms) under a
    :class:`ProbeHead`; only ``head.*`` trains.

    Args:
        num_classes: classes of the probe.
        **kwargs: ``SwinTransformerV2`` arguments.
    """

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(num_classes=0, **kwargs)
        self.num_classes = num_classes
        self.head = ProbeHead(self.num_features, num_classes)
        for name, parameter in self.named_parameters():
            if not name.startswith("head."):
                parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        for name, child in self.named_children():
            if name != "head":
                child.train(False)
        return self


def build_classifier(model: ModelConfig, num_classes: int, mode: str) -> SwinTransformerV2:
    """The classifier of ``mode`` (full or linear) for the ``model`` section, on the current default device."""
    kwargs = backbone_kwargs(model)
    if mode == "linear":
        return LinearProbe(num_classes, **kwargs)
    return SwinTransformerV2(num_classes=num_classes, **kwargs)
