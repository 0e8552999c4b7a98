"""Every run calibrates the planner: the peak memory it predicts for this rank, against the peak measured in the
run's second step (the first steady one), in the log and as ``memory/...`` scalars (TensorBoard, metrics.jsonl).

The first step of a start also builds what DeepSpeed creates lazily (the optimizer states), so the steady peak is that
of the second step: everything alive when it starts (weights, gradients, masters, optimizer states, buffers) plus what
it allocates (activations, gradient buckets, the update's temporaries). That is the moment ``estimate_memory`` models.

How it is measured, per device:

- CUDA: ``torch.cuda.reset_peak_memory_stats`` after step 1, ``torch.cuda.max_memory_allocated`` after step 2. It
  costs nothing.
- CPU: PyTorch keeps no allocation totals, so the tracker (:func:`pretrain.plan.tracker.track_peak`) runs from just
  before the engine is built to the end of step 2 and reports the bytes alive at a mark after step 1 plus the highest
  point after it. It sees every allocation, which slows those steps down (``training.measure_memory=false`` turns it
  off). Not measured there: a resumed start (its state was allocated while loading the checkpoint, not as training
  does), ``model.compile`` (the compiler does not trace through the tracker) and a ``training.profile`` window (one
  profiler at a time).

The tracker's CPU method: the allocator's own events (``allocator``), except for ZeRO-3 over several ranks, whose
gathered parameters are freed on gloo's threads, which only the ``tensors`` method follows (see the tracker).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch

from .devices import GIB
from .memory import MemoryEstimate
from .tracker import PeakTracker, profiler_active, track_peak

__all__ = ["MemoryCalibration", "calibration_for_run"]

_MARK = "step1"


class MemoryCalibration:
    """Predicted against measured peak memory of one rank, in the second step of a start.

    Args:
        predicted: the planner's estimate for this rank (None: the task has no memory model).
        device: the rank's device.
        enabled: measure (``training.measure_memory`` on this rank).
        cpu_method: the CPU tracker's method (``allocator`` or ``tensors``).
        cpu_blocker: why the CPU measurement cannot run in this start (None: it can).
    """

    def __init__(
        self,
        predicted: MemoryEstimate | None,
        device: torch.device,
        enabled: bool,
        cpu_method: str = "allocator",
        cpu_blocker: str | None = None,
    ) -> None:
        self.predicted = predicted
        self.device = device
        self.enabled = enabled
        self.cpu_method = cpu_method
        self.cpu_blocker = cpu_blocker if device.type == "cpu" else None
        self._stack = ExitStack()
        self._tracker: PeakTracker | None = None

    def describe_prediction(self) -> str:
        """The start-up line: the predicted peak and its parts."""
        p = self.predicted
        if p is None:
            return "memory: no prediction for this task (the planner models SimMIM pretraining)"
        parts = ", ".join(f"{name} {value / GIB:.3f}" for name, value in p.to_dict().items() if value)
        return f"memory: predicted peak {p.total / GIB:.3f} GiB per rank (pretrain.plan; GiB: {parts})"

    def begin(self) -> None:
        """Just before the engine is built: start the CPU tracker."""
        if not (self.enabled and self.device.type == "cpu" and self.cpu_blocker is None):
            return
        if self.cpu_method == "allocator" and profiler_active():
            # One profiler per process: another trainer of this process, or the caller's own, is recording.
            self.cpu_blocker = "another torch.profiler is recording in this process"
            return
        self._tracker = self._stack.enter_context(track_peak(self.device, method=self.cpu_method))

    def after_step(self, step_of_start: int) -> tuple[str, dict[str, float]] | None:
        """After each step (1 = this start's first): marks step 1's end; after step 2, (log line, scalars) when
        something was measured."""
        if step_of_start == 1:
            self._after_first_step()
        elif step_of_start == 2:
            return self._finish()
        return None

    def _after_first_step(self) -> None:
        """Between steps 1 and 2: the steady peak is measured from here."""
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._tracker is not None:
            self._tracker.mark(_MARK)

    def _finish(self) -> tuple[str, dict[str, float]] | None:
        """After step 2: (log line, scalars), or None when measuring is off."""
        if not self.enabled:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            measured = torch.cuda.max_memory_allocated(self.device)
            how = "torch.cuda.max_memory_allocated"
        elif self._tracker is not None:
            self._stack.close()
            measured = self._tracker.peak_since(_MARK)
            how = f"every allocation since the engine was built, {self.cpu_method} method"
            self._tracker = None
        else:
            return f"memory: peak not measured on the CPU in this start ({self.cpu_blocker})", {}
        scalars = {"memory/measured_peak_gib": measured / GIB}
        line = f"memory: measured peak {measured / GIB:.3f} GiB in step 2 ({how})"
        if self.predicted is not None:
            predicted = self.predicted.total
            scalars["memory/predicted_peak_gib"] = predicted / GIB
            scalars["memory/measured_over_predicted"] = measured / predicted
            line += f"; predicted {predicted / GIB:.3f} GiB, measured/predicted {measured / predicted:.3f}"
        return line, scalars

    def close(self) -> None:
        """Stop a measurement still running (a run that ended before its second step)."""
        self._tracker = None
        self._stack.close()


def calibration_for_run(
    cfg: Any, task: Any, rank: int, world_size: int, device: torch.device, resumed_from: Any
) -> tuple[MemoryCalibration, str]:
    """The trainer's calibration for this start and its start-up line: rank 0 predicts (tasks define
    ``predict_memory`` when the planner models them; a config it cannot model gives the reason instead of stopping
    the run) and measures."""
    predicted, why_not = None, None
    hook = getattr(task, "predict_memory", None)
    if rank == 0 and hook is not None:
        try:
            predicted = hook(world_size, device.type)
        except (ValueError, KeyError, NotImplementedError) as exc:
            why_not = f"memory: no prediction ({type(exc).__name__}: {exc})"
    blockers = {
        "a resumed start": resumed_from is not None,
        "model.compile": cfg.model.compile,
        "training.profile": cfg.training.profile.enabled,
    }
    calibration = MemoryCalibration(
        predicted,
        device,
        cfg.training.measure_memory and rank == 0,
        cpu_method="tensors" if cfg.distributed.zero_stage == 3 and world_size > 1 else "allocator",
        cpu_blocker=next((name for name, present in blockers.items() if present), None),
    )
    return calibration, why_not or calibration.describe_prediction()
