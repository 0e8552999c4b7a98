"""Saving checkpoints, pruning them, and moving checkpoints aside (never deleting what could still be wanted).

A save is collective. Every rank writes its files through :class:`~.writes.WriteRecorder` (fsynced by the rank that
wrote them, names and sizes recorded); the ranks then exchange their outcomes, so a failed write on one rank (a full
disk) ends the save on every rank with one error instead of leaving the others waiting. Rank 0 fsyncs the folder,
writes the ``COMPLETE`` marker (listing every file and its size, so that damage is found by a listing), fsyncs the
checkpoints folder, and prunes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..atomic import fsync_dir, fsync_file, write_text_atomic
from .integrity import checkpoint_bytes
from .layout import (
    ABANDONED_DIR,
    CORRUPT_DIR,
    MARKER,
    CheckpointError,
    find_latest_complete,
    is_complete,
    list_complete,
    step_dirs,
    step_of,
    tag_for,
    universal_dir,
)
from .writes import WriteRecorder, disk_full

__all__ = [
    "BEST_RECORD",
    "PREVIOUS_RUNS_DIR",
    "RUN_OUTPUTS",
    "dated_folder",
    "mark_best",
    "move_to_corrupt",
    "read_best",
    "remove_cut_short",
    "save_checkpoint",
    "set_aside_later",
    "set_aside_previous_run",
]

MARKER_FORMAT = 2  # 2: the marker lists every file with its size
# The checkpoint with the best task metric (fine-tuning's validation top-1), kept by pruning besides the last k.
BEST_RECORD = "BEST.json"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def dated_folder(parent: Path, name: str) -> Path:
    """A new folder ``parent/<name>-<time>`` (``-2``, ``-3``... when two are made within one second)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = parent / f"{name}-{stamp}"
    suffix = 1
    while dest.exists():
        suffix += 1
        dest = parent / f"{name}-{stamp}-{suffix}"
    dest.mkdir(parents=True)
    return dest


def _failure_message(tag_dir: Path, failures: list[tuple[int, dict[str, Any]]]) -> str:
    rank, failure = failures[0]
    ranks = f"rank {rank}" + (f" (and {len(failures) - 1} more ranks)" if len(failures) > 1 else "")
    text = f"saving checkpoint {tag_dir} failed: {ranks} could not write {failure['path']}: {failure['text']}"
    last = find_latest_complete(tag_dir.parent)
    kept = (
        f"the last complete checkpoint {last} ({_gib(checkpoint_bytes(last))}) stays usable"
        if last is not None
        else "there is no earlier complete checkpoint"
    )
    if disk_full(failure):
        free = _gib(failure["free"]) if failure["free"] >= 0 else "unknown"
        return (
            f"{text}. The disk is full: {free} free on the filesystem of {tag_dir.parent} (this write needed about "
            f"{_gib(failure['need'])}); {kept}. Free space (or lower checkpoint.keep_last) and resume; the cut-short "
            f"{tag_dir.name} is removed on start"
        )
    return f"{text}; {kept}"


def _unrecorded_files(tag_dir: Path, recorded: dict[str, int]) -> dict[str, int]:
    """Files of ``tag_dir`` written around the checkpoint engine (DeepSpeed's recovery scripts, offload copies):
    fsynced here, with their sizes; the folders are fsynced too."""
    out = {}
    for folder, _, names in os.walk(tag_dir):
        for name in names:
            path = Path(folder) / name
            rel = path.relative_to(tag_dir).as_posix()
            if rel not in recorded and rel != MARKER and not path.is_symlink():
                fsync_file(path)
                out[rel] = path.stat().st_size
        fsync_dir(folder)
    return out


