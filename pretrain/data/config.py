"""The ``data:`` config section of pretraining (:class:`DataConfig`), the labelled-data options of the
classification tasks (:class:`LabelledDataConfig`), and the error every data check raises (:class:`DataError`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..checks import one_of, require

__all__ = ["SOURCES", "WORKER_STARTS", "DataConfig", "DataError", "LabelledDataConfig", "SourceConfig"]

SOURCES = ("webdataset", "folder")
# How DataLoader workers start: forkserver workers begin from a small server process instead of a copy of the
# trainer (whose engine, CUDA context and pinned buffers a forked worker would map); fork starts fastest.
WORKER_STARTS = ("forkserver", "fork", "spawn")


class DataError(ValueError):
    """The data cannot work (no shards, unreachable URL, empty folder...): raised before training, naming the cause."""


@dataclass
class SourceConfig:
    """One source of a weighted mixture (``data.sources``): shards at ``path`` drawn with relative ``weight``."""

    path: str = ""
    weight: float = 1.0
    # Key of the per-batch ``sources`` counts; "" = source<index>.
    name: str = ""


@dataclass
class _StreamOptions:
    """Options shared by the pretraining and the labelled data: workers and remote reading."""

    num_workers: int = 8
    pin_memory: bool = True
    worker_start: str = "forkserver"
    resampled: bool = True
    shuffle_buffer: int = 2000
    # Remote shards (http(s)://, s3://, gs://, pipe:...): a broken read is retried ``retries`` times, waiting
    # retry_backoff x 2^(attempt-1) seconds, then the rest of the shard is skipped and counted.
    retries: int = 3
    retry_backoff: float = 1.0
    connect_timeout: float = 30.0
    # Seconds without a byte before an HTTP read counts as broken.
    read_timeout: float = 60.0
    # Passed to fsspec for s3://, gs://... (credentials come from the usual environment otherwise).
    storage_options: dict[str, Any] = field(default_factory=dict)

    def check_stream(self, prefix: str) -> None:
        require(self.num_workers >= 0, f"{prefix}.num_workers={self.num_workers}; accepted: 0 or more")
        one_of(f"{prefix}.worker_start", self.worker_start, WORKER_STARTS)
        require(
            self.shuffle_buffer >= 0,
            f"{prefix}.shuffle_buffer={self.shuffle_buffer}; accepted: 0 or 1 (no shuffling) or more samples",
        )
        require(self.retries >= 0, f"{prefix}.retries={self.retries}; accepted: 0 or more")
        require(self.retry_backoff >= 0, f"{prefix}.retry_backoff={self.retry_backoff}; accepted: seconds >= 0")
        for key in ("connect_timeout", "read_timeout"):
            value = getattr(self, key)
            require(value > 0, f"{prefix}.{key}={value}; accepted: seconds > 0")


@dataclass
class DataConfig(_StreamOptions):
    # webdataset: tar shards (path is a brace pattern, e.g. data/shards/train-{000000..000127}.tar, a glob, a comma
    # list, a shard folder, or a URL: http(s)://, s3://, gs://, any fsspec protocol, pipe:<command>);
    # folder: a directory of images, searched recursively.
    source: str = "webdataset"
    path: str = ""
    # A weighted mixture of shard sets instead of ``path``: [{path, weight, name}, ...].
    sources: list[SourceConfig] = field(default_factory=list)
    # Per-device micro-batch.
    batch_size: int = 128
    # Samples per epoch over all ranks; None = read from the size index next to the shards, or count the folder.
    samples_per_epoch: int | None = None
    crop_scale: list[float] = field(default_factory=lambda: [0.67, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    hflip: float = 0.5
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    def check(self, in_chans: int) -> None:
        """The section's ranges; ``in_chans`` (the model's input channels) sets the length of mean and std."""
        one_of("data.source", self.source, SOURCES)
        require(
            self.batch_size > 0,
            f"data.batch_size={self.batch_size}; accepted: a positive integer (per-device micro-batch)",
        )
        self.check_stream("data")
        require(
            self.samples_per_epoch is None or self.samples_per_epoch > 0,
            f"data.samples_per_epoch={self.samples_per_epoch}; accepted: a positive integer or null",
        )
        require(
            len(self.crop_scale) == 2 and 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0,
            f"data.crop_scale={list(self.crop_scale)}; accepted: [min, max] with 0 < min <= max <= 1",
        )
        require(
            len(self.crop_ratio) == 2 and 0.0 < self.crop_ratio[0] <= self.crop_ratio[1],
            f"data.crop_ratio={list(self.crop_ratio)}; accepted: [min, max] with 0 < min <= max",
        )
        require(0.0 <= self.hflip <= 1.0, f"data.hflip={self.hflip}; accepted: a probability in [0, 1]")
        require(
            len(self.mean) == in_chans and len(self.std) == in_chans and all(v > 0 for v in self.std),
            f"data.mean={list(self.mean)}, data.std={list(self.std)}; accepted: {in_chans} values each (one per "
            f"channel of model.in_chans), std > 0",
        )
        self._check_sources()

    def _check_sources(self) -> None:
        if not self.sources:
            return
        require(
            not self.path,
            f"data.path={self.path!r} and data.sources are both set; accepted: one of them (data.sources for a "
            f"weighted mixture of shard sets)",
        )
        require(
            self.source == "webdataset",
            f"data.sources with data.source={self.source!r}; accepted: data.source=webdataset (mixtures of shards)",
        )
        seen: set[str] = set()
        for i, entry in enumerate(self.sources):
            require(bool(entry.path), f"data.sources[{i}].path is empty; accepted: a shard pattern, folder or URL")
            require(
                entry.weight > 0,
                f"data.sources[{i}].weight={float(entry.weight)}; accepted: a positive relative weight",
            )
            name = source_name(entry, i)
            require(name not in seen, f"data.sources[{i}].name={name!r} is used twice; accepted: distinct names")
            seen.add(name)


def source_name(entry: SourceConfig, index: int) -> str:
    """The name of a mixture entry: its own, or ``source<index>``."""
    return entry.name or f"source{index}"


@dataclass
class LabelledDataConfig(_StreamOptions):
    """Labelled images for classification: class folders (``root/<class>/**/image``) or labelled shards (``cls``
    entries, ``classes.json`` beside them, as ``python -m pretrain.shards --labels`` writes)."""

    source: str = "folder"
    train_path: str = ""
    val_path: str = ""
    batch_size: int = 128
    # None = the number of classes found in the training data; set, it must match.
    num_classes: int | None = None
    samples_per_epoch: int | None = None

    def check(self) -> None:
        one_of("data.source", self.source, SOURCES)
        require(self.batch_size > 0, f"data.batch_size={self.batch_size}; accepted: a positive integer")
        require(
            self.num_classes is None or self.num_classes > 0,
            f"data.num_classes={self.num_classes}; accepted: a positive integer or null",
        )
        self.check_stream("data")
