"""What an epoch reads, resolved once before training: the image files of a folder, or the shard sets (one, or a
weighted mixture) with their sample counts.

:func:`resolve_source` lists, checks and counts everything that can be wrong before any worker starts: missing
files, unreachable URLs (the first and last shard of every set are probed), missing or corrupt size indexes, too few
shards for the readers. The trainer calls it once; every epoch's loader reuses the result without listing again.
"""

from __future__ import annotations

import json
import os
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DataConfig, DataError, source_name
from .images import IMAGE_EXTENSIONS
from .urls import ReadOptions, expand_shards, probe_shard, read_beside, url_kind

__all__ = [
    "SIZE_INDEX",
    "DataSource",
    "ShardSet",
    "count_samples",
    "list_images",
    "list_relative",
    "read_size_index",
    "resolve_shard_set",
    "resolve_source",
]

SIZE_INDEX = "sizes.json"


@dataclass(frozen=True)
class ShardSet:
    """One set of shards: its locations, the sample count of each shard its size index lists, its total (None when
    unknown) and its weight in a mixture."""

    name: str
    urls: tuple[str, ...]
    sizes: dict[str, int] = field(default_factory=dict)
    samples: int | None = None
    weight: float = 1.0


@dataclass(frozen=True)
class DataSource:
    """The resolved data of a run: ``kind`` "folder" (``files``) or "webdataset" (``shard_sets``), and the samples of
    one epoch over all ranks."""

    kind: str
    samples_per_epoch: int
    files: tuple[str, ...] = ()
    shard_sets: tuple[ShardSet, ...] = ()

    @property
    def is_mixture(self) -> bool:
        return len(self.shard_sets) > 1

    def steps_per_epoch(self, batch_size: int, world_size: int) -> int:
        """Batches every rank yields per epoch: samples // (batch_size * world_size).

        Raises:
            DataError: that is 0.
        """
        global_batch = batch_size * world_size
        steps = self.samples_per_epoch // global_batch
        if steps == 0:
            raise DataError(
                f"{self.samples_per_epoch} samples per epoch is fewer than one global batch ({batch_size} x "
                f"{world_size} ranks = {global_batch}); lower data.batch_size or add data"
            )
        return steps


