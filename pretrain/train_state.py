"""What the training loop carries from step to step: the state saved with every checkpoint, and the statistics of one
optimizer step."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch

__all__ = ["StepStats", "TrainState"]


@dataclass
class TrainState:
    """What the loop needs to continue exactly where a checkpoint left it (saved in every checkpoint).

    ``epoch_samples`` counts the samples of the current epoch consumed over all ranks: it converts to this run's
    batches whatever the world size or micro-batch.
    """

    FORMAT_VERSION: ClassVar[int] = 2

    step: int = 0
    epoch: int = 0
    epoch_samples: int = 0
    images_seen: int = 0
    skipped_samples: int = 0
    nonfinite_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"format_version": self.FORMAT_VERSION, **asdict(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a saved state; version 1 (checkpoints written before the version was stored) has no
        ``epoch_samples`` in its oldest form, only per-rank batches and the saving run's batch and world size."""
        version = int(state.get("format_version", 1))
        if version > self.FORMAT_VERSION:
            raise ValueError(
                f"train state format {version} is newer than this code understands ({self.FORMAT_VERSION}); "
                f"update swinv2-pretrain to resume this checkpoint"
            )
        for field in fields(self):
            if field.name in state:
                setattr(self, field.name, int(state[field.name]))
        if "epoch_samples" not in state:
            batch = int(state["config"]["data"]["batch_size"])
            self.epoch_samples = int(state["data_position"]) * batch * int(state["world_size"])


@dataclass
class StepStats:
    """Named statistics of one optimizer step, the same on every rank.

    ``loss`` stays a device tensor (the mean loss of the step over all ranks and micro-batches) so that reading it
    is left to the log steps.
    """

    loss: torch.Tensor
    applied: bool
    nonfinite_loss: bool
    nonfinite_grads: bool
    weights_nonfinite: bool
    skipped_samples: int
    samples: int
    stop_signals: tuple[bool, bool]  # (SIGTERM or SIGUSR1 on some rank, SIGINT on some rank)
    data_seconds: float

    @property
    def stop(self) -> bool:
        return any(self.stop_signals)
