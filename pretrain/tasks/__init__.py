"""Tasks: what the generic :class:`~pretrain.trainer.Trainer` trains.

A task supplies everything that depends on what is learned: the model, its parameter groups, the data, the loss of a
batch, the FLOPs per sample and pictures for the logs. The trainer owns everything else:
the engine, accumulation, the non-finite guard, preemption, logging, checkpoints and resume. SimMIM pretraining is
:class:`pretrain.tasks.simmim.SimMIMTask`; classification fine-tuning is :class:`pretrain.finetune.FinetuneTask`.

Optional hooks (the trainer calls them only where a task defines them; see :class:`TaskHooks`): ``evaluate`` at the
end of each epoch and of the run (a task with ``eval_every_steps`` is evaluated every that many steps instead of at
epoch ends: SimMIM pretraining), ``best_metric`` (the ``evaluate`` key whose maximum keeps its checkpoint),
``after_step`` after every applied update, and ``state_dict``/``load_state_dict`` for what the task carries across
a resume (saved with every checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from swinv2 import SwinTransformerV2

    from ..metrics import MetricsLogger

__all__ = ["Batch", "Task", "TaskHooks"]

# A batch as the data loader yields it: tensors plus plain-Python bookkeeping ("skipped": int, ...).
Batch = dict[str, Any]


class Task(Protocol):
    """The part of training that depends on what is learned.

    ``cfg`` is the task's whole configuration; the trainer reads only the sections every task has (model, data,
    optimizer, schedule, training, distributed, checkpoint, logging).
    """

    name: str
    cfg: Any

    def build_model(self) -> nn.Module:
        """The model on the current default device (the engine calls this inside ``deepspeed.zero.Init`` for ZeRO-3);
        initial weights from the task's own initialisation or pretrained file."""
        ...

    def backbone(self, model: nn.Module) -> SwinTransformerV2:
        """The SwinV2 backbone inside ``model`` (activation checkpointing and compilation are applied to it)."""
        ...

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups (weight decay, ``lr_scale`` for layer-wise decay)."""
        ...

    def resolve_data(self, world_size: int) -> int:
        """List and check the training data once (DataError early); returns batches per rank per epoch."""
        ...

    def batches(self, *, rank: int, world_size: int, epoch: int, start_step: int) -> Iterable[Batch]:
        """This rank's batches of ``epoch`` from batch ``start_step`` on."""
        ...

    def loss(self, engine: Any, batch: Batch, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The scalar training loss of ``batch`` (moved to ``device``, images in ``dtype``), through ``engine``."""
        ...

    def samples(self, batch: Batch) -> int:
        """Samples in ``batch`` (for throughput and images_seen)."""
        ...

    def forward_flops(self, model: nn.Module, batch: Batch, device: torch.device, dtype: torch.dtype) -> float:
        """FLOPs of one forward per sample, counted on a real batch."""
        ...

    def log_images(self, engine: Any, batch: Batch, step: int, metrics: MetricsLogger) -> None:
        """Pictures for the logs at ``step`` (e.g. SimMIM reconstructions); may do nothing."""
        ...


class TaskHooks(Protocol):
    """The optional hooks of a task (a task may define any of them; SimMIM defines ``evaluate``, ``best_metric``,
    ``eval_every_steps`` and ``predict_memory``; fine-tuning all but ``eval_every_steps`` and ``predict_memory``)."""

    # Evaluate every N optimizer steps (0: never) and at the end, instead of at epoch ends.
    eval_every_steps: int
    # Lines for the run's log about what building the model found (e.g. which pretrained weights were loaded).
    notes: list[str]
    # The key of ``evaluate``'s result whose new maximum keeps that step's checkpoint besides the last k; None: none.
    best_metric: str | None

    def evaluate(self, engine: Any, *, rank: int, world_size: int, epoch: int, final: bool) -> dict[str, float] | None:
        """Collective: metrics (the same on every rank) after ``epoch`` or at the end of the run (``final``), or None
        when the task does not evaluate then."""
        ...

    def after_step(self, engine: Any) -> None:
        """After every applied optimizer update (e.g. an EMA of the weights)."""
        ...

    def predict_memory(self, world_size: int, device_type: str) -> Any:
        """The planner's :class:`pretrain.plan.MemoryEstimate` of one rank's peak memory for this config, logged at
        start against the peak measured in the second step (:mod:`pretrain.plan.calibration`)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What the task carries across a resume (saved in every checkpoint's client state)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s value of the checkpoint a run resumes from."""
        ...