def _commit(engine: Any, tag_dir: Path, step: int, files: dict[str, int], keep_last: int) -> None:
    """Rank 0, once every rank's files are durable: the marker, made durable itself, then the prune."""
    files = {**files, **_unrecorded_files(tag_dir, files)}
    meta = {
        "step": step,
        "world_size": dist.get_world_size(),
        "zero_stage": engine.zero_optimization_stage(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "format": MARKER_FORMAT,
        "files": dict(sorted(files.items())),
    }
    write_text_atomic(tag_dir / MARKER, json.dumps(meta, indent=1))  # fsyncs the marker and tag_dir
    fsync_dir(tag_dir.parent)  # the tag folder's own entry
    _prune(tag_dir.parent, tag_dir, step, keep_last)


def _prune(ckpt_dir: Path, tag_dir: Path, step: int, keep_last: int) -> None:
    complete = list_complete(ckpt_dir)
    # Only checkpoints up to this step are pruned: after an explicit resume from an older checkpoint, newer ones of
    # the abandoned run would otherwise count as "the newest" and this run's own fresh save would be deleted.
    upto = complete[: complete.index(tag_dir) + 1]
    best = read_best(ckpt_dir)
    for old in upto[:-keep_last]:
        if best is not None and old.name == tag_for(int(best["step"])):
            continue
        # The marker goes first: a prune cut short leaves an incomplete folder, never a damaged complete one.
        (old / MARKER).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(universal_dir(old), ignore_errors=True)
    for m, left in step_dirs(ckpt_dir):
        if m < step and not is_complete(left):
            # Left by such a prune, or by a save cut short that this run has since passed: never resumable.
            shutil.rmtree(left, ignore_errors=True)


def save_checkpoint(engine: Any, ckpt_dir: str | Path, step: int, client_state: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank saves its part; rank 0 then writes the marker and prunes to the newest ``keep_last``
    at or below ``step`` (complete checkpoints of later steps, left by a run resumed from an older one, are kept),
    and removes folders of earlier steps that have no marker (left by a prune or a save cut short).

    The tag folder may already exist (a run resumed from an older checkpoint reaches a step it had saved before):
    rank 0 removes its marker, then the folder and the universal copy converted from it, before any rank writes. A
    save cut short by a crash then leaves a folder without a marker, never a half-new one that looks complete, and
    no shard of the old save (another world size writes other ``*optim_states.pt`` names) mixes with the new ones.

    Args:
        engine: the DeepSpeed engine.
        ckpt_dir: the run's ``checkpoints/`` folder.
        step: the optimizer step (the folder is ``step-<step>``).
        client_state: what the trainer saves besides the engine's state (DeepSpeed returns it on load).
        keep_last: complete checkpoints to keep at or below ``step``.

    Returns:
        The complete checkpoint folder.

    Raises:
        CheckpointError: on every rank, when any rank could not write its part or rank 0 could not write the marker
            (naming the path; for a full disk the free space and the size of the last complete checkpoint, which
            stays usable).
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if dist.get_rank() == 0 and (tag_dir.exists() or universal_dir(tag_dir).exists()):
        (tag_dir / MARKER).unlink(missing_ok=True)  # first: an interrupted removal leaves an incomplete folder
        shutil.rmtree(tag_dir, ignore_errors=True)
        shutil.rmtree(universal_dir(tag_dir), ignore_errors=True)
    dist.barrier()  # no rank writes into the folder before the old save is gone
    with WriteRecorder(engine, tag_dir) as recorder:
        try:
            # No "latest" file: the trainer names the tag it loads, and a failed write of it (rank 0 only) would
            # leave rank 0 outside the save's last barrier.
            engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        except Exception as exc:  # raised on this rank after its collectives (a write failure is recorded instead)
            recorder.fail(exc, tag_dir, 0)
    outcomes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, (recorder.files, recorder.failure))
    failures = [(rank, failure) for rank, (_, failure) in enumerate(outcomes) if failure is not None]
    if failures:
        raise CheckpointError(_failure_message(tag_dir, failures))
    status: list[Any] = [None]
    if dist.get_rank() == 0:
        files = {name: size for recorded, _ in outcomes for name, size in recorded.items()}
        try:
            _commit(engine, tag_dir, step, files, keep_last)
        except OSError as exc:
            failure = {"path": str(exc.filename or tag_dir / MARKER), "text": exc.strerror or str(exc)}
            failure.update(errno=exc.errno, free=shutil.disk_usage(ckpt_dir).free, need=4096)
            status[0] = _failure_message(tag_dir, [(0, failure)])
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise CheckpointError(status[0])
    return tag_dir


def read_best(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The best-checkpoint record of ``ckpt_dir`` ({"step", "metric", "value"}), or None (none yet, or unreadable)."""
    try:
        record = json.loads((Path(ckpt_dir) / BEST_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "step" in record else None


def mark_best(ckpt_dir: str | Path, step: int, metric: str, value: float, keep_last: int) -> Path:
    """Rank 0: record the complete checkpoint of ``step`` as the best by ``metric`` (so pruning keeps it), then prune
    the previous best if it is no longer among the last ``keep_last``. Returns the checkpoint folder.

    Raises:
        CheckpointError: there is no complete checkpoint of ``step``.
    """
    ckpt_dir = Path(ckpt_dir)
    tag_dir = ckpt_dir / tag_for(step)
    if not is_complete(tag_dir):
        raise CheckpointError(f"{tag_dir}: no complete checkpoint to mark as the best by {metric}")
    record = {"step": step, "metric": metric, "value": value, "tag": tag_dir.name}
    write_text_atomic(ckpt_dir / BEST_RECORD, json.dumps(record, indent=1))
    newest = list_complete(ckpt_dir)[-1]
    _prune(ckpt_dir, newest, step_of(newest) or step, keep_last)
    return tag_dir


# ------------------------------------------------------------------------------------------------- set aside
def set_aside_later(ckpt_dir: str | Path, step: int) -> tuple[Path | None, list[str]]:
    """Move the complete checkpoints of steps after ``step`` (and their universal copies) out of ``ckpt_dir`` into
    ``ckpt_dir/abandoned/resumed-at-step-<step>-<time>/``; returns that folder and the moved names ((None, []) when
    there were none).

    Called when a run resumes explicitly from an older checkpoint: the later ones belong to the run that went on
    from there. Left in place, auto-resume (after a preemption or a crash) would pick them over this run's own
    checkpoints. Moved, not deleted: nothing is lost, and they stay loadable by path. Renames within one filesystem,
    the universal copy before its checkpoint, so an interruption leaves every checkpoint whole.
    """
    ckpt_dir = Path(ckpt_dir)
    later = [path for m, path in step_dirs(ckpt_dir) if m > step and is_complete(path)]
    if not later:
        return None, []
    dest = dated_folder(ckpt_dir / ABANDONED_DIR, f"resumed-at-step-{step}")
    for tag_dir in later:
        if universal_dir(tag_dir).exists():
            os.replace(universal_dir(tag_dir), dest / universal_dir(tag_dir).name)
        os.replace(tag_dir, dest / tag_dir.name)
    fsync_dir(dest)
    fsync_dir(ckpt_dir)
    return dest, [tag_dir.name for tag_dir in later]


PREVIOUS_RUNS_DIR = "previous"
# What a run leaves in its output directory besides checkpoints, and what a fresh start would otherwise trim or mix.
RUN_OUTPUTS = ("metrics.jsonl", "tb", "images")


def set_aside_previous_run(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """Move an earlier run's ``checkpoints/`` and metrics (``metrics.jsonl``, ``tb/``, ``images/``) out of the way,
    into ``run_dir/previous/run-<time>/``; returns that folder and the moved names ((None, []) when there were none).

    Called when a run starts fresh (``checkpoint.resume=none``) in a directory an earlier run used: left in place,
    auto-resume after a preemption would continue the earlier run from its newest checkpoint, its later checkpoints
    would outlive this run's in pruning, and the metrics of both runs would mix. Moved, not deleted: nothing is lost.
    ``train.log`` stays (it is appended to and keeps the history of every start) and so does ``config.yaml``.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    moving = [ckpt_dir] if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()) else []
    moving += [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not moving:
        return None, []
    dest = dated_folder(run_dir / PREVIOUS_RUNS_DIR, "run")
    for path in moving:
        os.replace(path, dest / path.name)
    fsync_dir(dest)
    fsync_dir(run_dir)
    return dest, [path.name for path in moving]


def move_to_corrupt(tag_dir: str | Path) -> Path:
    """Move a damaged checkpoint (and its universal copy) into ``checkpoints/corrupt/``; returns its new path."""
    tag_dir = Path(tag_dir)
    corrupt = tag_dir.parent / CORRUPT_DIR
    corrupt.mkdir(exist_ok=True)
    dest = corrupt / tag_dir.name
    if dest.exists() or universal_dir(dest).exists():  # the same step was found damaged before
        dest = dated_folder(corrupt, tag_dir.name) / tag_dir.name
    # The marker-bearing folder goes last: an interruption never leaves a damaged checkpoint looking usable and
    # its copy gone.
    if universal_dir(tag_dir).exists():
        os.replace(universal_dir(tag_dir), universal_dir(dest))
    os.replace(tag_dir, dest)
    fsync_dir(dest.parent)
    fsync_dir(tag_dir.parent)
    return dest


def remove_cut_short(ckpt_dir: str | Path, after_step: int) -> list[str]:
    """Remove the ``step-<N>`` folders without a marker for N > ``after_step``, and temporary folders of
    conversions cut short; returns the removed names.

    On start, with the run lock held, such folders can only be saves cut short (a crash, a kill, a full disk) by an
    earlier start of this run: nothing reads them, and they hold disk space a full disk needs back. Folders of
    earlier steps are removed by the next save.
    """
    ckpt_dir = Path(ckpt_dir)
    removed = []
    for m, path in step_dirs(ckpt_dir):
        if m > after_step and not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if ckpt_dir.is_dir():
        for path in ckpt_dir.glob(".step-*.tmp"):  # atomic_output's temporary folder of a universal conversion
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed
