"""Where a checkpoint lives and how it is recognised: tag folders, markers, model-states files, the saved state.

Layout of a run's ``checkpoints/``:

- ``step-<N>/``: what ``engine.save_checkpoint`` writes (every rank its files) and, written last by rank 0 once every
  rank's files are durable, the ``COMPLETE`` marker (JSON: step, world size, ZeRO stage, time, and the name and size
  of every file). Only folders with the marker are ever resumed from, consolidated or pruned.
- ``step-<N>_universal/``: its DeepSpeed universal-format copy (resume at another world size), with its own
  ``COMPLETE`` marker and a ``UNIVERSAL`` marker.
- ``abandoned/``: later checkpoints moved aside when a run resumes from an older one; ``corrupt/``: damaged ones
  moved aside on start.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ABANDONED_DIR",
    "CORRUPT_DIR",
    "MARKER",
    "UNIVERSAL",
    "CheckpointError",
    "expected_rank_files",
    "find_latest_complete",
    "has_zero_shards",
    "is_complete",
    "is_tag_dir",
    "is_universal",
    "list_complete",
    "model_states_file",
    "read_client_state",
    "read_marker",
    "resolve_checkpoint",
    "step_dirs",
    "step_of",
    "tag_for",
    "universal_dir",
]

MARKER = "COMPLETE"
UNIVERSAL = "UNIVERSAL"
ABANDONED_DIR = "abandoned"
CORRUPT_DIR = "corrupt"
_TAG = re.compile(r"^step-(\d+)$")
# DeepSpeed's file names: mp_rank_00_model_states.pt (ZeRO 0-2, rank 0) or zero_pp_rank_<r>_mp_rank_00_model_states.pt
# (ZeRO-3, every rank); zero_pp_rank_<r>_mp_rank_00_optim_states.pt per rank for ZeRO 1-3 and the bf16 optimizer.
_RANK0_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as asked (incomplete, damaged, missing, saved by another architecture or at an
    incompatible world size), or cannot be written; the message names the path and what to do."""


def tag_for(step: int) -> str:
    return f"step-{step}"


def step_of(tag_dir: str | Path) -> int | None:
    """N of a ``step-<N>`` folder (or of its ``_universal`` copy); None for another name."""
    name = Path(tag_dir).name
    match = _TAG.match(name.removesuffix("_universal"))
    return int(match.group(1)) if match else None


def is_complete(tag_dir: str | Path) -> bool:
    """True when ``tag_dir`` holds the completion marker (the checkpoint was fully written by every rank)."""
    return (Path(tag_dir) / MARKER).is_file()


def is_universal(tag_dir: str | Path) -> bool:
    """True for a DeepSpeed universal-format checkpoint written by ``to_universal``."""
    return (Path(tag_dir) / UNIVERSAL).is_file()


def read_marker(tag_dir: str | Path) -> dict[str, Any]:
    """The marker's metadata.

    Raises:
        CheckpointError: the checkpoint is incomplete (no marker), or the marker is empty or not a JSON record.
    """
    tag_dir = Path(tag_dir)
    if not is_complete(tag_dir):
        raise CheckpointError(
            f"{tag_dir} has no {MARKER} marker: the checkpoint was not completely written (crash or preemption "
            f"while saving); use an earlier complete one"
        )
    marker = tag_dir / MARKER
    try:
        meta = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(
            f"{marker}: the marker is unreadable ({marker.stat().st_size} bytes, {type(err).__name__}); the "
            f"checkpoint cannot be trusted"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{marker}: the marker holds a {type(meta).__name__}, not a JSON record")
    return meta


def step_dirs(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(N, path) of the ``step-<N>`` directories under ``ckpt_dir``, complete or not, oldest first."""
    ckpt_dir = Path(ckpt_dir)
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
    return [path for _, path in step_dirs(ckpt_dir) if is_complete(path)]


def find_latest_complete(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (highest step) in ``ckpt_dir``, or None."""
    complete = list_complete(ckpt_dir)
    return complete[-1] if complete else None


def universal_dir(tag_dir: str | Path) -> Path:
    """Where ``python -m pretrain.convert universal`` (and the trainer's automatic conversion) puts ``tag_dir``'s
    universal-format copy: ``step-<N>_universal`` next to it."""
    tag_dir = Path(tag_dir)
    return tag_dir.with_name(tag_dir.name + "_universal")


def has_zero_shards(tag_dir: str | Path) -> bool:
    """ZeRO (and DeepSpeed's bf16 optimizer) write per-rank ``*_optim_states.pt`` shards; plain stage 0 does not."""
    return any(Path(tag_dir).glob("*optim_states.pt"))


def expected_rank_files(zero_stage: int, world_size: int) -> list[str]:
    """The per-rank files DeepSpeed writes at ``zero_stage`` and ``world_size`` (data parallel only), besides rank
    0's model states: every rank's optimizer shard from stage 1 on, and every rank's model states at stage 3.

    Under bf16 DeepSpeed prefixes the optimizer shards with ``bf16_`` (``bf16_zero_pp_rank_0_...``); the names here
    are without it.
    """
    if zero_stage < 1:
        return []
    names = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)]
    if zero_stage == 3:
        names += [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)]
    return names


