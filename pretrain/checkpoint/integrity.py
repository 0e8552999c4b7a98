"""Is a complete-looking checkpoint really whole? A cheap check, made before anything loads it.

Markers written by :func:`pretrain.checkpoint.save_checkpoint` list every file of the checkpoint with its size, so
the check is a listing: a file missing or of another size (cut short, overwritten) is found without reading it.
Markers of older checkpoints lack that list; they get a structural check instead: rank 0's model states and every
per-rank file the ZeRO stage and world size imply are there, not empty, and every torch file still ends with its zip
directory (a truncated zip archive has lost it).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..formats.files import torch_file_kind
from .layout import MARKER, UNIVERSAL, CheckpointError, expected_rank_files, is_complete, is_universal, step_of

__all__ = ["checkpoint_bytes", "find_corrupt_file", "find_damage", "list_files", "reading"]

_MARKER_KEYS = ("step", "world_size", "zero_stage")


def list_files(tag_dir: str | Path) -> dict[str, int]:
    """Every file under ``tag_dir`` (relative POSIX path -> size in bytes), markers left out."""
    tag_dir = Path(tag_dir)
    out = {}
    for folder, _, names in os.walk(tag_dir):
        for name in names:
            path = Path(folder) / name
            rel = path.relative_to(tag_dir).as_posix()
            if rel not in (MARKER, UNIVERSAL) and not path.is_symlink():
                out[rel] = path.stat().st_size
    return out


def checkpoint_bytes(tag_dir: str | Path) -> int:
    """The size of a checkpoint folder's files (0 when it is gone)."""
    try:
        return sum(list_files(tag_dir).values())
    except OSError:
        return 0


def _marker_record(tag_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the marker's record, None) or (None, what is wrong with the marker)."""
    marker = tag_dir / MARKER
    try:
        data = marker.read_bytes()
    except OSError as err:
        return None, f"its {MARKER} marker cannot be read ({err.strerror or err})"
    if not data.strip():
        return None, f"its {MARKER} marker is empty ({len(data)} bytes)"
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return None, f"its {MARKER} marker is not a JSON record ({len(data)} bytes of something else)"
    if not isinstance(meta, dict) or any(key not in meta for key in _MARKER_KEYS):
        return None, f"its {MARKER} marker lacks {', '.join(_MARKER_KEYS)} (garbled)"
    step = step_of(tag_dir)
    if step is not None and meta["step"] != step:
        return None, f"its {MARKER} marker records step {meta['step']}, not {step}"
    return meta, None


def _listed_damage(tag_dir: Path, files: dict[str, int]) -> str | None:
    for name, size in sorted(files.items()):
        try:
            found = (tag_dir / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing (the {MARKER} marker lists it, {size} bytes)"
        if found != size:
            return f"{name} is {found} bytes, the {MARKER} marker records {size} (cut short or overwritten)"
    return None


def _structural_damage(tag_dir: Path, meta: dict[str, Any]) -> str | None:
    if not any(tag_dir.glob("*model_states.pt")):
        return "it holds no *model_states.pt file"
    if not is_universal(tag_dir):
        expected = expected_rank_files(int(meta["zero_stage"]), int(meta["world_size"]))
        missing = [n for n in expected if not (tag_dir / n).is_file() and not (tag_dir / f"bf16_{n}").is_file()]
        if missing:
            return (
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing (ZeRO-{meta['zero_stage']} at "
                f"world size {meta['world_size']} writes one per rank)"
            )
    for path in sorted(tag_dir.rglob("*.pt")):
        size = path.stat().st_size
        rel = path.relative_to(tag_dir).as_posix()
        if size == 0:
            return f"{rel} is empty (0 bytes)"
        if torch_file_kind(path) is None:
            return f"{rel} is not a whole torch file ({size} bytes, no zip directory at its end: cut short)"
    return None


def find_damage(tag_dir: str | Path) -> str | None:
    """What is wrong with the complete-looking checkpoint ``tag_dir``, or None when it is whole.

    Args:
        tag_dir: a ``step-<N>`` folder (or a universal copy) that holds a ``COMPLETE`` marker.

    Returns:
        A phrase naming the damage ("mp_rank_00_model_states.pt is 4096 bytes, the COMPLETE marker records 65536
        (cut short or overwritten)"), or None.
    """
    tag_dir = Path(tag_dir)
    meta, problem = _marker_record(tag_dir)
    if meta is None:
        return problem
    files = meta.get("files")
    if isinstance(files, dict) and files:
        return _listed_damage(tag_dir, {str(k): int(v) for k, v in files.items()})
    return _structural_damage(tag_dir, meta)


def find_corrupt_file(tag_dir: str | Path) -> str | None:
    """The first torch file of ``tag_dir`` whose content fails its zip checksums, as a phrase; None when all pass.

    Reads every file whole (a CRC check of every record): for naming the culprit after a read failed, not for the
    start-up check.
    """
    tag_dir = Path(tag_dir)
    for path in sorted(tag_dir.rglob("*.pt")):
        rel = path.relative_to(tag_dir).as_posix()
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
            return f"{rel} is damaged ({type(err).__name__}: {err})"
        if bad is not None:
            return f"{rel} is damaged (its record {bad} fails its checksum)"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextmanager
def reading(tag_dir: str | Path, doing: str) -> Iterator[None]:
    """Around reading a checkpoint: an error says what really went wrong, naming the path.

    A checkpoint removed meanwhile (pruned by a running training, which keeps only checkpoint.keep_last) says so,
    instead of whatever the reader hit first. Any other unexpected read error names the damaged file (found by
    checking every file's checksums, on this error path only). Errors that already explain themselves (ValueError
    subclasses such as the conversion tool's, CheckpointError) pass through unless the checkpoint is gone.

    Args:
        tag_dir: the checkpoint being read.
        doing: what is being done, for the message ("converting it").
    """
    tag_dir = Path(tag_dir)
    try:
        yield
    except Exception as err:
        if not is_complete(tag_dir):
            raise CheckpointError(
                f"{tag_dir} was removed while {doing}: its {MARKER} marker is gone, so the training run writing "
                f"into {tag_dir.parent} most likely pruned it (it keeps checkpoint.keep_last checkpoints). Use a "
                f"newer checkpoint, or copy this one elsewhere first (the read failed with: {_first_line(err)})"
            ) from None
        if isinstance(err, (CheckpointError, ValueError)):
            raise
        culprit = find_corrupt_file(tag_dir)
        raise CheckpointError(
            f"{tag_dir}: {culprit}" if culprit else f"{tag_dir}: cannot be read while {doing} ({_first_line(err)})"
        ) from err
