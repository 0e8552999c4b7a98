"""``--search``: the largest micro-batch that fits for every ZeRO stage x activation checkpointing x optimizer
offload, ranked by predicted throughput.

The recipe's global batch (``data.batch_size`` x world size x ``training.grad_accum_steps``, as the trainer and the
DeepSpeed config compute it) is kept: a candidate runs the largest micro-batch that fits *and* divides the recipe's
samples per rank and step, with the accumulation steps that restore the global batch. The largest fitting micro-batch
itself is reported beside it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..checks import ConfigError
from ..config import PretrainConfig, validate
from .throughput import FlopProfile, TimeEstimate

__all__ = [
    "CHECKPOINTING_CHOICES",
    "MAX_MICRO_BATCH",
    "Candidate",
    "Estimator",
    "largest_fitting",
    "search",
    "with_choice",
]

CHECKPOINTING_CHOICES = ("none", "every:2", "all")
# Upper end of the micro-batch search: past this the answer is "more than the recipe can use" anyway.
MAX_MICRO_BATCH = 8192

# estimate_memory's signature (pretrain.plan.memory): (cfg, *, world_size, micro_batch) -> MemoryEstimate.
Estimator = Callable[..., Any]
# (candidate config, FLOP profile) -> TimeEstimate, or None when the device has no peak figure.
TimeFn = Callable[[PretrainConfig, FlopProfile], TimeEstimate | None]


def largest_fitting(fits: Callable[[int], bool], limit: int = MAX_MICRO_BATCH) -> int:
    """The largest ``b`` in 1..limit with ``fits(b)``, assuming memory grows with the batch; 0 when 1 does not fit.

    Doubling finds a bracket, then bisection: about 2 log2(b) calls of ``fits``.
    """
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)  # fits(high) is False, or high is past the limit
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class Candidate:
    """One ZeRO stage x checkpointing x offload choice.

    Attributes:
        zero_stage, checkpointing, offload: the choice.
        max_micro_batch: the largest micro-batch that fits (0: not even 1).
        micro_batch: the largest fitting one that divides the recipe's samples per rank and step (0: none).
        grad_accum_steps: accumulation steps that keep the recipe's global batch at ``micro_batch``.
        memory: the estimate at ``micro_batch`` (at 1 when nothing fits), None when refused.
        time: the time estimate at ``micro_batch``, None when nothing fits or the device has no peak.
        refused: why the config checks refuse the choice (e.g. compile with ZeRO-3), else None.
    """

    zero_stage: int
    checkpointing: str
    offload: bool
    max_micro_batch: int
    micro_batch: int
    grad_accum_steps: int
    memory: Any
    time: TimeEstimate | None
    refused: str | None = None

    @property
    def fits(self) -> bool:
        return self.micro_batch > 0 and self.refused is None

    def overrides(self) -> list[str]:
        """The ``key=value`` overrides that select this candidate."""
        return [
            f"data.batch_size={self.micro_batch}",
            f"training.grad_accum_steps={self.grad_accum_steps}",
            f"distributed.zero_stage={self.zero_stage}",
            f"distributed.offload_optimizer={'true' if self.offload else 'false'}",
            f"model.activation_checkpointing={self.checkpointing}",
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "zero_stage": self.zero_stage,
            "activation_checkpointing": self.checkpointing,
            "offload_optimizer": self.offload,
            "max_micro_batch": self.max_micro_batch,
            "micro_batch": self.micro_batch,
            "grad_accum_steps": self.grad_accum_steps,
            "fits": self.fits,
            "refused": self.refused,
            "memory": None if self.memory is None else {**self.memory.to_dict(), "total": self.memory.total},
            "time": None if self.time is None else self.time.to_dict(),
            "overrides": self.overrides() if self.fits else [],
        }


def with_choice(
    cfg: PretrainConfig, *, zero_stage: int, checkpointing: str, offload: bool, micro_batch: int, accum: int
) -> PretrainConfig:
    """A copy of ``cfg`` with the choice applied, validated like a loaded config.

    Raises:
        ConfigError: the combination is refused (the message says why).
    """
    new = copy.deepcopy(cfg)
    new.distributed.zero_stage = zero_stage
    new.distributed.offload_optimizer = offload
    new.model.activation_checkpointing = checkpointing
    new.data.batch_size = micro_batch
    new.training.grad_accum_steps = accum
    validate(new)
    return new


def _usable_batch(max_micro_batch: int, per_rank_step: int) -> int:
    """The largest divisor of ``per_rank_step`` not above ``max_micro_batch`` (0 when nothing fits)."""
    for batch in range(min(max_micro_batch, per_rank_step), 0, -1):
        if per_rank_step % batch == 0:
            return batch
    return 0


def search(
    cfg: PretrainConfig,
    *,
    world_size: int,
    usable_bytes: float,
    estimator: Estimator,
    profile: FlopProfile,
    time_fn: TimeFn,
) -> list[Candidate]:
    """Every ZeRO stage (0-3) x ``CHECKPOINTING_CHOICES`` x offload (stages 1-3 only), best first.

    Args:
        cfg: the resolved config (its other settings, e.g. window chunking, are kept).
        world_size: ranks in total.
        usable_bytes: device memory less the margin; a micro-batch fits when the estimate's total is at most this.
        estimator: ``estimate_memory`` (or a stand-in with its signature).
        profile: the model's FLOP profile.
        time_fn: the time of a candidate config.

    Returns:
        Candidates that fit, fastest first (without times: fewest recomputed FLOPs), then those that do not fit or
        are refused. Ties (the time model charges no communication, see the CLI's assumptions): without offload
        first, ZeRO-3 last (it gathers the parameters in forward and backward, 1.5x the traffic of stages 0-2), then
        fewer accumulation steps, then less memory.
    """
    per_rank_step = cfg.data.batch_size * cfg.training.grad_accum_steps
    found = []
    for stage in (0, 1, 2, 3):
        for checkpointing in CHECKPOINTING_CHOICES:
            for offload in (False, True) if stage >= 1 else (False,):
                found.append(
                    _candidate(cfg, stage, checkpointing, offload, world_size, usable_bytes, estimator, per_rank_step)
                )
    timed = []
    for candidate in found:
        if candidate.fits:
            choice = with_choice(
                cfg,
                zero_stage=candidate.zero_stage,
                checkpointing=candidate.checkpointing,
                offload=candidate.offload,
                micro_batch=candidate.micro_batch,
                accum=candidate.grad_accum_steps,
            )
            candidate = dataclasses.replace(candidate, time=time_fn(choice, profile))
        timed.append(candidate)

    def rank(c: Candidate) -> tuple:
        # Without a peak figure there are no times: fewer recomputed FLOPs, then no offload, rank first instead.
        if c.time is not None:
            cost = 1.0 / c.time.images_per_s_total
        else:
            cost = profile.train(c.checkpointing, cfg.model.window_chunk_size)
        total = c.memory.total if c.memory is not None else 0
        return (not c.fits, cost, c.offload, c.zero_stage == 3, c.grad_accum_steps, total)

    return sorted(timed, key=rank)


def _candidate(
    cfg: PretrainConfig,
    stage: int,
    checkpointing: str,
    offload: bool,
    world_size: int,
    usable_bytes: float,
    estimator: Estimator,
    per_rank_step: int,
) -> Candidate:
    """One choice: its largest fitting micro-batch and the estimate at the batch it would run."""
    try:
        choice = with_choice(
            cfg, zero_stage=stage, checkpointing=checkpointing, offload=offload, micro_batch=1, accum=1
        )
    except ConfigError as exc:
        return Candidate(stage, checkpointing, offload, 0, 0, 0, None, None, refused=str(exc))

    def fits(batch: int) -> bool:
        return estimator(choice, world_size=world_size, micro_batch=batch).total <= usable_bytes

    largest = largest_fitting(fits)
    batch = _usable_batch(largest, per_rank_step)
    memory = estimator(choice, world_size=world_size, micro_batch=max(batch, 1))
    accum = per_rank_step // batch if batch else 0
    return Candidate(stage, checkpointing, offload, largest, batch, accum, memory, None)