def is_tag_dir(path: str | Path) -> bool:
    """True for a folder that holds DeepSpeed model-states files (a checkpoint, complete or not)."""
    return any(Path(path).glob("*model_states.pt"))


def model_states_file(tag_dir: str | Path) -> Path:
    """The model-states file holding rank 0's client state (raises CheckpointError when there is none)."""
    tag_dir = Path(tag_dir)
    for name in _RANK0_MODEL_STATES:
        if (tag_dir / name).is_file():
            return tag_dir / name
    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise CheckpointError(f"{tag_dir}: no *model_states.pt file")
    return files[0]


def read_client_state(tag_dir: str | Path) -> dict[str, Any]:
    """The client state saved with a DeepSpeed checkpoint (memory-mapped; the module weights are not read).

    Raises:
        CheckpointError: the model-states file is missing or cannot be read (naming it).
    """
    path = model_states_file(tag_dir)
    try:
        # Our own trainer's file: it holds RNG states and the config as Python objects, so weights_only cannot be
        # used.
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:
        text = str(err).strip().splitlines()
        size = f"{path.stat().st_size} bytes" if path.exists() else "no longer there"
        raise CheckpointError(
            f"{path}: cannot be read ({text[0] if text else type(err).__name__}); the file is damaged or was cut "
            f"short ({size})"
        ) from None
    skip = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params"}
    state = {k: v for k, v in obj.items() if k not in skip and not isinstance(v, torch.Tensor)}
    if "ds_config" in obj and "zero_stage" not in state:
        state["zero_stage"] = obj["ds_config"].get("zero_optimization", {}).get("stage")
    return state


def _tags_in(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and is_tag_dir(p))


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> Path:
    """Find the DeepSpeed tag directory to read, refusing incomplete ones.

    Args:
        path: a tag directory (``.../checkpoints/step-<N>``), a checkpoints directory, or a run directory (with
            ``checkpoints/`` inside).
        tag: a tag inside the checkpoints directory; None = the newest complete one.

    Returns:
        The tag directory (which holds the COMPLETE marker).

    Raises:
        CheckpointError: naming what was found instead.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; expected a DeepSpeed checkpoint directory (step-<N>)")
    if is_tag_dir(path):
        if tag is not None and tag != path.name:
            raise CheckpointError(f"{path} is itself the checkpoint {path.name!r}; --tag {tag!r} does not apply")
        tag_dir = path
    else:
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        if tag is not None:
            tag_dir = ckpt_dir / tag
            if not is_tag_dir(tag_dir):
                raise CheckpointError(
                    f"{tag_dir}: no DeepSpeed checkpoint with tag {tag!r}; tags found: {_tags_in(ckpt_dir)}"
                )
        else:
            latest = find_latest_complete(ckpt_dir)
            if latest is None:
                raise CheckpointError(
                    f"{ckpt_dir}: no complete checkpoint (a step-<N> directory with a {MARKER} marker); "
                    f"incomplete tags found: {_tags_in(ckpt_dir)}"
                )
            tag_dir = latest
    if not is_complete(tag_dir):
        raise CheckpointError(
            f"{tag_dir}: no {MARKER} marker, so the save did not finish (interrupted or still running); "
            f"refusing to read it. Use an earlier complete tag, or the newest complete one by passing the "
            f"checkpoints directory without --tag"
        )
    return tag_dir
