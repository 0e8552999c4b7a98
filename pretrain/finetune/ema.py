"""An exponential moving average of the weights (timm's ModelEmaV2 rule), kept in fp32 beside the engine's model."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["WeightEMA"]


class WeightEMA:
    """``ema <- decay * ema + (1 - decay) * weights`` after every applied update, for every floating parameter and
    buffer (integer buffers, e.g. BatchNorm's batch counter, are copied).

    Args:
        model: the model whose weights start the average (before the first update).
        decay: per-step decay.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        self.copied = {k: v.detach().clone() for k, v in model.state_dict().items() if not v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s current weights (moved to their device on first use)."""
        state = model.state_dict()
        names = list(self.shadow)
        device = state[names[0]].device
        if self.shadow[names[0]].device != device:
            self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        current = [state[k].float() for k in names]
        torch._foreach_lerp_([self.shadow[k] for k in names], current, 1.0 - self.decay)
        self.copied = {k: state[k].detach().clone() for k in self.copied}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights (fp32, on the CPU) in the model's key names."""
        return {**{k: v.cpu() for k, v in self.shadow.items()}, **{k: v.cpu() for k, v in self.copied.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"the saved EMA lacks {len(missing)} weights, e.g. {missing[:3]}")
        self.shadow = {k: state[k].float().clone() for k in self.shadow}
        self.copied = {k: state[k].clone() for k in self.copied}
