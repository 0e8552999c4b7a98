"""A torch.profiler window over a few optimizer steps, traced into the run directory (section ``training.profile``).

Off by default. When enabled, the ranks listed in ``ranks`` trace optimizer steps ``start_step`` to
``start_step + steps - 1`` (after ``warmup_steps`` traced-and-discarded steps, so that the profiler's own start-up cost
stays out of the window) and write, per rank, into ``run_dir/profile/``:

- ``rank{R}.steps{A}-{B}.pt.trace.json.gz``: the Chrome trace of the window (CPU ops, and CUDA kernels on GPUs).
  Perfetto (https://ui.perfetto.dev) and chrome://tracing open it as it is; TensorBoard shows it with the
  torch-tb-profiler plugin (``tensorboard --logdir RUN_DIR/profile``, which looks for ``*.pt.trace.json*`` files).
- ``rank{R}.steps{A}-{B}.txt``: the ops that took the most time in the window, as a table (for a first look on a
  cluster without a browser).

Only steps ahead of where the run (re)starts are traced: a resumed run whose window lies wholly or partly behind its
start step traces nothing and says so. A run that stops inside the window writes the steps it traced.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import fsync_dir, write_text_atomic
from .checks import require

__all__ = ["PROFILE_DIR", "ProfileConfig", "ProfileWindow"]

PROFILE_DIR = "profile"  # under the run directory


@dataclass
class ProfileConfig:
    enabled: bool = False
    # First optimizer step of the window (steps count from 1, as in the logs).
    start_step: int = 10
    # Optimizer steps in the window.
    steps: int = 3
    # Steps traced just before the window and discarded (the profiler's start-up distorts the first traced step).
    warmup_steps: int = 1
    # Ranks that trace; [] = every rank. One rank per node is usually enough: ranks mostly run the same kernels.
    ranks: list[int] = field(default_factory=lambda: [0])
    # Input shapes of each op (grouped tables by shape; larger traces).
    record_shapes: bool = False
    # Allocations and frees of tensors (memory timeline; larger traces).
    profile_memory: bool = False
    # Python call stacks of each op (much larger traces and slower steps).
    with_stack: bool = False

    def check(self) -> None:
        key = "training.profile"
        require(self.start_step >= 1, f"{key}.start_step={self.start_step}; accepted: 1 or more")
        require(self.steps >= 1, f"{key}.steps={self.steps}; accepted: 1 or more")
        require(
            0 <= self.warmup_steps < self.start_step,
            f"{key}.warmup_steps={self.warmup_steps} with start_step={self.start_step}; accepted: 0 <= warmup_steps "
            f"< start_step (the warm-up steps come before the window)",
        )
        require(
            all(rank >= 0 for rank in self.ranks) and len(set(self.ranks)) == len(self.ranks),
            f"{key}.ranks={list(self.ranks)}; accepted: distinct ranks >= 0, or [] for every rank",
        )


class ProfileWindow:
    """Runs torch.profiler over the configured window of optimizer steps on the configured ranks.

    Call :meth:`step` after every optimizer step with the number of the step just completed, and :meth:`close` when
    the run ends. Construct it right before the first step of this start of the run (the profiler starts at once
    when the window's warm-up begins with that step).

    Args:
        cfg: the ``training.profile`` section.
        run_dir: the run directory (traces go to ``run_dir/profile/``).
        rank: this process's rank.
        start_step: the optimizer step the run continues after (0 for a new run).
    """

    def __init__(self, cfg: ProfileConfig, run_dir: Path, rank: int, start_step: int = 0) -> None:
        self.cfg = cfg
        self.rank = rank
        self.out_dir = run_dir / PROFILE_DIR
        self.first = cfg.start_step - cfg.warmup_steps  # first step under the profiler (its warm-up)
        self.last = cfg.start_step + cfg.steps - 1
        self.trace_files: list[Path] = []
        self.profiler: torch.profiler.profile | None = None
        self._recorded: list[int] = []  # steps of the window completed under the profiler
        self._next = start_step + 1
        self.enabled = cfg.enabled and (not cfg.ranks or rank in cfg.ranks)
        self.note = self._plan(start_step)
        if self.enabled and self.first == self._next:
            self._start()

    def _plan(self, start_step: int) -> str:
        """What this window will do, as a line for the log; disables a window that is already behind the run."""
        cfg = self.cfg
        if not cfg.enabled:
            return "profiler off"
        if not self.enabled:
            return f"profiler: rank {self.rank} is not in training.profile.ranks={list(cfg.ranks)}"
        if self.first <= start_step:
            self.enabled = False
            return (
                f"profiler: the window (steps {cfg.start_step}-{self.last}, warm-up from step {self.first}) is not "
                f"ahead of step={start_step} where this run continues: nothing traced"
            )
        return f"profiler: steps {cfg.start_step}-{self.last} traced into {self.out_dir}"

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=0, warmup=self.cfg.warmup_steps, active=self.cfg.steps, repeat=1),
            on_trace_ready=self._save,
            record_shapes=self.cfg.record_shapes,
            profile_memory=self.cfg.profile_memory,
            with_stack=self.cfg.with_stack,
        )
        self.profiler.start()

    def step(self, step: int) -> None:
        """After optimizer step ``step``: advance the profiler, start it before the warm-up, stop it after the window.

        Args:
            step: the number of the optimizer step just completed (1 for the first step of a new run).
        """
        if not self.enabled:
            return
        if self.profiler is None:
            if step + 1 == self.first:
                self._start()
            return
        if step >= self.cfg.start_step:
            self._recorded.append(step)
        self.profiler.step()  # after the window's last step this writes the trace (schedule: RECORD_AND_SAVE)
        if step >= self.last:
            self._finish()

    def close(self) -> None:
        """Stop the profiler if the run ends inside the window, writing the steps it traced."""
        if self.profiler is not None:
            self._finish()

    def _finish(self) -> None:
        profiler, self.profiler = self.profiler, None
        self.enabled = False
        assert profiler is not None
        profiler.stop()
        if self._recorded and not self.trace_files:
            self._save(profiler)  # stopped inside the window: the schedule never reached its save point

    def _save(self, profiler: Any) -> None:
        """Write the trace and the summary table; an existing file is never replaced (a later start of the run that
        traces the same steps again, after resuming from an earlier checkpoint, gets a numbered name)."""
        steps = self._recorded or [self.cfg.start_step]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"rank{self.rank}.steps{steps[0]}-{steps[-1]}"
        number = 0
        while (self.out_dir / f"{stem}.pt.trace.json.gz").exists() or (self.out_dir / f"{stem}.txt").exists():
            number += 1
            stem = f"rank{self.rank}.steps{steps[0]}-{steps[-1]}.{number}"
        trace = self.out_dir / f"{stem}.pt.trace.json.gz"
        partial = self.out_dir / f".{stem}.partial.json.gz"  # torch gzips a path ending in .gz
        profiler.export_chrome_trace(str(partial))
        os.replace(partial, trace)
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=40)
        header = f"optimizer steps {steps[0]}-{steps[-1]}, rank {self.rank}, sorted by {sort_by}"
        write_text_atomic(self.out_dir / f"{stem}.txt", f"{header}\n{table}\n")
        fsync_dir(self.out_dir)
        self.trace_files.append(trace)
