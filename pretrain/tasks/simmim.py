"""SimMIM pretraining as a task of the generic trainer: masked-image reconstruction with an L1 loss."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..data import DataSource, build_pretrain_loader, resolve_source
from ..metrics import count_forward_flops
from ..simmim import SimMIM, build_simmim, simmim_param_groups
from . import Batch
from .simmim_eval import PretrainEvaluator

if TYPE_CHECKING:
    from swinv2 import SwinTransformerV2

    from ..config import PretrainConfig
    from ..metrics import MetricsLogger
    from ..plan.memory import MemoryEstimate

__all__ = ["SimMIMTask"]


class SimMIMTask:
    """SimMIM pretraining of a SwinV2 backbone (spec §3).

    Args:
        cfg: the resolved pretraining configuration.
    """

    name = "simmim"

    # Pretraining keeps no best checkpoint: its evaluation monitors, it does not select.
    best_metric: str | None = None

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.source: DataSource | None = None  # resolved once, by resolve_data
        self.evaluator: PretrainEvaluator | None = None  # the eval section's data, resolved once by resolve_data
        # Where and at which step pictures go: log_images, called after every step, records them, so that an
        # evaluation right after it (the trainer evaluates after the step's pictures and save) draws its own.
        self._pictures_to: tuple[MetricsLogger, int] | None = None

    @property
    def eval_every_steps(self) -> int:
        """The trainer evaluates this task every N steps (and at the end) instead of at epoch ends; 0 = never."""
        return self.cfg.eval.every_steps

    def predict_memory(self, world_size: int, device_type: str) -> MemoryEstimate:
        """The planner's peak memory per rank for this config (logged at start, against the measured peak)."""
        from ..plan.memory import estimate_memory

        return estimate_memory(self.cfg, world_size=world_size, device=device_type)

    def build_model(self) -> SimMIM:
        return build_simmim(self.cfg)

    def backbone(self, model: nn.Module) -> SwinTransformerV2:
        return model.encoder  # type: ignore[return-value]

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return simmim_param_groups(model, self.cfg)  # type: ignore[arg-type]

    def resolve_data(self, world_size: int) -> int:
        # Listed (or its index read) once per run: each epoch's loader reuses it.
        self.source = resolve_source(self.cfg.data, world_size)
        if self.cfg.eval.every_steps:
            self.evaluator = PretrainEvaluator(self.cfg, world_size)
        return self.source.steps_per_epoch(self.cfg.data.batch_size, world_size)

    def batches(self, *, rank: int, world_size: int, epoch: int, start_step: int) -> Iterable[Batch]:
        return build_pretrain_loader(
            self.cfg, self.source, rank=rank, world_size=world_size, epoch=epoch, start_step=start_step
        )

    @staticmethod
    def _inputs(batch: Batch, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["images"].to(device, dtype=dtype, non_blocking=True)
        return images, batch["mask"].to(device, non_blocking=True)

    def loss(self, engine: Any, batch: Batch, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return engine(*self._inputs(batch, device, dtype))

    def samples(self, batch: Batch) -> int:
        return int(batch["images"].shape[0])

    def forward_flops(self, model: nn.Module, batch: Batch, device: torch.device, dtype: torch.dtype) -> float:
        images, mask = self._inputs(batch, device, dtype)
        return count_forward_flops(model, images[:1], mask[:1])

    def log_images(self, engine: Any, batch: Batch, step: int, metrics: MetricsLogger) -> None:
        self._pictures_to = (metrics, step)
        every = self.cfg.logging.image_every
        if not every or step % every:
            return
        images, mask = self._inputs(batch, engine.device, _module_dtype(engine.module))
        with torch.no_grad():
            _, reconstruction = engine.module.reconstruct(images, mask)
            shown = engine.module.to_input_space(reconstruction.float(), images.float(), mask)
        metrics.log_images(
            step,
            images,
            mask,
            shown,
            list(self.cfg.data.mean),
            list(self.cfg.data.std),
            self.cfg.model.patch_size,
        )

    def evaluate(self, engine: Any, *, rank: int, world_size: int, epoch: int, final: bool) -> dict[str, float] | None:
        """Collective: the ``eval`` section's metrics (fixed-mask reconstruction loss, kNN top-1) and held-out
        pictures; None when ``eval.every_steps`` is 0. The trainer calls it every ``eval_every_steps`` and at the
        end."""
        if self.evaluator is None:
            return None
        scalars, pictures = self.evaluator.evaluate(engine.module, rank=rank, world_size=world_size)
        if pictures is not None and self._pictures_to is not None:
            self.evaluator.draw(pictures, self._pictures_to[1], self._pictures_to[0])
        return scalars


def _module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the engine runs the module in (DeepSpeed casts the whole module for bf16/fp16)."""
    for parameter in module.parameters():
        return parameter.dtype
    return torch.float32
