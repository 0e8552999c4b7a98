"""Which checkpoint a run resumes from: rank 0 decides (and prepares it), every rank is told.

Rank 0's decision, before any engine exists:

1. ``checkpoint.resume=none``: an earlier run's checkpoints and metrics in the directory are moved aside; fresh start.
2. ``auto``: the newest complete checkpoint that is whole; a damaged one is moved to ``checkpoints/corrupt/`` (the
   log says what was wrong) and the next newest is tried. ``PATH``: that checkpoint, which must be complete and whole.
3. Folders without a marker newer than the chosen step (saves cut short) are removed.
4. The saved config is compared with this run's: an architecture change is refused, other changes are listed.
5. ``PATH``: later complete checkpoints move to ``checkpoints/abandoned/``.
6. At another world size a ZeRO checkpoint is converted to DeepSpeed's universal format (or its copy reused).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch.distributed as dist

from .compare import compare_configs
from .integrity import find_damage
from .layout import (
    MARKER,
    CheckpointError,
    find_latest_complete,
    has_zero_shards,
    is_complete,
    is_universal,
    list_complete,
    read_client_state,
    read_marker,
    universal_dir,
)
from .store import move_to_corrupt, remove_cut_short, set_aside_later, set_aside_previous_run
from .universal import to_universal

__all__ = ["ResumePoint", "needs_universal", "plan_resume", "resume_target"]

Say = Callable[[str], None]


class ResumePoint(NamedTuple):
    """Where a run continues: ``path`` None = a fresh start; ``universal``: the checkpoint is in DeepSpeed's
    universal format (build the engine with ``load_universal``)."""

    path: Path | None
    universal: bool


def needs_universal(target: Path, meta: dict[str, Any], world_size: int) -> bool:
    """True when DeepSpeed cannot reload ``target`` as it is at ``world_size`` processes.

    ZeRO stages 1-3 partition the optimizer state by rank, and DeepSpeed 0.19 refuses to reload partitioned state at
    another world size for every stage ("Automatic adjustment of ZeRO's optimizer state partitioning with a new world
    size is not currently supported", raised by ``_load_zero_checkpoint``; tried with ZeRO-2 and 3). Its universal
    format is world-size free. Stage 0 keeps the whole optimizer state in one file and reloads anywhere, unless the
    folder holds per-rank ``*optim_states.pt`` shards (DeepSpeed's BF16_Optimizer writes them when enabled through
    distributed.deepspeed).
    """
    if int(meta["world_size"]) == world_size:
        return False
    return int(meta["zero_stage"]) >= 1 or has_zero_shards(target)


def _newest_whole(ckpt_dir: Path, say: Say) -> Path | None:
    """The newest complete checkpoint that is whole; damaged ones on the way are moved to ``corrupt/``."""
    moved = []
    for tag_dir in reversed(list_complete(ckpt_dir)):
        damage = find_damage(tag_dir)
        if damage is None:
            return tag_dir
        dest = move_to_corrupt(tag_dir)
        moved.append(tag_dir.name)
        say(f"checkpoint {tag_dir} is damaged: {damage}. Moved it to {dest}; trying the next newest complete one")
    if moved:
        raise CheckpointError(
            f"no usable checkpoint left in {ckpt_dir}: every complete one was damaged ({', '.join(moved)}, moved to "
            f"{ckpt_dir / 'corrupt'} with the reason in the log). Resume from a copy with checkpoint.resume=PATH, or "
            f"start over with checkpoint.resume=none"
        )
    return None


def _explicit_target(choice: str) -> Path:
    """The checkpoint named by checkpoint.resume=PATH, which must be complete and whole."""
    target = Path(choice)
    if not target.is_dir():
        raise CheckpointError(
            f"checkpoint.resume={choice!r}: no such directory; accepted: auto, none, or a checkpoint directory "
            f"checkpoints/step-<N> that holds a {MARKER} marker"
        )
    if not is_complete(target):
        newest = find_latest_complete(target.parent)
        hint = f" (the newest complete one next to it is {newest})" if newest is not None else ""
        raise CheckpointError(
            f"checkpoint.resume={choice!r}: {target} has no {MARKER} marker, so it is not a complete checkpoint "
            f"(its save was cut short, or it is not a step-<N> directory written by this trainer); accepted: a "
            f"step-<N> directory with the marker{hint}"
        )
    damage = find_damage(target)
    if damage is not None:
        raise CheckpointError(f"checkpoint.resume={choice!r}: {target} is damaged: {damage}; choose another one")
    return target


def _check_config(cfg: Any, target: Path, say: Say) -> None:
    """Refuse a checkpoint of another architecture; list the other config differences."""
    from ..config import to_dict  # the config module imports this package (it owns the checkpoint section)

    saved = read_client_state(target).get("config")
    if not saved:
        say(f"{target} records no config: it is not compared with this run's")
        return
    diff = compare_configs(saved, to_dict(cfg))
    if diff.architecture:
        raise CheckpointError(
            f"checkpoint.resume={cfg.checkpoint.resume}: {target} was saved by a run of another architecture "
            f"({diff.describe(diff.architecture)}), so its weights do not fit this model. Resume with the "
            f"checkpoint's values, use another training.output_dir for the new model, or start fresh here with "
            f"checkpoint.resume=none (the earlier run's checkpoints and metrics are then moved aside)"
        )
    if diff.other:
        say(f"resuming {target}, saved with another config (same architecture): {diff.describe(diff.other)}")


def _universal_copy(cfg: Any, target: Path, meta: dict[str, Any], world_size: int, say: Say) -> Path:
    """The universal-format copy of ``target``: reused when whole, else converted now by this rank."""
    universal = universal_dir(target)
    saved = (
        f"{target} was saved by ZeRO-{meta['zero_stage']} at world size {meta['world_size']}, this run has {world_size}"
    )
    if is_complete(universal) and is_universal(universal):
        damage = find_damage(universal)
        if damage is None:
            say(f"{saved}: resuming from its universal-format copy {universal}")
            return universal
        say(f"the universal-format copy {universal} is damaged ({damage}); converting {target} again")
    say(
        f"{saved}: DeepSpeed cannot reload partitioned optimizer state at another world size, so rank 0 converts it "
        f"to DeepSpeed's universal format now (`python -m pretrain.convert universal {target}`, writing "
        f"{universal.name}); the other ranks wait for it, up to distributed.timeout_minutes="
        f"{cfg.distributed.timeout_minutes:g}. For a model too large to convert within that, run the command "
        f"beforehand"
    )
    start = time.perf_counter()
    try:
        # force: a universal folder without its markers is a leftover of an interrupted conversion.
        to_universal(target, force=True)
    except Exception as exc:
        raise CheckpointError(
            f"{saved}, and its automatic conversion to DeepSpeed's universal format failed: {exc}. Convert it with "
            f"`python -m pretrain.convert universal {target}`, or resume with {meta['world_size']} processes"
        ) from exc
    say(f"converted {target} to {universal} in {time.perf_counter() - start:.1f} s")
    return universal


def _choose(cfg: Any, ckpt_dir: Path, say: Say) -> Path | None:
    """Steps 1-3 of the module docstring: the checkpoint to continue from, or None."""
    choice = cfg.checkpoint.resume
    if choice == "none":
        dest, moved = set_aside_previous_run(ckpt_dir.parent)
        if dest is not None:
            say(
                f"checkpoint.resume=none in {ckpt_dir.parent}, which an earlier run used: moved its "
                f"{', '.join(moved)} to {dest}, so that nothing of it is lost and auto-resume after a preemption "
                f"continues this run only"
            )
        return None
    target = _newest_whole(ckpt_dir, say) if choice == "auto" else _explicit_target(choice)
    after = -1 if target is None else int(read_marker(target)["step"])
    removed = remove_cut_short(ckpt_dir, after)
    if removed:
        say(
            f"removed {', '.join(removed)} from {ckpt_dir}: folders without a {MARKER} marker newer than the "
            f"checkpoint this run continues from are saves (or conversions) cut short, never resumable"
        )
    return target


def plan_resume(cfg: Any, ckpt_dir: str | Path, world_size: int, say: Say = print) -> ResumePoint:
    """Rank 0's decision (the module docstring's steps), with what it moves, removes or converts on the way.

    Args:
        cfg: the run's config (``checkpoint.resume``, ``distributed.timeout_minutes``; the whole of it for the
            comparison with the saved config).
        ckpt_dir: the run's ``checkpoints/`` folder (its parent is the run directory).
        world_size: this run's number of processes.
        say: where messages go (the console and train.log).

    Raises:
        CheckpointError: an unusable ``checkpoint.resume=PATH``, no whole checkpoint left after damaged ones, an
            architecture change, or a failed universal conversion.
    """
    ckpt_dir = Path(ckpt_dir)
    target = _choose(cfg, ckpt_dir, say)
    if target is None:
        return ResumePoint(None, False)
    meta = read_marker(target)
    _check_config(cfg, target, say)
    if cfg.checkpoint.resume != "auto":
        dest, moved = set_aside_later(ckpt_dir, int(meta["step"]))
        if dest is not None:
            say(
                f"checkpoint.resume={cfg.checkpoint.resume}: moved the later complete checkpoints {', '.join(moved)} "
                f"(of the run that went on from there) to {dest}, so that auto-resume after a preemption or crash "
                f"continues this run, not that one"
            )
    if is_universal(target):  # checkpoint.resume pointed at a universal copy
        return ResumePoint(target, True)
    if not needs_universal(target, meta, world_size):
        return ResumePoint(target, False)
    return ResumePoint(_universal_copy(cfg, target, meta, world_size, say), True)


def resume_target(cfg: Any, ckpt_dir: str | Path, world_size: int, say: Say = print) -> ResumePoint:
    """Collective: where this run continues (:class:`ResumePoint`), decided by rank 0 (:func:`plan_resume`).

    Each rank listing the checkpoints itself can disagree on a shared filesystem (metadata caching, a marker written
    a moment ago), and ranks loading different checkpoints would silently diverge. Rank 0 decides, converts to the
    universal format if the world size changed, and broadcasts the result; an error on rank 0 reaches every rank, so
    none waits for a collective that never comes.

    Raises:
        CheckpointError: rank 0's own error on rank 0; on the other ranks one that quotes it.
    """
    box: list[Any] = [None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            path, universal = plan_resume(cfg, ckpt_dir, world_size, say)
            box[0] = (None if path is None else str(path), universal, None)
        except Exception as exc:
            failure = exc
            box[0] = (None, False, str(exc))
    dist.broadcast_object_list(box, src=0)
    path, universal, error = box[0]
    if failure is not None:
        raise failure
    if error is not None:
        raise CheckpointError(f"rank 0 could not choose the checkpoint to resume from: {error}")
    return ResumePoint(None if path is None else Path(path), bool(universal))
