"""DeepSpeed checkpoints with completion markers, retention and resume selection.

Layout: ``<output_dir>/checkpoints/step-<N>/`` holds what ``engine.save_checkpoint`` writes (every rank its
shards) and, written last by rank 0 after all ranks finished, the marker ``COMPLETE`` (JSON: step, world size, ZeRO
stage, time). Only directories with the marker are ever resumed from, consolidated or pruned, so a checkpoint that
a crash or a preemption cut short is never chosen. The marker is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .checks import require

__all__ = [
    "MARKER",
    "CheckpointConfig",
    "CheckpointError",
    "find_latest_complete",
    "has_zero_shards",
    "is_complete",
    "list_complete",
    "read_marker",
    "save_checkpoint",
    "set_aside_later",
    "tag_for",
    "universal_dir",
]

MARKER = "COMPLETE"
_TAG = re.compile(r"^step-(\d+)$")


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    # auto: newest complete checkpoint in output_dir/checkpoints; none; or a path to a step-<N> directory.
    resume: str = "auto"

    def check(self) -> None:
        require(self.every_steps >= 1, f"checkpoint.every_steps={self.every_steps}; accepted: 1 or more")
        require(self.keep_last >= 1, f"checkpoint.keep_last={self.keep_last}; accepted: 1 or more")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as asked (incomplete, missing, or saved at an incompatible world size)."""


def tag_for(step: int) -> str:
    return f"step-{step}"


def is_complete(tag_dir: str | Path) -> bool:
    """True when ``tag_dir`` holds the completion marker (the checkpoint was fully written by every rank)."""
    return (Path(tag_dir) / MARKER).is_file()


def read_marker(tag_dir: str | Path) -> dict[str, Any]:
    """The marker's metadata; CheckpointError if the checkpoint is incomplete."""
    tag_dir = Path(tag_dir)
    if not is_complete(tag_dir):
        raise CheckpointError(
            f"{tag_dir} has no {MARKER} marker: the checkpoint was not completely written (crash or preemption "
            f"while saving); use an earlier complete one"
        )
    return json.loads((tag_dir / MARKER).read_text())


def _step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(N, path) of the ``step-<N>`` directories under ``ckpt_dir``, complete or not, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for child in ckpt_dir.iterdir():
        match = _TAG.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def list_complete(ckpt_dir: str | Path) -> list[Path]:
    """Complete ``step-<N>`` directories under ``ckpt_dir``, oldest first."""
    return [path for _, path in _step_dirs(Path(ckpt_dir)) if is_complete(path)]


def _incomplete_before(ckpt_dir: Path, step: int) -> list[Path]:
    """``step-<M>`` directories without the marker, for M < ``step``."""
    return [path for m, path in _step_dirs(ckpt_dir) if m < step and not is_complete(path)]


def find_latest_complete(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (highest step) in ``ckpt_dir``, or None."""
    complete = list_complete(ckpt_dir)
    return complete[-1] if complete else None


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
    later = [path for m, path in _step_dirs(ckpt_dir) if m > step and is_complete(path)]
    if not later:
        return None, []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = ckpt_dir / "abandoned" / f"resumed-at-step-{step}-{stamp}"
    suffix = 1
    while dest.exists():  # two resumes within one second
        suffix += 1
        dest = ckpt_dir / "abandoned" / f"resumed-at-step-{step}-{stamp}-{suffix}"
    dest.mkdir(parents=True)
    for tag_dir in later:
        if universal_dir(tag_dir).exists():
            os.replace(universal_dir(tag_dir), dest / universal_dir(tag_dir).name)
        os.replace(tag_dir, dest / tag_dir.name)
    return dest, [tag_dir.name for tag_dir in later]


def has_zero_shards(tag_dir: str | Path) -> bool:
    """ZeRO (and DeepSpeed's bf16 optimizer) write per-rank ``*_optim_states.pt`` shards; plain stage 0 does not."""
    return any(Path(tag_dir).glob("*optim_states.pt"))


def universal_dir(tag_dir: str | Path) -> Path:
    """Where ``python -m pretrain.convert universal`` (and the trainer's automatic conversion) puts ``tag_dir``'s
    universal-format copy: ``step-<N>_universal`` next to it."""
    tag_dir = Path(tag_dir)
    return tag_dir.with_name(tag_dir.name + "_universal")


def save_checkpoint(engine: Any, ckpt_dir: str | Path, step: int, client_state: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank saves its part; rank 0 then writes the marker and prunes to the newest ``keep_last``
    at or below ``step`` (complete checkpoints of later steps, left by a run resumed from an older one, are kept),
    and removes folders of earlier steps that have no marker (left by a prune or a save cut short).

    The tag folder may already exist (a run resumed from an older checkpoint reaches a step it had saved before):
    rank 0 removes its marker, then the folder and the universal copy converted from it, before any rank writes. A
    save cut short by a crash then leaves a folder without a marker, never a half-new one that looks complete, and
    no shard of the old save (another world size writes other ``*optim_states.pt`` names) mixes with the new ones.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if dist.get_rank() == 0 and (tag_dir.exists() or universal_dir(tag_dir).exists()):
        (tag_dir / MARKER).unlink(missing_ok=True)  # first: an interrupted removal leaves an incomplete folder
        shutil.rmtree(tag_dir, ignore_errors=True)
        shutil.rmtree(universal_dir(tag_dir), ignore_errors=True)
    dist.barrier()  # no rank writes into the folder before the old save is gone
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    dist.barrier()
    if dist.get_rank() == 0:
        meta = {
            "step": step,
            "world_size": dist.get_world_size(),
            "zero_stage": engine.zero_optimization_stage(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        tmp = tag_dir / (MARKER + ".partial")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, tag_dir / MARKER)
        complete = list_complete(ckpt_dir)
        # Only checkpoints up to this step are pruned: after an explicit resume from an older checkpoint, newer ones
        # of the abandoned run would otherwise count as "the newest" and this run's own fresh save would be deleted.
        upto = complete[: complete.index(tag_dir) + 1]
        for old in upto[:-keep_last]:
            # The marker goes first: a prune cut short leaves an incomplete folder, never a damaged complete one.
            (old / MARKER).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(universal_dir(old), ignore_errors=True)
        for left in _incomplete_before(ckpt_dir, step):
            # Left by such a prune, or by a save cut short that this run has since passed: never resumable.
            shutil.rmtree(left, ignore_errors=True)
    dist.barrier()
    return tag_dir
