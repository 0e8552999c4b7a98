"""Image folders as map-style datasets: an epoch is a seeded order of positions, split into per-rank slices of each
global batch, so a global batch is the same for any number of ranks or workers and ``start_step`` resumes exactly.

An unreadable file's position is filled by the file of the next position (the first readable one after it, with
the original position's random draws), so every batch is full; the replaced files are counted in ``skipped``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .config import DataError
from .images import open_image
from .transform import SimMIMTransform

__all__ = ["MAX_UNREADABLE_IN_ROW", "FolderDataset", "RankBatches", "epoch_order", "read_position"]

# Past this many unreadable files in a row the data cannot be working: stop instead of silently skipping on.
MAX_UNREADABLE_IN_ROW = 1000

T = TypeVar("T")


def epoch_order(n: int, length: int, seed: int, epoch: int) -> np.ndarray:
    """File indices of one epoch: permutations of the n files drawn from (seed, epoch), chained to ``length``.

    With ``data.samples_per_epoch`` larger than the folder, the epoch runs through several permutations.
    """
    rng = np.random.default_rng([seed, epoch])
    return np.concatenate([rng.permutation(n) for _ in range(max(1, math.ceil(length / n)))])[:length]


def read_position(
    files: tuple[str, ...], order: np.ndarray, position: int, use: Callable[[Image.Image, int], T]
) -> tuple[T, int]:
    """``use(image, file_index)`` of the file at ``position`` of ``order``, or of the first readable one after it
    (cycling); returns it with the number of unreadable files passed over.

    Raises:
        DataError: :data:`MAX_UNREADABLE_IN_ROW` files in a row (or every file) were unreadable.
    """
    limit = min(MAX_UNREADABLE_IN_ROW, len(files))
    for skipped in range(limit):
        index = int(order[(position + skipped) % len(order)])
        path = files[index]
        try:
            image = open_image(path)
        except Exception as exc:
            warnings.warn(f"skipping unreadable image {path}: {exc}", stacklevel=2)
            continue
        return use(image, index), skipped
    raise DataError(f"{limit} image files in a row were unreadable (last: {path}); check the files of data.path")


class FolderDataset(Dataset):
    """Map-style dataset over positions of the epoch order; position p reads file ``order[p]``.

    Crop, flip and mask of position p come from a generator seeded with (seed, epoch, p): the same whatever the rank
    or worker that loads it, and different for a file that comes twice in one epoch.
    """

    def __init__(
        self, files: tuple[str, ...], order: np.ndarray, transform: SimMIMTransform, seed: int, epoch: int
    ) -> None:
        self.files, self.order, self.transform = files, order, transform
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, self.epoch, position])
        use = lambda image, _: self.transform(image, rng)  # noqa: E731 - one-line callback
        (tensor, mask), skipped = read_position(self.files, self.order, position, use)
        return tensor, mask, skipped


def collate_pretrain(samples: list[tuple[torch.Tensor, torch.Tensor, int]]) -> dict[str, Any]:
    """A batch of (image, mask, skipped) samples: stacked tensors and ``skipped`` as a plain int."""
    return {
        "images": torch.stack([s[0] for s in samples]),
        "mask": torch.stack([s[1] for s in samples]),
        "skipped": int(sum(s[2] for s in samples)),
    }


class RankBatches(torch.utils.data.Sampler):
    """This rank's contiguous slice of each global batch of epoch positions, from ``start_step`` on."""

    def __init__(self, steps: int, batch: int, rank: int, world: int, start_step: int) -> None:
        self.steps, self.batch, self.rank, self.world = steps, batch, rank, world
        self.start_step = start_step

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        global_batch = self.batch * self.world
        for step in range(self.start_step, self.steps):
            begin = step * global_batch + self.rank * self.batch
            yield list(range(begin, begin + self.batch))
