"""Held-out images for evaluation while pretraining: a deterministic transform, and loaders that give every held-out
image exactly once over all ranks with its fixed SimMIM mask.

Global sample ``g`` (the g-th image of the folder's stable order, or of the shards read in order) belongs to rank
``g % world_size`` and carries the mask drawn from ``(mask_seed, g)``: the same images with the same masks at every
evaluation, in every run, whatever the world size or batch size. Every rank yields the same number of full batches;
padding and unreadable images are marked ``valid=False`` and counted once in ``skipped``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..data import SHARD_IMAGE_KEYS, DataError, ShardSet, decode_image, list_images, to_rgb
from ..data.folder import read_position
from ..data.labelled import StridedBatches
from ..data.loader import loader_options
from ..data.source import resolve_shard_set
from ..data.stream import LostSamples, read_shard
from ..data.urls import ReadOptions
from ..masking import MaskGenerator

__all__ = ["EvalTransform", "HeldOut", "build_heldout_loader", "fixed_mask", "resolve_heldout"]

Item = tuple[torch.Tensor, torch.Tensor, bool, int]  # image, mask, valid, skipped


class EvalTransform:
    """Resize the shorter side to ``size / crop_pct`` (bicubic), centre crop ``size``, tensor, normalise: the usual
    deterministic evaluation view (DINO's kNN protocol uses 256 -> 224, crop_pct 0.875).

    Args:
        size: output side in pixels; crop_pct: the centre crop's share of the resized side.
        mean, std: per-channel normalisation (the pretraining data's).
    """

    def __init__(self, size: int, crop_pct: float, mean: list[float], std: list[float]) -> None:
        self.size, self.resize = size, math.floor(size / crop_pct)
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = TF.resize(to_rgb(image), self.resize, TF.InterpolationMode.BICUBIC, antialias=True)
        image = TF.center_crop(image, [self.size, self.size])
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)


def fixed_mask(generator: MaskGenerator, seed: int, index: int) -> torch.Tensor:
    """The mask of held-out sample ``index``: drawn from ``(seed, index)`` only."""
    return torch.from_numpy(generator(np.random.default_rng([seed, index])))


@dataclass(frozen=True)
class HeldOut:
    """Resolved held-out images: ``files`` (folder) or ``shard_set`` (shards), ``samples`` of them used."""

    kind: str
    samples: int
    files: tuple[str, ...] = ()
    shard_set: ShardSet | None = None
    options: ReadOptions | None = None


def resolve_heldout(source: str, path: str, max_samples: int | None, options: ReadOptions) -> HeldOut:
    """List and count the held-out images once (DataError naming ``eval.path`` when they cannot work).

    Args:
        source: "folder" (images under ``path``, any layout) or "webdataset" (shards).
        max_samples: use the first N images only; None = all.
        options: how remote shards are read.
    """
    where = f"eval.path={path!r}"
    if source == "folder":
        try:
            files = tuple(str(p) for p in list_images(path))
        except DataError as exc:
            raise DataError(f"eval: {exc}".replace("data.path", "eval.path")) from None
        files = files[:max_samples] if max_samples else files
        return HeldOut("folder", len(files), files=files)
    try:
        shard_set = resolve_shard_set(path, "eval", 1.0, options)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    counts = [n for n in (shard_set.samples, max_samples) if n is not None]
    if not counts:
        raise DataError(
            f"{where}: no size index (sizes.json) lists every shard, so the held-out count is unknown; accepted: "
            f"shards written by `python -m pretrain.shards`, or eval.max_samples set"
        )
    return HeldOut("webdataset", min(counts), shard_set=shard_set, options=options)


def _batches(samples: int, batch_size: int, world_size: int) -> int:
    """Full batches every rank yields: the largest rank share of ``samples``."""
    return max(1, math.ceil(math.ceil(samples / world_size) / batch_size))


def _collate(items: list[Item]) -> dict[str, Any]:
    return {
        "images": torch.stack([i[0] for i in items]),
        "mask": torch.stack([i[1] for i in items]),
        "valid": torch.tensor([i[2] for i in items], dtype=torch.bool),
        "skipped": int(sum(i[3] for i in items)),
    }


class _Folder(Dataset):
    """Global index q -> held-out image q (valid), or past the end a readable image as padding (not valid)."""

    def __init__(self, heldout: HeldOut, transform: Callable, masks: Callable[[int], torch.Tensor]) -> None:
        self.files, self.transform, self.masks = heldout.files, transform, masks
        self.order = np.arange(len(self.files))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, q: int) -> Item:
        real = q < len(self.files)
        tensor, passed = read_position(self.files, self.order, q % len(self.files), lambda im, _: self.transform(im))
        # An unreadable file's slot holds the next readable one, not valid; counted once, by the slot's rank.
        return tensor, self.masks(q), real and passed == 0, int(real and passed > 0)


class _Shards(IterableDataset):
    """One reader per rank over the shards in order; sample g (of the first ``samples``) is rank g % world's."""

    def __init__(
        self, heldout: HeldOut, transform: Callable, masks: Callable, batch: int, rank: int, world: int
    ) -> None:
        self.heldout, self.transform, self.masks = heldout, transform, masks
        self.batch, self.rank, self.world = batch, rank, world

    def _decoded(self, sample: dict[str, Any]) -> torch.Tensor | None:
        key = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
        try:
            if key is None:
                raise ValueError("no image entry (jpg, png, webp)")
            return self.transform(decode_image(sample[key]))
        except Exception as exc:
            where = f"{sample.get('__key__')!r} in {sample.get('__url__')}"
            warnings.warn(f"skipping corrupt held-out image {where}: {exc}", stacklevel=2)
            return None

    def _samples(self, lost: LostSamples) -> Iterator[dict[str, Any]]:
        shards = self.heldout.shard_set
        for url in shards.urls:  # type: ignore[union-attr]
            yield from read_shard(url, shards.sizes.get(url), self.heldout.options, lost)  # type: ignore[union-attr]

    def _items(self) -> Iterator[tuple[torch.Tensor | None, int, bool, int]]:
        lost = LostSamples()
        for g, sample in enumerate(self._samples(lost)):
            if g >= self.heldout.samples:
                break
            if g % self.world == self.rank:
                tensor = self._decoded(sample)
                yield tensor, g, tensor is not None, int(tensor is None)
        if self.rank == 0 and lost.count:  # lost at the tar level: every rank saw it, rank 0 counts it
            yield None, 0, False, lost.take()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        items, pad = self._items(), None
        for _ in range(_batches(self.heldout.samples, self.batch, self.world)):
            batch: list[Item] = []
            for _ in range(self.batch):
                tensor, g, valid, skipped = next(items, (None, 0, False, 0))
                pad = tensor if tensor is not None else pad
                if pad is None:
                    raise DataError(f"eval.path: no held-out image of {self.heldout.shard_set.urls[0]}... decodes")
                batch.append((tensor if tensor is not None else pad, self.masks(g), valid, skipped))
            yield _collate(batch)


def build_heldout_loader(
    heldout: HeldOut,
    transform: Callable[[Image.Image], torch.Tensor],
    masks: Callable[[int], torch.Tensor],
    cfg: Any,
    *,
    rank: int,
    world_size: int,
) -> DataLoader:
    """This rank's held-out batches {"images", "mask", "valid" (bool), "skipped": int}.

    Args:
        heldout: the resolved held-out images; transform: deterministic PIL -> tensor.
        masks: global sample index -> its fixed mask (:func:`fixed_mask`).
        cfg: the ``eval`` section (batch_size, num_workers) merged with the data section's worker options.
        rank, world_size: this rank and the number of ranks.
    """
    if heldout.kind == "folder":
        sampler = StridedBatches(
            _batches(heldout.samples, cfg.batch_size, world_size), cfg.batch_size, rank, world_size
        )
        dataset = _Folder(heldout, transform, masks)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate, **loader_options(cfg))
    stream = _Shards(heldout, transform, masks, cfg.batch_size, rank, world_size)
    # One reader keeps the stride over the samples in order.
    return DataLoader(stream, batch_size=None, **loader_options(cfg, min(1, cfg.num_workers)))
