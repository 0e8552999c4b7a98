"""Labelled images for classification: class folders (``root/<class>/**/image``) or labelled shards (``cls``
entries and ``classes.json`` beside them, as ``python -m pretrain.shards --labels`` writes).

Training (:func:`build_classification_loader`) takes a user transform (e.g. timm's) that draws from the global
Python, numpy and torch generators; each sample seeds them from (seed, epoch, position) around the transform and
restores them after, so batches are the same for any number of workers and a resumed epoch continues exactly
(folders). Evaluation (:func:`build_eval_loader`) gives every sample once over all ranks, every rank the same number
of full batches; padding and unreadable samples are marked ``valid=False`` with label -100 (cross-entropy's ignore
index).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .config import DataError, LabelledDataConfig
from .folder import RankBatches, epoch_order, read_position
from .images import SHARD_IMAGE_KEYS, decode_image
from .loader import loader_options
from .source import ShardSet, list_relative, resolve_shard_set
from .stream import LostSamples, ShardBatches, read_shard
from .urls import ReadOptions, read_beside

__all__ = [
    "CLASS_INDEX",
    "IGNORE_LABEL",
    "LabelledSource",
    "StridedBatches",
    "build_classification_loader",
    "build_eval_loader",
    "resolve_labelled_source",
]

CLASS_INDEX = "classes.json"
IGNORE_LABEL = -100  # label of padding and unreadable evaluation slots: torch's cross-entropy ignores it
Transform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class LabelledSource:
    """Resolved labelled data: ``files`` and ``labels`` (folder) or ``shard_set`` with ``label_map`` (shard class
    index -> class index, from the shards' classes.json); ``classes`` are the class names labels index."""

    kind: str
    classes: tuple[str, ...]
    samples_per_epoch: int
    files: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()
    shard_set: ShardSet | None = None
    label_map: tuple[int, ...] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _folder_source(path: str, classes: tuple[str, ...] | None, what: str) -> tuple[list[str], list[int], tuple]:
    relative = list_relative(path, what)
    loose = [r for r in relative if "/" not in r]
    if loose:
        raise DataError(
            f"{what}={path!r}: {len(loose)} images lie outside class subfolders (e.g. {loose[0]}); accepted: "
            f"root/<class>/**/image"
        )
    tops = [r.split("/", 1)[0] for r in relative]
    found = tuple(sorted(set(tops)))
    if classes is not None:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise DataError(f"{what}={path!r}: class folder {unknown[0]!r} is not a training class {list(classes)}")
    names = classes if classes is not None else found
    index = {name: i for i, name in enumerate(names)}
    return [f"{path}/{r}" for r in relative], [index[t] for t in tops], names


def _shard_classes(
    shard_set: ShardSet, classes: tuple[str, ...] | None, options: ReadOptions, what: str
) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    raw = read_beside(shard_set.urls[0], CLASS_INDEX, options)
    found = tuple(json.loads(raw)) if raw is not None else None
    if found is None:
        if classes is None:
            raise DataError(f"{what}: no {CLASS_INDEX} beside the shards; write them with `--labels`")
        return classes, None
    if classes is None:
        return found, None
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataError(f"{what}: class {unknown[0]!r} of {CLASS_INDEX} is not a training class {list(classes)}")
    return classes, tuple(classes.index(c) for c in found)


def resolve_labelled_source(
    cfg: LabelledDataConfig, split: str, world_size: int, classes: tuple[str, ...] | None = None
) -> LabelledSource:
    """List, check and count one split of labelled data once.

    Args:
        cfg: the labelled data options.
        split: "train" (``cfg.train_path``) or "val" (``cfg.val_path``).
        world_size: the number of ranks.
        classes: the training classes (for a validation split: its labels follow them); None = found in the data.

    Raises:
        DataError: missing data, images outside class folders, unknown classes, a num_classes mismatch.
    """
    if split not in ("train", "val"):
        raise DataError(f"split={split!r}; accepted: train, val")
    key = f"data.{split}_path"
    path = cfg.train_path if split == "train" else cfg.val_path
    if not path:
        raise DataError(f"{key} is empty; set it to a class folder or labelled shards")
    if cfg.source == "folder":
        files, labels, names = _folder_source(path, classes, key)
        count = (cfg.samples_per_epoch if split == "train" else None) or len(files)
        source = LabelledSource("folder", tuple(names), count, tuple(files), tuple(labels))
    else:
        options = ReadOptions.of(cfg)
        shard_set = resolve_shard_set(path, split, 1.0, options)
        names, label_map = _shard_classes(shard_set, classes, options, f"{key}={path!r}")
        count = (cfg.samples_per_epoch if split == "train" else None) or shard_set.samples
        if count is None:
            raise DataError(f"{key}={path!r}: no size index (sizes.json) lists every shard; set data.samples_per_epoch")
        source = LabelledSource("webdataset", names, count, shard_set=shard_set, label_map=label_map)
    if split == "train" and cfg.num_classes is not None and cfg.num_classes != source.num_classes:
        raise DataError(
            f"data.num_classes={cfg.num_classes} but the data has {source.num_classes} classes ({key}={path!r})"
        )
    return source


# ------------------------------------------------------------------------------------------- seeded transforms
@contextlib.contextmanager
def _global_generators(seed: int) -> Iterator[None]:
    """Python's, numpy's and torch's global generators seeded with ``seed``, restored afterwards."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def _seeded(transform: Transform, image: Image.Image, *key: int) -> torch.Tensor:
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1)
    with _global_generators(seed):
        return transform(image)


class _ClassFolder(Dataset):
    def __init__(self, source: LabelledSource, order: np.ndarray, transform: Transform, key: tuple[int, int]) -> None:
        self.files, self.labels, self.order = source.files, source.labels, order
        self.transform, self.key = transform, key

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int, int]:
        (tensor, label), skipped = read_position(
            self.files, self.order, position, lambda im, i: (_seeded(self.transform, im, *self.key, position), i)
        )
        return tensor, self.labels[label], skipped


def _collate_labelled(items: list[tuple[torch.Tensor, int, int]]) -> dict[str, Any]:
    return {
        "images": torch.stack([i[0] for i in items]),
        "labels": torch.tensor([i[1] for i in items], dtype=torch.int64),
        "skipped": int(sum(i[2] for i in items)),
    }


class _LabelledDecoder:
    """A labelled shard sample -> (tensor, label); None (after a warning) without a decodable image or label."""

    def __init__(self, transform: Transform, label_map: tuple[int, ...] | None) -> None:
        self.transform, self.label_map = transform, label_map

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> tuple[torch.Tensor, int] | None:
        key = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
        try:
            if key is None or "cls" not in sample:
                raise ValueError("no image entry (jpg, png, webp) or no cls label")
            label = int(sample["cls"])
            label = self.label_map[label] if self.label_map is not None else label
            image = decode_image(sample[key])
        except Exception as exc:
            where = f"{sample.get('__key__')!r} in {sample.get('__url__')}"
            warnings.warn(f"skipping corrupt image {where}: {exc}", stacklevel=1)
            return None
        return _seeded(self.transform, image, int(rng.integers(2**62))), label


def _collate_stream(items: list[tuple[torch.Tensor, int]], skipped: int, _sources: Any) -> dict[str, Any]:
    return _collate_labelled([(t, label, 0) for t, label in items]) | {"skipped": int(skipped)}


def build_classification_loader(
    cfg: LabelledDataConfig,
    source: LabelledSource,
    transform: Transform,
    *,
    rank: int,
    world_size: int,
    epoch: int,
    seed: int,
    start_step: int = 0,
) -> DataLoader:
    """This rank's training batches {"images", "labels" (int64), "skipped": int} of one epoch.

    Args:
        cfg: the labelled data options; source: the resolved training split.
        transform: PIL image -> tensor (may draw from the global generators; they are seeded per sample).
        rank, world_size: this rank and the number of ranks; epoch, seed: enter every draw.
        start_step: batches of this epoch already consumed (resume).
    """
    steps = source.samples_per_epoch // (cfg.batch_size * world_size)
    if steps == 0 or not 0 <= start_step <= steps:
        raise DataError(
            f"start_step={start_step} with {steps} steps per epoch ({source.samples_per_epoch} samples, batch "
            f"{cfg.batch_size} x {world_size} ranks)"
        )
    if source.kind == "folder":
        order = epoch_order(len(source.files), steps * cfg.batch_size * world_size, seed, epoch)
        dataset = _ClassFolder(source, order, transform, (seed, epoch))
        sampler = RankBatches(steps, cfg.batch_size, rank, world_size, start_step)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate_labelled, **loader_options(cfg))
    position = {"seed": seed, "epoch": epoch, "rank": rank, "world_size": world_size}
    position.update(start_step=start_step, steps=steps)
    data = {"batch_size": cfg.batch_size, "resampled": cfg.resampled, "shuffle_buffer": cfg.shuffle_buffer}
    data["options"] = ReadOptions.of(cfg)
    decoder = _LabelledDecoder(transform, source.label_map)
    stream = ShardBatches((source.shard_set,), decoder, _collate_stream, position, data, None)  # type: ignore[arg-type]
    return DataLoader(stream, batch_size=None, **loader_options(cfg))


# ------------------------------------------------------------------------------------------------- evaluation
def _eval_batches(samples: int, batch_size: int, world_size: int) -> int:
    """Batches every rank yields: its strided share of the samples (the largest share), in full batches."""
    return max(1, math.ceil(math.ceil(samples / world_size) / batch_size))


def _eval_item(tensor: torch.Tensor, label: int, valid: bool, skipped: int) -> tuple[torch.Tensor, int, bool, int]:
    return tensor, label if valid else IGNORE_LABEL, valid, skipped


def _collate_eval(items: list[tuple[torch.Tensor, int, bool, int]]) -> dict[str, Any]:
    return {
        "images": torch.stack([i[0] for i in items]),
        "labels": torch.tensor([i[1] for i in items], dtype=torch.int64),
        "valid": torch.tensor([i[2] for i in items], dtype=torch.bool),
        "skipped": int(sum(i[3] for i in items)),
    }


class _EvalFolder(Dataset):
    """Global index q -> file q (valid), or for q past the end a readable file as padding (not valid)."""

    def __init__(self, source: LabelledSource, transform: Transform) -> None:
        self.files, self.labels, self.transform = source.files, source.labels, transform
        self.order = np.arange(len(self.files))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, q: int) -> tuple[torch.Tensor, int, bool, int]:
        real = q < len(self.files)
        (tensor, index), passed = read_position(
            self.files, self.order, q % len(self.files), lambda im, i: (self.transform(im), i)
        )
        # An unreadable file is counted once, by the rank whose slot it is; its slot holds the next file, not valid.
        return _eval_item(tensor, self.labels[index], real and passed == 0, int(real and passed > 0))


class StridedBatches(torch.utils.data.Sampler):
    """Evaluation batches of one rank: batch b holds global positions ``rank + (b * batch + k) * world``, so the
    ranks together read positions 0, 1, 2, ... once each (the last ones padding past the end)."""

    def __init__(self, batches: int, batch: int, rank: int, world: int) -> None:
        self.batches, self.batch, self.rank, self.world = batches, batch, rank, world

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.batches):
            yield [self.rank + (b * self.batch + k) * self.world for k in range(self.batch)]


class _EvalShards(IterableDataset):
    """One reader per rank over every shard in order; global sample g belongs to rank g % world_size."""

    def __init__(self, source: LabelledSource, transform: Transform, cfg: LabelledDataConfig, rank: int, world: int):
        self.shard_set, self.transform, self.rank, self.world = source.shard_set, transform, rank, world
        self.decode = _LabelledDecoder(transform, source.label_map)
        self.batch, self.options = cfg.batch_size, ReadOptions.of(cfg)
        self.batches = _eval_batches(source.samples_per_epoch, cfg.batch_size, world)

    def _samples(self, lost: LostSamples) -> Iterator[dict[str, Any]]:
        for url in self.shard_set.urls:  # type: ignore[union-attr]
            yield from read_shard(url, self.shard_set.sizes.get(url), self.options, lost)  # type: ignore[union-attr]

    def _template(self) -> tuple[torch.Tensor, int]:
        """A decodable sample to pad with (a rank whose share holds none)."""
        rng = np.random.default_rng(0)
        for sample in self._samples(LostSamples()):
            item = self.decode(sample, rng)
            if item is not None:
                return item
        raise DataError(f"no sample of {self.shard_set.urls[0]}... could be decoded")  # type: ignore[union-attr]

    def _items(self) -> Iterator[tuple[torch.Tensor | None, int, bool, int]]:
        lost, rng = LostSamples(), np.random.default_rng(0)  # the eval transform is deterministic; rng unused
        for g, sample in enumerate(self._samples(lost)):
            if g % self.world == self.rank:
                item = self.decode(sample, rng)
                yield (item[0], item[1], True, 0) if item is not None else (None, IGNORE_LABEL, False, 1)
        if self.rank == 0 and lost.count:
            yield None, IGNORE_LABEL, False, lost.take()  # samples lost at the tar level, counted once

    def __iter__(self) -> Iterator[dict[str, Any]]:
        items, pad = self._items(), None
        for _ in range(self.batches):
            batch = [next(items, (None, IGNORE_LABEL, False, 0)) for _ in range(self.batch)]
            for i, (tensor, label, valid, skipped) in enumerate(batch):
                pad = tensor if tensor is not None else pad
                if tensor is None:
                    pad = pad if pad is not None else self._template()[0]
                    batch[i] = (pad, label, valid, skipped)
            yield _collate_eval(batch)  # type: ignore[arg-type]


def build_eval_loader(
    cfg: LabelledDataConfig, source: LabelledSource, transform: Transform, *, rank: int, world_size: int
) -> DataLoader:
    """This rank's evaluation batches {"images", "labels", "valid" (bool), "skipped": int}: every sample once over
    all ranks (rank r takes samples r, r + world_size, ...), every rank the same number of full batches.

    Args:
        cfg: the labelled data options; source: the resolved validation split.
        transform: PIL image -> tensor (deterministic).
        rank, world_size: this rank and the number of ranks.
    """
    batches = _eval_batches(source.samples_per_epoch, cfg.batch_size, world_size)
    if source.kind == "folder":
        sampler = StridedBatches(batches, cfg.batch_size, rank, world_size)
        dataset = _EvalFolder(source, transform)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate_eval, **loader_options(cfg))
    # One reader keeps the stride over the samples in order (evaluation sets are read once per evaluation).
    stream = _EvalShards(source, transform, cfg, rank, world_size)
    return DataLoader(stream, batch_size=None, **loader_options(cfg, min(1, cfg.num_workers)))
