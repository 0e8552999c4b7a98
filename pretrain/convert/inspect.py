"""``inspect``: what a checkpoint file or directory holds (headers only for safetensors, memory-mapped pickles)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError, is_complete, is_tag_dir, is_universal, read_client_state
from ..formats import META_KEY, SAFETENSORS_SUFFIXES, ConversionError, detect_layout, layout_hint, load_weights_file
from .common import describe_directory

__all__ = ["inspect_path"]


def _tensor_summary(shapes: Mapping[str, tuple[tuple[int, ...], str]]) -> list[str]:
    total = sum(math.prod(s) for s, _ in shapes.values())
    dtypes: dict[str, int] = {}
    for _, dt in shapes.values():
        dtypes[dt] = dtypes.get(dt, 0) + 1
    groups: dict[str, int] = {}
    for key in shapes:
        head = key.split(".")[0] if not key.startswith(("encoder.", "swinv2.")) else ".".join(key.split(".")[:2])
        groups[head] = groups.get(head, 0) + 1
    layout = detect_layout(list(shapes))
    return [
        f"layout: {layout} ({layout_hint(layout)})",
        f"tensors: {len(shapes)}  elements: {total:,}  dtypes: {dtypes}",
        "key groups: " + ", ".join(f"{k} ({n})" for k, n in sorted(groups.items())),
    ]


def _tag_order(path: Path) -> tuple[int, str]:
    digits = "".join(ch for ch in path.name.split("-")[-1] if ch.isdigit())
    return (int(digits) if digits else -1, path.name)


def _hf_directory(path: Path) -> list[str]:
    config = json.loads((path / "config.json").read_text())
    lines = [f"format: HF model directory, {config.get('architectures')} model_type={config.get('model_type')}"]
    for key in ("image_size", "window_size", "pretrained_window_sizes", "embed_dim", "depths", "num_heads"):
        lines.append(f"  {key}: {config.get(key)}")
    weights = path / "model.safetensors"
    if weights.is_file():
        lines += ["  " + line for line in inspect_path(weights)[1:]]
    return lines


def _deepspeed_directory(path: Path) -> list[str]:
    if is_tag_dir(path):
        tag_dirs = [path]
    else:
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        tag_dirs = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and is_tag_dir(p)), key=_tag_order)
    if not tag_dirs:
        raise ConversionError(f"{path}: {describe_directory(path)}")
    lines = ["format: DeepSpeed checkpoint directory"]
    for tag_dir in tag_dirs:
        files = sorted(p.name for p in tag_dir.iterdir())
        size = sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file())
        try:
            state, unreadable = read_client_state(tag_dir), ""
        except CheckpointError as err:  # a save cut short, or a damaged file: listed, not fatal
            state, unreadable = {}, f"; UNREADABLE: {err}"
        complete = "complete" if is_complete(tag_dir) else "INCOMPLETE (no COMPLETE marker)"
        universal = " universal" if is_universal(tag_dir) else ""
        lines.append(
            f"  {tag_dir.name}: {complete}{universal}; step={state.get('step')} "
            f"world_size={state.get('world_size')} zero_stage={state.get('zero_stage')} "
            f"size={size / 2**20:.1f} MiB files={len(files)}{unreadable}"
        )
    return lines


def _metadata_lines(meta: Mapping[str, Any]) -> list[str]:
    if not meta:
        return ["metadata: none (not written by this tool)"]
    model = meta.get("model", {})
    lines = [f"kind: {meta.get('kind')}  step: {meta.get('step')}  dtype: {meta.get('dtype')}"]
    keys = ("embed_dim", "depths", "num_heads", "img_size", "window_size", "pretrained_window_sizes")
    lines.append("model: " + " ".join(f"{k}={model.get(k)}" for k in keys))
    if meta.get("source"):
        lines.append(f"source: {meta['source']}")
    return lines


def _weights_file(path: Path, trust_pickle: bool) -> list[str]:
    lines = [f"size: {path.stat().st_size / 2**20:.2f} MiB"]
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                names = list(handle.keys())  # safe_open has keys() but no __iter__
                shapes = {k: (tuple(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype()) for k in names}
        except Exception:  # a damaged file: the full reader names what is wrong
            load_weights_file(path)
            raise
        meta = json.loads(header[META_KEY]) if META_KEY in header else {}
        lines.append("format: safetensors (header read only)")
    else:
        state_dict, meta, extra = load_weights_file(path, trust_pickle=trust_pickle)
        shapes = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state_dict.items()}
        lines.append("format: torch pickle (memory-mapped)" + (f"; other entries: {sorted(extra)}" if extra else ""))
    return lines + _tensor_summary(shapes) + _metadata_lines(meta)


def inspect_path(path: str | Path, *, trust_pickle: bool = False) -> list[str]:
    """Describe a checkpoint file or directory (headers only for safetensors; mmap for pickles).

    Args:
        path: weights file, HF model directory, or DeepSpeed tag/checkpoints/run directory.
        trust_pickle: allow Python objects in a pickled file (official training checkpoints).

    Returns:
        The lines printed by ``inspect``.
    """
    path = Path(path)
    lines = [f"path: {path}"]
    if path.is_dir():
        if (path / "config.json").is_file():
            return lines + _hf_directory(path)
        return lines + _deepspeed_directory(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file or directory")
    return lines + _weights_file(path, trust_pickle)
