"""DeepSpeed's universal checkpoint format: the world-size-free copy a ZeRO checkpoint needs to resume at another
world size (DeepSpeed 0.19 reloads partitioned optimizer state only at the world size that saved it)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

from ..atomic import atomic_output
from .integrity import find_damage, list_files, reading
from .layout import MARKER, UNIVERSAL, CheckpointError, has_zero_shards, read_marker, resolve_checkpoint
from .layout import universal_dir as default_universal_dir

__all__ = ["to_universal"]


def _convert(tag_dir: Path, tmp: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    args = SimpleNamespace(
        input_folder=str(tag_dir),
        output_folder=str(tmp),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal.main(args)
    # DeepSpeed loads the client state and module buffers from the model-states files of the tag directory.
    for src in tag_dir.glob("*model_states.pt"):
        if not (tmp / src.name).exists():
            shutil.copy2(src, tmp / src.name)


def to_universal(
    path: str | Path, output: str | Path | None = None, *, tag: str | None = None, force: bool = False
) -> Path:
    """Convert a DeepSpeed checkpoint to DeepSpeed's universal format (``ds_to_universal``).

    The result is a tag directory (default ``<tag>_universal`` next to the source, where the trainer looks for it when
    a ZeRO run resumes at another world size) holding the model-states files, DeepSpeed's ``zero/`` per-parameter
    folders, a ``UNIVERSAL`` marker and a ``COMPLETE`` marker of its own (the source's record, with this folder's
    files); resume from it with DeepSpeed's ``checkpoint.load_universal: true`` at any world size.

    Args:
        path: tag, checkpoints or run directory (see :func:`resolve_checkpoint`).
        output: the universal tag directory to write (default ``<tag>_universal`` next to the source).
        tag: checkpoint tag; None = newest complete.
        force: replace an existing output.

    Returns:
        The universal tag directory.

    Raises:
        CheckpointError: an incomplete, damaged or stage-0 source, an existing output without ``force``, or a source
            removed while it was converted.
    """
    tag_dir = resolve_checkpoint(path, tag)
    damage = find_damage(tag_dir)
    if damage is not None:
        raise CheckpointError(f"{tag_dir} is damaged: {damage}; refusing to convert it")
    meta = read_marker(tag_dir)
    if not has_zero_shards(tag_dir) and int(meta["zero_stage"]) == 0:
        raise CheckpointError(
            f"{tag_dir}: a ZeRO stage 0 checkpoint holds the whole model and optimizer state in one file and resumes "
            f"at any world size as it is; universal conversion applies to ZeRO stages 1-3"
        )
    output = Path(output) if output is not None else default_universal_dir(tag_dir)
    if output.exists() and not force:
        raise CheckpointError(f"{output} exists; pass --force to replace it")
    with atomic_output(output, replace=True, directory=True) as tmp, reading(tag_dir, "converting it"):
        _convert(tag_dir, tmp)
        (tmp / UNIVERSAL).write_text(f"converted from {tag_dir}\n")
        record = {**meta, "source": str(tag_dir), "files": list_files(tmp)}
        # Last, as for a save: the files it vouches for are fsynced before atomic_output renames the folder.
        (tmp / MARKER).write_text(json.dumps(record, indent=1))
    print(f"universal checkpoint of {tag_dir} -> {output}", file=sys.stderr)
    return output
