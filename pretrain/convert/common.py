"""What the subcommands share: dtype names, the log line, output checks, and reading a file in our layout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import is_tag_dir
from ..formats import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    ConversionError,
    detect_layout,
    layout_hint,
    load_weights_file,
    rename_legacy,
)

__all__ = ["DTYPES", "check_output", "describe_directory", "load_ours", "log"]

DTYPES = ("fp32", "bf16")


def log(message: str) -> None:
    """A progress or note line on stderr (stdout of this tool is for results)."""
    print(message, file=sys.stderr)


def check_output(output: Path, force: bool, *, weights_file: bool = True) -> None:
    """Checked before any heavy work; :func:`pretrain.formats.write_atomically` checks again when it starts writing."""
    if output.exists() and not force:
        raise ConversionError(f"{output} exists; pass --force to replace it")
    if weights_file and output.suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        accepted = ", ".join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
        raise ConversionError(f"{output}: output suffix {output.suffix!r} not understood; accepted: {accepted}")


def describe_directory(path: Path) -> str:
    """What a directory handed to a file subcommand is, and which subcommand reads it."""
    if (path / "config.json").is_file():
        return "this is an HF model directory: use `import --from hf`"
    if is_tag_dir(path) or (path / "checkpoints").is_dir() or any(p.is_dir() and is_tag_dir(p) for p in path.iterdir()):
        return "this is a DeepSpeed checkpoint directory: use `consolidate` (or `universal`)"
    return "this directory holds no checkpoint this tool knows"


def load_ours(path: Path, *, trust_pickle: bool, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Load a file that must be in our layout (backbone or SimMIM); name the right subcommand otherwise."""
    if path.is_dir():
        raise ConversionError(f"{path}: {what} reads a weights file; {describe_directory(path)}")
    state_dict, meta, _ = load_weights_file(path, trust_pickle=trust_pickle)
    layout = detect_layout(state_dict)
    if layout not in ("ours", "simmim"):
        raise ConversionError(f"{path}: {what} needs our layout (backbone or SimMIM); {layout_hint(layout)}")
    return rename_legacy(state_dict), meta, layout
