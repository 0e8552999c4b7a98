"""DataLoaders: worker processes that leave signals to the main process, and the pretraining loader.

Worker processes ignore SIGTERM, SIGUSR1 and SIGINT. SLURM and Ctrl-C signal the whole process group; the trainer's
main process decides what a signal means (save and stop, or go on), and a worker that died of it would end the epoch
with "DataLoader worker killed by signal" before the main process could act. Workers start from a forkserver by
default (``data.worker_start``): a forked worker maps the trainer's whole memory (engine, CUDA context, pinned
buffers), a forkserver worker only its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import signal
import sys
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .config import DataError
from .folder import FolderDataset, RankBatches, collate_pretrain, epoch_order
from .images import SHARD_IMAGE_KEYS, decode_image
from .mixture import MixturePlan
from .source import DataSource, resolve_source
from .stream import ShardBatches
from .transform import SimMIMTransform
from .urls import ReadOptions

if TYPE_CHECKING:
    from ..config import PretrainConfig

__all__ = ["WORKER_NAME", "build_pretrain_loader", "loader_options", "steps_per_epoch", "worker_context"]

WORKER_NAME = "pt_data_worker"  # the process name of data workers (ps, top, psutil)
_WORKER_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Ignore the job's signals while helper processes start: an ignored disposition survives fork and exec."""
    try:
        saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _WORKER_SIGNALS}
    except ValueError:  # not the main thread: signal dispositions cannot be changed here
        yield
        return
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def worker_context(start: str = "forkserver") -> multiprocessing.context.BaseContext:
    """The multiprocessing context for worker processes (``data.worker_start``).

    For forkserver, the server (with :mod:`pretrain.data._forkserver` preloaded, which makes it ignore SIGTERM and
    SIGUSR1) and multiprocessing's resource tracker (started with the job's signals ignored) are started here: both
    sit in the trainer's process group, and workers are children of the server. A server already started by other
    code is used as it is.
    """
    context = multiprocessing.get_context(start)
    if start == "forkserver":
        with _signals_ignored():
            multiprocessing.resource_tracker.ensure_running()
        server = multiprocessing.forkserver._forkserver
        if getattr(server, "_forkserver_pid", None) is None:  # not started yet: the preload list still applies
            preload = list(
                dict.fromkeys([*getattr(server, "_preload_modules", ["__main__"]), __package__ + "._forkserver"])
            )
            multiprocessing.forkserver.set_forkserver_preload(preload)
        multiprocessing.forkserver.ensure_running()
    return context


def _set_process_name(name: str) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None)
            libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def init_worker(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: ignore the job's signals (the main process decides) and name the process."""
    for sig in _WORKER_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _set_process_name(WORKER_NAME)


def loader_options(cfg: Any, num_workers: int | None = None) -> dict[str, Any]:
    """DataLoader keyword arguments of a data config: workers, their start method and init, pinning."""
    workers = cfg.num_workers if num_workers is None else num_workers
    options: dict[str, Any] = {"num_workers": workers, "pin_memory": cfg.pin_memory and torch.cuda.is_available()}
    if workers > 0:
        options.update(
            multiprocessing_context=worker_context(cfg.worker_start),
            worker_init_fn=init_worker,
            persistent_workers=False,
        )
    return options


class PretrainDecoder:
    """A shard sample -> (image tensor, mask) through the SimMIM transform; None (after a warning) when it holds
    no decodable image."""

    def __init__(self, transform: SimMIMTransform) -> None:
        self.transform = transform

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        key = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
        if key is None:
            warnings.warn(f"skipping sample {sample.get('__key__')!r}: no image entry (jpg, png, webp)", stacklevel=1)
            return None
        try:
            image = decode_image(sample[key])
        except Exception as exc:
            warnings.warn(
                f"skipping corrupt image {sample.get('__key__')!r} in {sample.get('__url__')}: {exc}", stacklevel=1
            )
            return None
        return self.transform(image, rng)


def collate_stream(items: list[tuple[torch.Tensor, torch.Tensor]], skipped: int, sources: dict[str, int] | None):
    """A batch of decoded shard items: stacked tensors, ``skipped`` and (mixtures) ``sources`` as plain ints."""
    batch: dict[str, Any] = {
        "images": torch.stack([i[0] for i in items]),
        "mask": torch.stack([i[1] for i in items]),
        "skipped": int(skipped),
    }
    if sources is not None:
        batch["sources"] = sources
    return batch


def steps_per_epoch(cfg: PretrainConfig, world_size: int, source: DataSource | None = None) -> int:
    """Batches every rank yields per epoch: samples // (batch_size * world_size).

    Args:
        cfg: the configuration; source: the resolved data (resolved here when None).

    Raises:
        DataError: the data cannot work, or holds fewer samples than one global batch.
    """
    source = source if source is not None else resolve_source(cfg.data, world_size)
    return source.steps_per_epoch(cfg.data.batch_size, world_size)


def build_pretrain_loader(
    cfg: PretrainConfig,
    source: DataSource | None = None,
    *,
    rank: int,
    world_size: int,
    epoch: int = 0,
    start_step: int = 0,
) -> DataLoader:
    """This rank's DataLoader for one epoch, yielding {"images", "mask", "skipped": int} batches (and "sources":
    {name: int} for a mixture).

    Args:
        cfg: the resolved configuration (data, model, simmim and training.seed are used).
        source: the data resolved once by :func:`resolve_source`; None resolves it here (lists and probes again).
        rank: this process's rank; world_size: the number of ranks.
        epoch: the epoch (enters every seed).
        start_step: batches of this epoch already consumed (resume); the loader yields the remaining ones.

    Raises:
        DataError: before any worker starts, when the data cannot work.
    """
    d = cfg.data
    source = source if source is not None else resolve_source(d, world_size)
    steps = source.steps_per_epoch(d.batch_size, world_size)
    if not 0 <= start_step <= steps:
        raise DataError(f"start_step={start_step} outside the epoch's {steps} steps")
    transform, seed = SimMIMTransform(cfg), cfg.training.seed
    if source.kind == "folder":
        order = epoch_order(len(source.files), steps * d.batch_size * world_size, seed, epoch)
        dataset = FolderDataset(source.files, order, transform, seed, epoch)
        sampler = RankBatches(steps, d.batch_size, rank, world_size, start_step)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_pretrain, **loader_options(d))
    plan = None
    if source.is_mixture:
        weights = [s.weight for s in source.shard_sets]
        plan = MixturePlan(weights, d.batch_size * world_size, steps, seed, epoch)
    position = {"seed": seed, "epoch": epoch, "rank": rank, "world_size": world_size}
    position.update(start_step=start_step, steps=steps)
    data = {"batch_size": d.batch_size, "resampled": d.resampled, "shuffle_buffer": d.shuffle_buffer}
    data["options"] = ReadOptions.of(d)
    stream = ShardBatches(source.shard_sets, PretrainDecoder(transform), collate_stream, position, data, plan)
    return DataLoader(stream, batch_size=None, **loader_options(d))