# ------------------------------------------------------------------------------------------------------ folders
def list_relative(root: str | Path, what: str = "data.path") -> list[str]:
    """Paths (relative to ``root``, with ``/``) of every image file under ``root``, recursively, in a stable order
    (sorted by path components).

    Raises:
        DataError: ``root`` is not a folder, or holds no image files.
    """
    root = str(root)
    if not os.path.isdir(root):
        raise DataError(f"{what}={root!r} is not a directory (a folder of images is expected)")
    found: list[str] = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs.sort()
        base = os.path.relpath(folder, root)
        for name in names:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(name if base == "." else f"{base.replace(os.sep, '/')}/{name}")
    if not found:
        raise DataError(f"{what}={root!r} holds no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return sorted(found, key=lambda r: r.split("/"))


def list_images(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (recursive, any class layout), in the stable order of :func:`list_relative`."""
    return [Path(root) / r for r in list_relative(root)]


# ------------------------------------------------------------------------------------------------ size indexes
def _index_of(url: str, options: ReadOptions, cache: dict[str, dict[str, int] | None]) -> dict[str, int] | None:
    """The size index beside ``url`` (cached per folder, a corrupt one as ``{}`` after a warning); None if absent."""
    folder = url.rsplit("/", 1)[0] if "/" in url else "."
    if folder in cache:
        return cache[folder]
    raw = read_beside(url, SIZE_INDEX, options)
    index = None
    if raw is not None:
        try:
            index = {str(k): int(v) for k, v in json.loads(raw).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            fallback = (
                "falling back to counting the samples of the shards"
                if url_kind(url) == "local"
                else "remote shards cannot be counted before training"
            )
            warnings.warn(f"size index {folder}/{SIZE_INDEX} is corrupt ({exc}); {fallback}", stacklevel=2)
            index = {}
    cache[folder] = index
    return index


def _sizes(urls: list[str] | tuple[str, ...], options: ReadOptions) -> tuple[dict[str, int], bool]:
    """(sample count of each shard its index lists, whether some index was corrupt)."""
    cache: dict[str, dict[str, int] | None] = {}
    sizes: dict[str, int] = {}
    for url in urls:
        if url_kind(url) == "pipe":
            continue
        index = _index_of(url, options, cache)
        count = None if index is None else index.get(url.rsplit("/", 1)[-1])
        if count is not None:
            sizes[url] = count
    return sizes, any(index == {} for index in cache.values())


def shard_sizes(urls: list[str] | tuple[str, ...], options: ReadOptions | None = None) -> dict[str, int]:
    """Sample count of each shard of ``urls`` listed in the ``sizes.json`` beside it (unlisted shards left out)."""
    return _sizes(urls, options or ReadOptions())[0]


def read_size_index(urls: list[str], options: ReadOptions | None = None) -> int | None:
    """Total sample count of ``urls`` from the ``sizes.json`` beside them, or None if some shard is not listed."""
    sizes = shard_sizes(urls, options)
    return sum(sizes[u] for u in urls) if all(u in sizes for u in urls) else None


def count_samples(url: str) -> int:
    """Samples of a local shard counted from its tar headers (consecutive entries with one key are one sample)."""
    count, last = 0, None
    with tarfile.open(url, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, name = member.name.rpartition("/")
            key = f"{folder}/{name.split('.', 1)[0]}"
            if key != last:
                count, last = count + 1, key
    return count


# ------------------------------------------------------------------------------------------------------ shards
def _check_exist(pattern: str, urls: list[str]) -> None:
    if not urls:
        raise DataError(f"data.path={pattern!r} matches no shard files")
    local = [u for u in urls if url_kind(u) == "local"]
    missing = [u for u in local if not Path(u).is_file()]
    if missing and len(missing) == len(urls):
        raise DataError(f"data.path={pattern!r} matches no shard files")
    if missing:
        raise DataError(f"data.path={pattern!r}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}")


def _total(urls: list[str], sizes: dict[str, int], counted_ok: bool) -> int | None:
    """The set's sample count: from its index, else counted (local shards whose index is corrupt), else None."""
    if all(u in sizes for u in urls):
        return sum(sizes[u] for u in urls)
    if counted_ok and all(url_kind(u) == "local" for u in urls):
        return sum(sizes[u] if u in sizes else count_samples(u) for u in urls)
    return None


def resolve_shard_set(pattern: str, name: str, weight: float, options: ReadOptions) -> ShardSet:
    """Expand, check and count one shard set.

    Raises:
        DataError: no shards, missing local shards, an unreachable remote shard.
    """
    if not pattern:
        raise DataError("data.path is empty; set it to a shard pattern like data/shards/shard-{000000..000009}.tar")
    urls = expand_shards(pattern, options.storage_options)
    _check_exist(pattern, urls)
    remote = [u for u in urls if url_kind(u) != "local"]
    for url in dict.fromkeys(remote[:1] + remote[-1:]):  # a wrong host, path or range fails here, not in a worker
        probe_shard(url, options)
    sizes, corrupt = _sizes(urls, options)
    return ShardSet(name, tuple(urls), sizes, _total(urls, sizes, corrupt), weight)


def _missing_count_error(pattern: str, urls: tuple[str, ...]) -> DataError:
    if any(url_kind(u) == "pipe" for u in urls):
        why = f"{SIZE_INDEX} cannot list pipe: shards (pipe: URLs cannot have one)"
    else:
        why = f"no readable size index ({SIZE_INDEX}) beside the shards lists every shard"
    return DataError(
        f"data.path={pattern!r}: {why}; write the shards with `python -m pretrain.shards` or set data.samples_per_epoch"
    )


def _check_readers(shard_set: ShardSet, cfg: Any, world_size: int) -> None:
    readers = world_size * max(1, cfg.num_workers)
    if not cfg.resampled and len(shard_set.urls) < readers:
        raise DataError(
            f"{len(shard_set.urls)} shards for {world_size} ranks x {max(1, cfg.num_workers)} workers = {readers} "
            f"readers with data.resampled=false: some readers would get no shard. Use data.resampled=true, fewer "
            f"workers, or at least {readers} shards"
        )


def resolve_source(data_cfg: DataConfig, world_size: int) -> DataSource:
    """List, check and count the pretraining data once (the trainer calls this at start).

    Args:
        data_cfg: the ``data`` section.
        world_size: the number of ranks (the readers of unresampled shards are checked against it).

    Raises:
        DataError: what would make the data fail, before any worker starts.
    """
    if data_cfg.source == "folder":
        files = tuple(str(p) for p in list_images(data_cfg.path))
        return DataSource("folder", data_cfg.samples_per_epoch or len(files), files=files)
    options = ReadOptions.of(data_cfg)
    entries = [(e.path, source_name(e, i), float(e.weight)) for i, e in enumerate(data_cfg.sources)]
    sets = [resolve_shard_set(p, n, w, options) for p, n, w in entries or [(data_cfg.path, "source0", 1.0)]]
    for shard_set, (pattern, _, _) in zip(sets, entries or [(data_cfg.path, "", 1.0)], strict=True):
        _check_readers(shard_set, data_cfg, world_size)
        if data_cfg.samples_per_epoch is None and shard_set.samples is None:
            raise _missing_count_error(pattern, shard_set.urls)
    total = data_cfg.samples_per_epoch or sum(s.samples or 0 for s in sets)
    return DataSource("webdataset", total, shard_sets=tuple(sets))
