"""Weighted mixtures of shard sets: how many samples of each source every global batch takes, and where.

The counts follow the weights as closely as integers can: after every step, each source's running total is within
one sample of its exact share (weight / total weight x samples so far). Within a global batch the sources' slots are
placed by a generator seeded with (seed, epoch, step), and each rank takes its contiguous slice of the slots, so the
global batch is the same for any number of ranks and a resumed epoch continues the same plan.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

__all__ = ["MixturePlan", "batch_counts"]

_PLACEMENT = 0x6D6978  # separates the placement generator from every other (seed, epoch, ...) generator


def batch_counts(weights: Sequence[float], batch: int, steps: int) -> np.ndarray:
    """Samples of each source in each of ``steps`` batches of ``batch``: an int array (steps, sources).

    Samples are assigned one at a time to the source furthest behind its exact share (largest deficit), which keeps
    every running total within one sample of its share and every count non-negative.

    Args:
        weights: positive relative weights of the sources.
        batch: samples per batch.
        steps: number of batches.
    """
    return np.array(_counts(tuple(float(w) for w in weights), batch, steps), dtype=np.int64).reshape(steps, -1)


@functools.lru_cache(maxsize=8)
def _counts(weights: tuple[float, ...], batch: int, steps: int) -> list[list[int]]:
    # Plain Python: with a handful of sources a list beats numpy's per-call overhead several-fold, and an epoch of
    # ImageNet at a global batch of 2048 assigns 1.3 M samples. Cached: every epoch of a run has the same plan.
    share = [w / sum(weights) for w in weights]
    sources = range(len(share))
    totals = [0] * len(share)
    counts = []
    for step in range(steps):
        row = [0] * len(share)
        for k in range(step * batch + 1, (step + 1) * batch + 1):
            pick = max(sources, key=lambda i: k * share[i] - totals[i])
            totals[pick] += 1
            row[pick] += 1
        counts.append(row)
    return counts


class MixturePlan:
    """The source of every slot of every global batch of an epoch.

    Args:
        weights: the sources' weights.
        global_batch: samples per step over all ranks.
        steps: steps of the epoch.
        seed, epoch: seed the placement of the sources within each global batch.
    """

    def __init__(self, weights: Sequence[float], global_batch: int, steps: int, seed: int, epoch: int) -> None:
        self.counts = batch_counts(weights, global_batch, steps)
        self.seed, self.epoch = seed, epoch

    def slots(self, step: int, rank: int, batch: int) -> list[int]:
        """Source index of each of rank ``rank``'s ``batch`` slots at ``step``."""
        labels = np.repeat(np.arange(self.counts.shape[1]), self.counts[step])
        placement = np.random.default_rng([self.seed, self.epoch, step, _PLACEMENT]).permutation(len(labels))
        return labels[placement][rank * batch : (rank + 1) * batch].tolist()
