"""The ``checkpoint`` section of the configuration."""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import require

__all__ = ["CheckpointConfig"]


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    # auto: newest complete checkpoint in output_dir/checkpoints; none (an earlier run's checkpoints and metrics in
    # the directory are moved aside); or a path to a step-<N> directory.
    resume: str = "auto"
    # The run lock in output_dir (run.lock) of a run on another host counts as stale, and is taken over, when it was
    # not refreshed for this long (a live run refreshes it every few minutes). On the same host a lock is stale as
    # soon as its process is gone.
    lock_stale_hours: float = 1.0

    def check(self) -> None:
        require(self.every_steps >= 1, f"checkpoint.every_steps={self.every_steps}; accepted: 1 or more")
        require(self.keep_last >= 1, f"checkpoint.keep_last={self.keep_last}; accepted: 1 or more")
        require(
            self.lock_stale_hours > 0,
            f"checkpoint.lock_stale_hours={self.lock_stale_hours}; accepted: a positive number of hours (e.g. 1)",
        )
