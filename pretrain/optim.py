"""AdamW with the SimMIM parameter groups and the per-iteration learning-rate schedule (spec §3.5).

- Learning rates (base, warmup, min) are multiplied by (global batch x accumulation) / lr_reference_batch, the
  official rule (512 images).
- Warmup: linear from warmup_lr to base over warmup_epochs; then cosine to min_lr, or multistep (x gamma at each
  milestone epoch). Everything is evaluated per optimizer step ``t`` (the official code lags one iteration; here step
  ``t`` uses lr(t)).
- A group's ``lr_scale`` (layer-wise decay) is applied exactly once, here.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .config import PretrainConfig

__all__ = ["LRSchedule", "build_optimizer", "lr_scale_factor"]

log = logging.getLogger("pretrain")


def lr_scale_factor(cfg: PretrainConfig, world_size: int) -> float:
    """(micro-batch x world size x accumulation) / lr_reference_batch, or 1 when scaling is off."""
    if cfg.optimizer.lr_reference_batch == 0:
        return 1.0
    effective = cfg.data.batch_size * world_size * cfg.training.grad_accum_steps
    return effective / cfg.optimizer.lr_reference_batch


class LRSchedule:
    """Per-step schedule that DeepSpeed drives (``step()`` after each optimizer step, ``state_dict`` in checkpoints).

    Args:
        optimizer: its groups may carry ``lr_scale``.
        cfg: optimizer and schedule sections.
        world_size: for the batch scaling of the learning rates.
        steps_per_epoch: optimizer steps per epoch.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: PretrainConfig, world_size: int, steps_per_epoch: int):
        factor = lr_scale_factor(cfg, world_size)
        self.optimizer = optimizer
        self.base_lr = cfg.optimizer.base_lr * factor
        self.warmup_lr = cfg.optimizer.warmup_lr * factor
        self.min_lr = cfg.optimizer.min_lr * factor
        self.name = cfg.schedule.name
        self.warmup_steps = round(cfg.schedule.warmup_epochs * steps_per_epoch)
        self.total_steps = cfg.schedule.epochs * steps_per_epoch
        self.milestones = [m * steps_per_epoch for m in cfg.schedule.milestones]
        self.gamma = cfg.schedule.gamma
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """Learning rate (before a group's lr_scale) of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.warmup_lr + step * (self.base_lr - self.warmup_lr) / self.warmup_steps
        if self.name == "multistep":
            return self.base_lr * self.gamma ** sum(step >= m for m in self.milestones)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        lr = self.lr_at(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self._apply()


def _apex_fused_adam(groups: list[dict], kwargs: dict[str, Any]) -> torch.optim.Optimizer | None:
    """apex's FusedAdam in AdamW mode, or None when apex (or its CUDA extensions) is not installed."""
    try:
        from apex.optimizers import FusedAdam
    except ImportError:
        return None
    try:
        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    except RuntimeError as exc:  # apex installed without its compiled CUDA extensions
        log.warning("apex is importable but its FusedAdam cannot be used (%s); using torch's fused AdamW", exc)
        return None


def build_optimizer(groups: list[dict], cfg: PretrainConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW over ``groups``: apex's FusedAdam on CUDA when importable, else torch's fused AdamW.

    apex is optional and only ever used for this: its multi-tensor FusedAdam updates all parameters of a group in a
    few kernel launches. torch's ``fused=True`` AdamW does the same job on CUDA, and on the CPU (also where the update
    of an offloaded optimizer runs) it is a vectorised kernel: for SwinV2-T on this project's 2-core CPU it took 15 ms
    per update against 64 ms for torch's default per-parameter loop.
    """
    o = cfg.optimizer
    kwargs = {"lr": o.base_lr, "betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    if device_type == "cuda" and not cfg.distributed.offload_optimizer:
        fused = _apex_fused_adam(groups, kwargs)
        if fused is not None:
            return fused
    return torch.optim.AdamW(groups, fused=True, **kwargs)
