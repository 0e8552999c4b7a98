"""The ``training`` config section: output folder, seed, precision, accumulation, step limits, device, profiling.

The loop that reads it is :class:`pretrain.trainer.Trainer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .checks import one_of, require
from .profiling import ProfileConfig

__all__ = ["DEVICES", "PRECISIONS", "TrainingConfig"]

PRECISIONS = ("bf16", "fp16", "fp32")
DEVICES = ("auto", "cuda", "cpu")


@dataclass
class TrainingConfig:
    output_dir: str = "runs/simmim"
    seed: int = 0
    # bf16 (default), fp16 (dynamic loss scaling) or fp32.
    precision: str = "bf16"
    grad_accum_steps: int = 1
    # Stop after this many optimizer steps (None = run the whole schedule).
    max_steps: int | None = None
    # Non-finite loss or gradients: the step's update is skipped on every rank and counted; training stops after
    # this many in a row.
    max_nonfinite_steps: int = 10
    # auto: cuda when available, else cpu.
    device: str = "auto"
    # TF32 tensor cores for fp32 matmuls and convolutions on CUDA (false: strict IEEE fp32); no effect on the CPU.
    tf32: bool = True
    # Rank 0 logs the planner's predicted peak memory and, after the second step, the measured one (memory/...
    # scalars; on the CPU every allocation up to step 2 is counted, which slows those steps; see
    # pretrain/plan/calibration.py).
    measure_memory: bool = True
    # A torch.profiler trace of a few steps (pretrain/profiling.py).
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def check(self) -> None:
        one_of("training.precision", self.precision, PRECISIONS)
        one_of("training.device", self.device, DEVICES)
        require(bool(self.output_dir), "training.output_dir is empty; accepted: a directory path")
        # numpy's and torch's generators take seeds in [0, 2**32); the trainer derives per-rank seeds from it.
        require(0 <= self.seed < 2**32, f"training.seed={self.seed}; accepted: 0 <= seed < 2**32")
        require(self.grad_accum_steps >= 1, f"training.grad_accum_steps={self.grad_accum_steps}; accepted: 1 or more")
        require(
            self.max_steps is None or self.max_steps > 0, f"training.max_steps={self.max_steps}; accepted: > 0 or null"
        )
        require(
            self.max_nonfinite_steps >= 1,
            f"training.max_nonfinite_steps={self.max_nonfinite_steps}; accepted: 1 or more",
        )
        require(
            not (self.precision == "fp16" and self.device == "cpu"),
            "training.precision=fp16 is not supported on training.device=cpu; accepted there: bf16, fp32",
        )
        self.profile.check()
