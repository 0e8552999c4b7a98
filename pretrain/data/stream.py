"""Shard streams: shards -> samples (with retries for remote shards) -> shuffle buffer -> decoded items -> batches.

Determinism: every (seed, epoch, rank, worker, start_step, source) seeds its own generator, which picks shards (with
replacement when ``resampled``), shuffles samples in a buffer and draws augmentations. Exact mid-epoch resume is not
possible with streams; a resumed run reseeds deterministically (start_step enters the seed). Without resampling each
of the ranks x workers readers gets its own shards and cycles them, so every rank yields its full share of batches.

Losses are counted, never fatal: an undecodable sample is replaced by the next sample of the stream; samples lost at
the tar level (a truncated shard, a bad header, a broken connection after its retries) are counted exactly when the
shard is in the size index (listed - read), else one per broken shard. Only long runs of nothing (shards without a
sample, samples that never decode) stop with a DataError.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from .config import DataError
from .mixture import MixturePlan
from .source import SIZE_INDEX, ShardSet
from .urls import ReadOptions, open_shard, url_kind

__all__ = ["LostSamples", "ShardBatches", "SourceFeed", "read_shard"]

Decoder = Callable[[dict[str, Any], np.random.Generator], Any]


class LostSamples:
    """Samples lost at the tar level since the last batch (added to the next batch's ``skipped``)."""

    def __init__(self) -> None:
        self.count = 0

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def _attempt(url: str, options: ReadOptions, skip: int, hold_last: bool, errors: list[str]) -> Iterator[dict]:
    """The samples of one read of ``url`` after the first ``skip``; errors (tar and transfer) go into ``errors``.

    With ``hold_last`` the last sample is given only when the read ended cleanly: after a broken transfer it may be
    partial, and the next attempt reads it again.
    """

    def note(exc: Exception) -> bool:
        # webdataset appends " @ <stream>" to the message and the stream and url to args; keep the message.
        message = str(exc.args[0]).split(" @ ")[0] if exc.args else ""
        errors.append(f"{type(exc).__name__}: {message}")
        return True  # the rest of this read is dropped; the caller decides about retrying

    try:
        stream = open_shard(url, options)
    except (OSError, DataError) as exc:
        note(exc)
        return
    held, complete = None, False
    try:
        files = tar_file_expander([{"url": url, "stream": stream.file}], handler=note)
        for index, sample in enumerate(group_by_keys(files, handler=note)):
            if index < skip:
                continue  # delivered by an earlier attempt
            if hold_last:
                sample, held = held, sample
                if sample is None:
                    continue
            yield sample
        complete = True
    finally:
        # Abandoned mid-shard (the epoch ended): stop the transfer; else learn how it ended.
        failure = stream.close(drain=complete)
    if failure is not None:
        errors.append(failure)
    if held is not None and not errors:
        yield held


def read_shard(url: str, expected: int | None, options: ReadOptions, lost: LostSamples) -> Iterator[dict]:
    """The samples of one shard; a remote shard whose read breaks is read again (``options.retries`` times, after
    ``retry_backoff`` x 2^(attempt-1) s) from the first sample not yet delivered. What is still lost is warned about
    and added to ``lost``: exactly with the shard's listed count ``expected``, else one for a broken shard."""
    attempts = 1 + (options.retries if url_kind(url) != "local" else 0)
    read = 0
    for attempt in range(1, attempts + 1):
        errors: list[str] = []
        for sample in _attempt(url, options, read, attempts > 1, errors):
            read += 1
            yield sample
        if not errors or attempt == attempts:
            break
        delay = options.retry_backoff * 2 ** (attempt - 1)
        warnings.warn(
            f"shard {url}: {'; '.join(errors)}; retry {attempt} of {attempts - 1} in {delay:g} s", stacklevel=2
        )
        time.sleep(delay)
    count = max(0, expected - read) if expected is not None else min(1, len(errors))
    if count or errors:
        listed = f" of the {expected} listed in {SIZE_INDEX}" if expected is not None else ""
        tried = f" after {attempts} attempts" if attempts > 1 and errors else ""
        warnings.warn(
            f"shard {url}: read {read} samples{listed}; {count} counted as skipped{tried}"
            + (f"; {'tar' if attempts == 1 else 'read'} errors: {'; '.join(errors)}" if errors else ""),
            stacklevel=2,
        )
    lost.count += count


def _shard_order(urls: tuple[str, ...], rng: np.random.Generator, resampled: bool) -> Iterator[str]:
    if resampled:
        while True:
            yield urls[int(rng.integers(len(urls)))]
    while True:  # cycle the reader's shards so every reader yields its full share of batches
        for i in rng.permutation(len(urls)):
            yield urls[i]


class SourceFeed:
    """One reader's decoded items of one shard set: shards -> samples -> shuffle buffer -> ``decode``.

    Args:
        shard_set: the set's shards and size index.
        rng: this reader's generator of this set.
        reader, readers: this reader's index among all (ranks x workers); used without resampling.
        resampled, shuffle_buffer, options: the data options.
        decode: (sample, rng) -> item, or None for an undecodable sample (it warns).
    """

    def __init__(
        self,
        shard_set: ShardSet,
        rng: np.random.Generator,
        reader: tuple[int, int],
        resampled: bool,
        shuffle_buffer: int,
        options: ReadOptions,
        decode: Decoder,
    ) -> None:
        urls = shard_set.urls if resampled else shard_set.urls[reader[0] :: reader[1]]
        self.shard_set, self.rng, self.decode = shard_set, rng, decode
        self.lost = LostSamples()
        self.skipped = 0
        self.buffer_size = max(1, shuffle_buffer)
        self.samples = self._samples(urls, resampled, options)
        self.buffer: list[dict[str, Any]] = []
        # Samples that are read but never decode would spin forever without a batch.
        self.undecodable_limit = max(1000, 4 * shuffle_buffer)

    def _samples(self, urls: tuple[str, ...], resampled: bool, options: ReadOptions) -> Iterator[dict]:
        # Shards that give no sample at all would make this loop spin forever; past this many in a row the data
        # cannot be working. With resampling a few good shards among bad ones are drawn long before.
        limit = max(64, 4 * len(urls))
        empty_in_row = 0
        for url in _shard_order(urls, self.rng, resampled):
            got_one = False
            for sample in read_shard(url, self.shard_set.sizes.get(url), options, self.lost):
                got_one = True
                yield sample
            empty_in_row = 0 if got_one else empty_in_row + 1
            if empty_in_row >= limit:
                raise DataError(
                    f"{empty_in_row} shards in a row gave no sample (last: {url}); check that the shards of "
                    f"data.path are readable tar files holding images"
                )

    def _next_sample(self) -> dict[str, Any]:
        while len(self.buffer) < self.buffer_size:
            sample = next(self.samples, None)
            if sample is None:
                break
            self.buffer.append(sample)
        if not self.buffer:
            raise DataError("the shard stream ran dry; check that the shards hold images")
        pick = int(self.rng.integers(len(self.buffer)))
        self.buffer[pick], self.buffer[-1] = self.buffer[-1], self.buffer[pick]
        return self.buffer.pop()

    def next(self) -> Any:
        """The next decodable item (undecodable samples before it are counted in ``skipped``)."""
        for _ in range(self.undecodable_limit):
            sample = self._next_sample()
            item = self.decode(sample, self.rng)
            if item is not None:
                return item
            self.skipped += 1
        raise DataError(
            f"{self.undecodable_limit} samples in a row could not be decoded (last: {sample.get('__key__')!r}); "
            f"check that the shards of data.path hold jpg, png or webp images"
        )

    def take_skipped(self) -> int:
        """Undecodable and lost samples since the last call."""
        count, self.skipped = self.skipped + self.lost.take(), 0
        return count


Collate = Callable[[list[Any], int, "dict[str, int] | None"], dict[str, Any]]


class ShardBatches(IterableDataset):
    """Per worker: its share of this rank's batches of the epoch, from one shard set or a weighted mixture.

    The DataLoader takes batches from its workers round-robin, so worker w of W yields the steps
    ``start_step + w, start_step + w + W, ...``; with a mixture each step's slots come from the :class:`MixturePlan`.
    """

    def __init__(
        self,
        shard_sets: tuple[ShardSet, ...],
        decode: Decoder,
        collate: Collate,
        position: dict[str, int],
        data: dict[str, Any],
        plan: MixturePlan | None,
    ) -> None:
        self.shard_sets, self.decode, self.collate, self.plan = shard_sets, decode, collate, plan
        # position: seed, epoch, rank, world_size, start_step, steps; data: batch_size, resampled, shuffle_buffer,
        # options.
        self.position, self.data = position, data

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        p, d = self.position, self.data
        batches = p["steps"] - p["start_step"]
        share = batches // workers + (1 if worker < batches % workers else 0)
        reader = (p["rank"] * workers + worker, p["world_size"] * workers)
        feeds = [
            SourceFeed(
                shard_set,
                np.random.default_rng([p["seed"], p["epoch"], p["rank"], worker, p["start_step"], index]),
                reader,
                d["resampled"],
                d["shuffle_buffer"],
                d["options"],
                self.decode,
            )
            for index, shard_set in enumerate(self.shard_sets)
        ]
        names = [s.name for s in self.shard_sets]
        for j in range(share):
            step = p["start_step"] + worker + j * workers
            slots = [0] * d["batch_size"] if self.plan is None else self.plan.slots(step, p["rank"], d["batch_size"])
            items = [feeds[s].next() for s in slots]
            skipped = sum(feed.take_skipped() for feed in feeds)
            sources = None if self.plan is None else {name: slots.count(i) for i, name in enumerate(names)}
            yield self.collate(items, skipped, sources)
