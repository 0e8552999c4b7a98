"""The classifiers fine-tuning trains: the SwinV2 backbone with a new linear head (``full``), or the frozen backbone
with MAE's probe head (``linear``). Both keep our (official) key names, so their checkpoints and consolidated files
load like any other SwinV2 classifier."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from swinv2 import SwinTransformerV2

from ..backbone import ModelConfig, backbone_kwargs

__all__ = ["LinearProbe", "ProbeHead", "build_classifier", "probe_width"]


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
        probe_stages: the probe reads the average-pooled outputs of the last ``probe_stages`` stages, concatenated:
            each earlier stage's output after its last block (before its patch merging), then the final-norm features
            (1 = the final-norm features only, as MAE's probe).
        **kwargs: ``SwinTransformerV2`` arguments.
    """

    def __init__(self, num_classes: int, probe_stages: int = 1, **kwargs: Any) -> None:
        super().__init__(num_classes=0, **kwargs)
        if not 1 <= probe_stages <= self.num_layers:
            raise ValueError(f"probe_stages={probe_stages}; accepted: 1 to {self.num_layers} (the stages)")
        self.num_classes = num_classes
        self.probe_stages = probe_stages
        self._stage_outputs: list[torch.Tensor] = []
        # Earlier stages' outputs are caught as their last block returns them (the stage forward stays the
        # backbone's own, so activation checkpointing and ZeRO-3's module hooks apply unchanged).
        for stage in range(self.num_layers - probe_stages, self.num_layers - 1):
            self.layers[stage].blocks[-1].register_forward_hook(self._catch)
        widths = [self.embed_dim * 2**i for i in range(self.num_layers - probe_stages, self.num_layers)]
        self.head = ProbeHead(sum(widths), num_classes)
        for name, parameter in self.named_parameters():
            if not name.startswith("head."):
                parameter.requires_grad_(False)

    def _catch(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        self._stage_outputs.append(output)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the probe's features (B, sum of the probed stages' widths)."""
        self._stage_outputs = []
        final = super().forward_features(x)
        earlier, self._stage_outputs = self._stage_outputs, []
        return torch.cat([*(tokens.mean(dim=1) for tokens in earlier), final], dim=1)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        for name, child in self.named_children():
            if name != "head":
                child.train(False)
        return self


def probe_width(model: ModelConfig, probe_stages: int) -> int:
    """Features of a probe over the last ``probe_stages`` stages of the ``model`` section's backbone."""
    kwargs = backbone_kwargs(model)
    stages = len(kwargs["depths"])
    return sum(kwargs["embed_dim"] * 2**i for i in range(stages - probe_stages, stages))


def build_classifier(model: ModelConfig, num_classes: int, mode: str, probe_stages: int = 1) -> SwinTransformerV2:
    """The classifier of ``mode`` (full or linear, over the last ``probe_stages`` stages) for the ``model`` section,
    on the current default device."""
    kwargs = backbone_kwargs(model)
    if mode == "linear":
        return LinearProbe(num_classes, probe_stages, **kwargs)
    return SwinTransformerV2(num_classes=num_classes, **kwargs)
