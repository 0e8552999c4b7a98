"""What the training loop carries from step to step: the state saved with every checkpoint, and the statistics of one
optimizer step."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch

__all__ = ["LogWindow", "StepStats", "TrainState"]


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
        for known in fields(self):
            if known.name in state:
                setattr(self, known.name, int(state[known.name]))
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
    source_samples: dict[str, int] = field(default_factory=dict)  # a mixture's samples per source, over all ranks

    @property
    def stop(self) -> bool:
        return any(self.stop_signals)


class LogWindow:
    """What the optimizer steps since the last log step add up to. The loss is summed on the device: reading it is
    left to the log step."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.applied = 0  # steps whose update was applied (their loss is in ``loss``)
        self.steps = 0
        self.samples = 0
        self.data_seconds = 0.0
        self.sources: dict[str, int] = {}
        self.start = time.perf_counter()

    def add(self, stats: StepStats) -> None:
        if stats.applied:
            self.loss += stats.loss
            self.applied += 1
        self.steps += 1
        self.samples += stats.samples
        self.data_seconds += stats.data_seconds
        for name, count in stats.source_samples.items():
            self.sources[name] = self.sources.get(name, 0) + count

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation) out of the window's time: they are not training throughput."""
        self.start += seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def mean_loss(self) -> float:
        """The mean loss of the applied steps (a host read of the device sum); NaN when none was applied."""
        return (self.loss / self.applied).item() if self.applied else float("nan")
