"""Pretraining data: webdataset tar shards (main source) and image folders, SimMIM transforms and masks.

Determinism (what a batch depends on):
- folder (map-style): the epoch order is a permutation of the files drawn from (seed, epoch) (several chained when
  ``data.samples_per_epoch`` exceeds the folder); each global batch of ``batch_size * world_size`` positions is split
  into contiguous per-rank slices, and every sample's crop, flip and mask come from a generator seeded with (seed,
  epoch, position in the epoch). A global batch is therefore the same whatever the number of ranks or workers, and
  ``start_step`` resumes mid-epoch exactly.
- webdataset (iterable): every (seed, epoch, rank, worker, start_step) seeds its own generator, which picks shards
  (with replacement when ``resampled``), shuffles samples in a buffer and draws augmentations and masks. Exact
  mid-epoch resume is not possible with streams; a resumed run reseeds deterministically (start_step enters the
  seed), which makes the restart statistically equivalent to an uninterrupted run.
  Without resampling each of the ranks x workers readers gets its own shards and cycles them; the shuffle buffer
  mixes across the end of a pass, so an epoch covers each reader's samples approximately (exactly with
  ``data.shuffle_buffer=1``), as webdataset's own epoch wrapper does.
Every rank yields exactly ``steps_per_epoch(cfg, world_size)`` batches per epoch, so collectives never hang at the
end of an epoch. A corrupt or non-image sample is skipped with a warning and counted; so are samples lost at the tar
level (an unreadable or truncated shard, a bad header): exactly when the shard is listed in the size index (listed
count - samples read), else one per shard that broke off on a tar error. Batches carry the count in
``batch["skipped"]`` so it reaches the metrics. Shards that yield no sample at all, many in a row, stop the stream
with a DataError instead of spinning.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from braceexpand import UnbalancedBracesError, braceexpand
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from .checks import one_of, require
from .masking import MaskGenerator

if TYPE_CHECKING:
    from .config import PretrainConfig

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataConfig",
    "DataError",
    "SimMIMTransform",
    "build_pretrain_loader",
    "expand_shards",
    "list_images",
    "read_size_index",
    "steps_per_epoch",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SIZE_INDEX = "sizes.json"


SOURCES = ("webdataset", "folder")


@dataclass
class DataConfig:
    # webdataset: tar shards (path is a brace pattern, e.g. data/shards/train-{000000..000127}.tar, a glob, or the
    # folder holding them);
    # folder: a directory of images, searched recursively.
    source: str = "webdataset"
    path: str = ""
    # Per-device micro-batch.
    batch_size: int = 128
    num_workers: int = 8
    pin_memory: bool = True
    resampled: bool = True
    # Samples per epoch over all ranks; None = read from the size index next to the shards, or count the folder.
    samples_per_epoch: int | None = None
    shuffle_buffer: int = 2000
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
        require(self.num_workers >= 0, f"data.num_workers={self.num_workers}; accepted: 0 or more")
        require(
            self.shuffle_buffer >= 0,
            f"data.shuffle_buffer={self.shuffle_buffer}; accepted: 0 or 1 (no shuffling) or more samples",
        )
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


class DataError(ValueError):
    """The data configuration cannot work (no shards, too few shards, empty folder...): raised before training."""


# --------------------------------------------------------------------------------------------------- transforms
class SimMIMTransform:
    """RandomResizedCrop -> horizontal flip -> tensor -> normalise, plus a SimMIM mask; all randomness from ``rng``.

    torchvision's transforms draw from the global torch generator, which makes samples depend on worker scheduling;
    the crop parameters are drawn here with the same algorithm from an explicit numpy generator instead.
    """

    def __init__(self, cfg: PretrainConfig) -> None:
        self.size = cfg.model.img_size
        self.scale = tuple(cfg.data.crop_scale)
        self.ratio = tuple(cfg.data.crop_ratio)
        self.hflip = cfg.data.hflip
        # torchvision's RandomResizedCrop default, which the official SimMIM pretraining uses (spec 3.1); the
        # fine-tuning transforms use bicubic instead, so the choice is spelled out here.
        self.interpolation = TF.InterpolationMode.BILINEAR
        self.mean = list(cfg.data.mean)
        self.std = list(cfg.data.std)
        self.mask_generator = MaskGenerator(
            cfg.model.img_size, cfg.simmim.mask_patch_size, cfg.model.patch_size, cfg.simmim.mask_ratio
        )

    def crop_params(self, rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a random crop covering ``scale`` of the area with aspect in ``ratio``."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        # Fallback (as torchvision): the largest centred crop with the aspect ratio clamped into range.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        image = image.convert("RGB")
        top, left, h, w = self.crop_params(rng, *image.size)
        image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], self.interpolation, antialias=True)
        if rng.random() < self.hflip:
            image = TF.hflip(image)
        tensor = TF.normalize(TF.to_tensor(image), self.mean, self.std)
        return tensor, torch.from_numpy(self.mask_generator(rng))


def _collate(samples: list[tuple[torch.Tensor, torch.Tensor]], skipped: int) -> dict[str, torch.Tensor]:
    return {
        "images": torch.stack([s[0] for s in samples]),
        "mask": torch.stack([s[1] for s in samples]),
        "skipped": torch.tensor(skipped, dtype=torch.int64),
    }


# ------------------------------------------------------------------------------------------------ image folder
def list_images(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (recursive, any class layout), sorted for a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.path={str(root)!r} is not a directory (data.source=folder needs a folder of images)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"data.path={str(root)!r} holds no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return files


def _epoch_order(n: int, length: int, seed: int, epoch: int) -> np.ndarray:
    """File indices of one epoch: permutations of the n files drawn from (seed, epoch), chained to ``length``.

    With ``data.samples_per_epoch`` larger than the folder, the epoch runs through several permutations.
    """
    rng = np.random.default_rng([seed, epoch])
    return np.concatenate([rng.permutation(n) for _ in range(max(1, math.ceil(length / n)))])[:length]


class _FolderDataset(Dataset):
    """Map-style dataset over positions of the epoch order; position p reads file ``order[p]``.

    Crop, flip and mask of position p come from a generator seeded with (seed, epoch, p): the same whatever the rank
    or worker that loads it, and different for a file that comes twice in one epoch.
    """

    def __init__(self, files: list[Path], order: np.ndarray, transform: SimMIMTransform, seed: int, epoch: int) -> None:
        self.files = files
        self.order = order
        self.transform = transform
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self.files[int(self.order[position])]
        try:
            with Image.open(path) as image:
                image.load()
                rng = np.random.default_rng([self.seed, self.epoch, position])
                return self.transform(image, rng)
        except Exception as exc:
            warnings.warn(f"skipping unreadable image {path}: {exc}", stacklevel=1)
            return None


def _collate_skipping(samples: list[tuple[torch.Tensor, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
    good = [s for s in samples if s is not None]
    if not good:
        raise DataError("every image of a batch was unreadable; check the data folder")
    return _collate(good, len(samples) - len(good))


class _RankBatches(torch.utils.data.Sampler):
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


# ------------------------------------------------------------------------------------------------- webdataset
def _split_top_level(pattern: str) -> list[str]:
    """Split ``pattern`` on the commas outside braces: ``a-{0,1}.tar,b.tar`` -> ``["a-{0,1}.tar", "b.tar"]``.

    Commas inside braces are brace alternatives, so a plain ``split(",")`` would cut ``x-{a,b}.tar`` into two
    unbalanced halves. A backslash escapes the next character, as in braceexpand.

    Raises:
        DataError: on unbalanced braces, naming the position.
    """
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    escaped = False
    for position, char in enumerate(pattern):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "{":
            depth += 1
        elif char == "}":
            if depth == 0:
                raise _brace_error(pattern, f"'}}' at position {position} closes no '{{'")
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if depth:
        raise _brace_error(pattern, f"{depth} '{{' left open")
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def _brace_error(pattern: str, detail: str) -> DataError:
    return DataError(
        f"data.path={pattern!r} has unbalanced braces ({detail}); accepted: a brace pattern like "
        f"shard-{{000000..000127}}.tar or x-{{a,b}}.tar, a glob, a comma-separated list of those, or a shard folder"
    )


def expand_shards(pattern: str) -> list[str]:
    """Shard paths from a brace pattern (``train-{000000..000127}.tar``), glob, comma-separated list or a folder.

    A folder stands for every ``*.tar`` directly inside it (the output of ``python -m pretrain.shards``). The list is
    split on commas outside braces only, so brace alternatives (``x-{a,b}.tar``) and lists combine.

    Raises:
        DataError: the pattern is malformed (unbalanced braces).
    """
    if pattern and Path(pattern).is_dir():
        return sorted(str(p) for p in Path(pattern).glob("*.tar"))
    urls: list[str] = []
    for part in _split_top_level(pattern):
        try:
            items = list(braceexpand(part))
        except UnbalancedBracesError as exc:  # what the splitter's own check lets through (e.g. escapes)
            raise _brace_error(pattern, str(exc)) from None
        for item in items:
            hits = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
            urls.extend(hits)
    return urls


def _shard_sizes(urls: list[str]) -> dict[str, int]:
    """Sample count of each shard of ``urls`` listed in the ``sizes.json`` beside it (unlisted shards left out)."""
    sizes: dict[str, int] = {}
    cache: dict[Path, dict[str, int]] = {}
    for url in urls:
        path = Path(url)
        index_file = path.parent / SIZE_INDEX
        if index_file not in cache:
            cache[index_file] = json.loads(index_file.read_text()) if index_file.is_file() else {}
        count = cache[index_file].get(path.name)
        if count is not None:
            sizes[url] = int(count)
    return sizes


def read_size_index(urls: list[str]) -> int | None:
    """Total sample count of ``urls`` from the ``sizes.json`` beside them, or None if some shard is not listed."""
    sizes = _shard_sizes(urls)
    if any(url not in sizes for url in urls):
        return None
    return sum(sizes[url] for url in urls)


def _check_shards(cfg: PretrainConfig, world_size: int) -> list[str]:
    d = cfg.data
    if not d.path:
        raise DataError("data.path is empty; set it to a shard pattern like data/shards/shard-{000000..000009}.tar")
    urls = expand_shards(d.path)
    missing = [u for u in urls if not Path(u).is_file()]
    if not urls or len(missing) == len(urls):
        raise DataError(f"data.path={d.path!r} matches no shard files")
    if missing:
        raise DataError(f"data.path={d.path!r}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}")
    readers = world_size * max(1, d.num_workers)
    if not d.resampled and len(urls) < readers:
        raise DataError(
            f"{len(urls)} shards for {world_size} ranks x {max(1, d.num_workers)} workers = {readers} readers with "
            f"data.resampled=false: some readers would get no shard. Use data.resampled=true, fewer workers, or "
            f"at least {readers} shards"
        )
    return urls


class _LostSamples:
    """Samples lost at the tar level (unreadable shard, truncated shard, bad header) since the last batch.

    Such losses happen below the sample decoder, inside the tar reading; they are collected here and added to the next
    batch's ``skipped`` count.
    """

    def __init__(self) -> None:
        self.count = 0

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


class _ShardStream(IterableDataset):
    """Per worker: shards (resampled or this reader's slice, cycled) -> samples -> decode -> transform -> batches."""

    def __init__(
        self,
        urls: list[str],
        transform: SimMIMTransform,
        cfg: PretrainConfig,
        rank: int,
        world_size: int,
        epoch: int,
        start_step: int,
        batches: int,
    ) -> None:
        self.urls = urls
        # Per-shard sample counts from the size index: a shard that yields fewer was cut short (truncation, or a bad
        # header, at which Python's tarfile stops without an error), and the shortfall is counted exactly.
        self.shard_sizes = _shard_sizes(urls)
        self.transform = transform
        self.batch_size = cfg.data.batch_size
        self.resampled = cfg.data.resampled
        self.shuffle_buffer = cfg.data.shuffle_buffer
        self.seed = cfg.training.seed
        self.rank, self.world_size, self.epoch, self.start_step = rank, world_size, epoch, start_step
        self.batches = batches

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _reader_shards(self, worker: int, workers: int) -> list[str]:
        """The shards this reader draws from: all of them when resampling, else its own slice."""
        if self.resampled:
            return self.urls
        return self.urls[self.rank * workers + worker :: self.world_size * workers]

    def _shards(self, rng: np.random.Generator, mine: list[str]) -> Iterator[str]:
        if self.resampled:
            while True:
                yield mine[int(rng.integers(len(mine)))]
        while True:  # cycle this reader's shards so every reader yields its full share of batches
            for i in rng.permutation(len(mine)):
                yield mine[i]

    def _read_shard(self, url: str, lost: _LostSamples) -> Iterator[dict[str, Any]]:
        """The samples of one shard; tar-level errors warn, and the samples they cost are added to ``lost``.

        With the shard in the size index the loss is exact (listed count - samples read; a partial sample that was
        read is counted by the decoder). Without it, a shard that broke off on tar errors counts one: how much of it
        was lost is unknown then, and a bad header that Python's tarfile takes for the archive's end goes unseen.
        """
        errors: list[str] = []

        def note(exc: Exception) -> bool:
            # webdataset appends " @ <stream>" to the message and the stream and url to args; keep the message.
            message = str(exc.args[0]).split(" @ ")[0] if exc.args else ""
            errors.append(f"{type(exc).__name__}: {message}")
            return True  # go on: the rest of this shard is dropped, the stream continues with the next shard

        read = 0
        try:
            # Opened here rather than by webdataset's url_opener, which leaves the file open when the tar breaks.
            stream = open(url, "rb")  # noqa: SIM115 - closed by the with block below
        except OSError as exc:
            note(exc)
        else:
            with stream:
                files = tar_file_expander([{"url": url, "stream": stream}], handler=note)
                for sample in group_by_keys(files, handler=note):
                    read += 1
                    yield sample
        expected = self.shard_sizes.get(url)
        count = max(0, expected - read) if expected is not None else min(1, len(errors))
        if count or errors:
            listed = f" of the {expected} listed in {SIZE_INDEX}" if expected is not None else ""
            warnings.warn(
                f"shard {url}: read {read} samples{listed}; {count} counted as skipped"
                + (f"; tar errors: {'; '.join(errors)}" if errors else ""),
                stacklevel=1,
            )
        lost.count += count

    def _samples(self, rng: np.random.Generator, worker: int, workers: int, lost: _LostSamples) -> Iterator[dict]:
        mine = self._reader_shards(worker, workers)
        # Shards that give no sample at all (unreadable, empty) would make the loop below spin forever; after this many
        # in a row the data cannot be working. With resampling a few good shards among bad ones are drawn long before.
        limit = max(64, 4 * len(mine))
        empty_in_row = 0
        for url in self._shards(rng, mine):
            got_one = False
            for sample in self._read_shard(url, lost):
                got_one = True
                yield sample
            empty_in_row = 0 if got_one else empty_in_row + 1
            if empty_in_row >= limit:
                raise DataError(
                    f"{empty_in_row} shards in a row gave no sample (last: {url}); check that the shards of "
                    f"data.path are readable tar files holding images"
                )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, workers = self._worker()
        # This worker's share of the rank's batches (workers are read round-robin by the DataLoader).
        share = self.batches // workers + (1 if worker < self.batches % workers else 0)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, self.start_step])
        buffer: list[dict[str, Any]] = []
        batch: list[tuple[torch.Tensor, torch.Tensor]] = []
        skipped = produced = undecodable_in_row = 0
        # Samples that are read but never decode (no image entry, all corrupt) would spin the loop below forever
        # without a batch; past this many in a row the data cannot be working.
        undecodable_limit = max(1000, 4 * self.shuffle_buffer)
        lost = _LostSamples()
        samples = self._samples(rng, worker, workers, lost)
        while produced < share:
            # Fill the shuffle buffer, then emit a random element of it.
            while len(buffer) < max(1, self.shuffle_buffer):
                sample = next(samples, None)
                if sample is None:
                    break
                buffer.append(sample)
            if not buffer:
                raise DataError("the shard stream ran dry; check that the shards hold images")
            pick = int(rng.integers(len(buffer)))
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            sample = buffer.pop()
            decoded = self._decode(sample, rng)
            if decoded is None:
                skipped += 1
                undecodable_in_row += 1
                if undecodable_in_row >= undecodable_limit:
                    raise DataError(
                        f"{undecodable_in_row} samples in a row could not be decoded (last: "
                        f"{sample.get('__key__')!r}); check that the shards of data.path hold jpg, png or webp images"
                    )
                continue
            undecodable_in_row = 0
            batch.append(decoded)
            if len(batch) == self.batch_size:
                yield _collate(batch, skipped + lost.take())
                batch, skipped = [], 0
                produced += 1

    def _decode(self, sample: dict[str, Any], rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        key = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
        if key is None:
            warnings.warn(f"skipping sample {sample.get('__key__')!r}: no image entry (jpg, png, webp)", stacklevel=1)
            return None
        try:
            with Image.open(io.BytesIO(sample[key])) as image:
                image.load()
                return self.transform(image, rng)
        except Exception as exc:
            warnings.warn(
                f"skipping corrupt image {sample.get('__key__')!r} in {sample.get('__url__')}: {exc}", stacklevel=1
            )
            return None


# ------------------------------------------------------------------------------------------------------ public
def _dataset_size(cfg: PretrainConfig, world_size: int) -> int:
    d = cfg.data
    if d.source == "folder":
        return d.samples_per_epoch or len(list_images(d.path))
    urls = _check_shards(cfg, world_size)
    if d.samples_per_epoch:
        return d.samples_per_epoch
    total = read_size_index(urls)
    if total is None:
        raise DataError(
            f"no size index ({SIZE_INDEX}) lists every shard of data.path={d.path!r}; write shards with "
            f"`python -m pretrain.shards` or set data.samples_per_epoch"
        )
    return total


def steps_per_epoch(cfg: PretrainConfig, world_size: int) -> int:
    """Batches every rank yields per epoch: samples // (batch_size * world_size) (DataError if that is 0)."""
    size = _dataset_size(cfg, world_size)
    global_batch = cfg.data.batch_size * world_size
    steps = size // global_batch
    if steps == 0:
        raise DataError(
            f"{size} samples per epoch is fewer than one global batch ({cfg.data.batch_size} x {world_size} ranks "
            f"= {global_batch}); lower data.batch_size or add data"
        )
    return steps


def build_pretrain_loader(
    cfg: PretrainConfig, *, rank: int, world_size: int, epoch: int = 0, start_step: int = 0
) -> DataLoader:
    """This rank's DataLoader for one epoch, yielding {"images", "mask", "skipped"} batches.

    Args:
        cfg: the resolved configuration (data, model and simmim sections are used).
        rank: this process's rank; world_size: the number of ranks.
        epoch: the epoch (enters every seed).
        start_step: batches of this epoch already consumed (resume); the loader yields the remaining ones.

    Raises:
        DataError: before any worker starts, when the data cannot work (see module docstring).
    """
    d = cfg.data
    transform = SimMIMTransform(cfg)
    total_steps = steps_per_epoch(cfg, world_size)
    if not 0 <= start_step <= total_steps:
        raise DataError(f"start_step={start_step} outside the epoch's {total_steps} steps")
    common = {"num_workers": d.num_workers, "pin_memory": d.pin_memory and torch.cuda.is_available()}
    if d.num_workers > 0:
        common["persistent_workers"] = False
    if d.source == "folder":
        files = list_images(d.path)
        order = _epoch_order(len(files), total_steps * d.batch_size * world_size, cfg.training.seed, epoch)
        dataset = _FolderDataset(files, order, transform, cfg.training.seed, epoch)
        sampler = _RankBatches(total_steps, d.batch_size, rank, world_size, start_step)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate_skipping, **common)
    urls = _check_shards(cfg, world_size)
    stream = _ShardStream(urls, transform, cfg, rank, world_size, epoch, start_step, total_steps - start_step)
    return DataLoader(stream, batch_size=None, **common)
