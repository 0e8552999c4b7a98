"""``consolidate``: a DeepSpeed checkpoint (any ZeRO stage, any world size) -> one weights file with metadata."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    CheckpointError,
    find_damage,
    has_zero_shards,
    model_states_file,
    read_client_state,
    read_marker,
    reading,
    resolve_checkpoint,
)
from ..formats import (
    ConversionError,
    backbone_from_simmim,
    check_weights,
    detect_layout,
    infer_spec,
    layout_hint,
    save_weights_file,
    spec_from_config,
    strip_derived_buffers,
    write_atomically,
)
from .common import DTYPES, check_output, log
from .masters import name_master_weights

__all__ = ["consolidate", "consolidated_state_dict", "name_master_weights", "whole_checkpoint"]


def _low_precision_masters(path: Path, obj: Mapping[str, Any], low: set[torch.dtype]) -> dict[str, torch.Tensor]:
    """The fp32 masters of a stage-0 fp16/bf16 optimizer, named (see :func:`name_master_weights`)."""
    module = obj["module"]
    optimizer = obj.get("optimizer") or {}
    if "fp32_groups_flat" in optimizer:
        # FP16_Optimizer (DeepSpeed's or apex's FusedAdam) keeps one flat fp32 buffer per group and no shapes.
        raise ConversionError(
            f"{path}: the fp32 master weights were saved flattened per param group (fp32_groups_flat, from a fused "
            f"Adam), without the shapes needed to split them; this tool cannot recover fp32 weights from it. Use "
            f"--dtype bf16 for the training-precision weights, or train with ZeRO stage 1-3 or torch's AdamW"
        )
    if "fp32_groups" not in optimizer:
        found = sorted(optimizer) if isinstance(optimizer, Mapping) else type(optimizer).__name__
        raise ConversionError(
            f"{path}: the module weights are {', '.join(sorted(str(d).replace('torch.', '') for d in low))} and "
            f"the optimizer state holds no fp32 master copy DeepSpeed's stage-0 optimizer would write "
            f"(fp32_groups; found: {found}); the fp32 weights cannot be recovered. Use --dtype bf16 for the "
            f"training-precision weights"
        )
    buffers = set(obj.get("buffer_names") or [])
    return name_master_weights(module, optimizer["fp32_groups"], buffers, where=str(path))


def _stage0_state_dict(tag_dir: Path, target: torch.dtype) -> dict[str, torch.Tensor]:
    """Stage 0 (no ZeRO shards): the model-states file holds the whole module, in the training precision.

    Under bf16/fp16 the module holds the low-precision copies; the fp32 master weights live in the optimizer state
    (DeepSpeed's FP16_UnfusedOptimizer: ``optimizer["fp32_groups"]``, one list of tensors per param group). The
    module copies are exactly the masters rounded, so they serve as they are for a bf16 output from bf16 training.
    """
    path = model_states_file(tag_dir)
    # DeepSpeed's own file: it pickles its config objects, so weights_only cannot be used.
    obj = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    module = obj["module"]
    low = {v.dtype for v in module.values() if v.is_floating_point() and v.dtype != torch.float32}
    if not low or low == {target}:
        return {k: v.to(target) if v.is_floating_point() else v for k, v in module.items()}
    masters = _low_precision_masters(path, obj, low)
    return {k: masters.get(k, v).to(target) if v.is_floating_point() else v for k, v in module.items()}


def _zero_state_dict(tag_dir: Path, target: torch.dtype) -> dict[str, torch.Tensor]:
    """ZeRO stages 1-3 (and the bf16 optimizer's shards): DeepSpeed's own zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # lazy_mode memory-maps the optimizer shards and gathers one parameter at a time, so peak memory is about the
    # output itself instead of every rank's full optimizer state. DeepSpeed prints progress on stdout: keep it off
    # ours (stdout of this tool is for results).
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name, lazy_mode=True)
        except (ValueError, FileNotFoundError) as err:
            # e.g. a rank's optimizer shard is missing: DeepSpeed's own message says which and how many.
            raise ConversionError(f"{tag_dir}: DeepSpeed cannot consolidate it: {err}") from err
        out = {}
        for key, value in lazy.items():
            tensor = value.contiguous() if not isinstance(value, torch.Tensor) else value
            tensor = tensor.to(target) if tensor.is_floating_point() else tensor
            if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
                # A view of DeepSpeed's padded merge buffer: keep only the parameter now, or every buffer stays
                # alive until saving copies it (one more model copy at the peak).
                tensor = tensor.clone()
            out[key] = tensor
    return out


def consolidated_state_dict(tag_dir: Path, dtype: str) -> dict[str, torch.Tensor]:
    """The whole model's weights of the DeepSpeed checkpoint ``tag_dir`` in ``dtype`` ("fp32" or "bf16"), in memory:
    fp32 masters where the optimizer keeps them, gathered from every rank's partition under ZeRO."""
    target = torch.float32 if dtype == "fp32" else torch.bfloat16
    # The marker's stage decides, not the files present: a ZeRO-1/2 checkpoint that lost its optimizer shards must
    # not pass for stage 0 (find_damage has refused it before this point).
    if int(read_marker(tag_dir)["zero_stage"]) >= 1 or has_zero_shards(tag_dir):
        return _zero_state_dict(tag_dir, target)
    return _stage0_state_dict(tag_dir, target)


def whole_checkpoint(path: str | Path, tag: str | None) -> Path:
    """The complete, undamaged tag directory ``path``/``tag`` names (ConversionError otherwise)."""
    try:
        tag_dir = resolve_checkpoint(path, tag)
        damage = find_damage(tag_dir)
    except CheckpointError as err:
        raise ConversionError(str(err)) from None
    if damage is not None:
        raise ConversionError(f"{tag_dir}: DeepSpeed cannot consolidate it: the checkpoint is damaged: {damage}")
    return tag_dir


def consolidate(
    path: str | Path, output: str | Path, *, tag: str | None = None, dtype: str = "fp32", force: bool = False
) -> dict[str, Any]:
    """DeepSpeed checkpoint (any stage, any world size) -> one weights file with metadata.

    Args:
        path: tag, checkpoints or run directory (see :func:`pretrain.checkpoint.resolve_checkpoint`).
        output: .safetensors (default format) or .pth/.pt file.
        tag: checkpoint tag; None = newest complete.
        dtype: fp32 or bf16.
        force: replace an existing output.

    Returns:
        The metadata written with the weights.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    output = Path(output)
    check_output(output, force)
    tag_dir = whole_checkpoint(path, tag)
    with reading(tag_dir, "consolidating it"):
        client = read_client_state(tag_dir)
        state_dict = strip_derived_buffers(consolidated_state_dict(tag_dir, dtype))
    config = client.get("config") or {}
    layout = detect_layout(state_dict)
    if layout not in ("simmim", "ours"):
        raise ConversionError(f"{tag_dir}: consolidated weights are not a SwinV2/SimMIM model ({layout_hint(layout)})")
    backbone = backbone_from_simmim(state_dict) if layout == "simmim" else state_dict
    spec = spec_from_config(config, backbone) if config else infer_spec(backbone)
    check_weights(state_dict, spec, f"{tag_dir}: weights do not match the configured model", simmim=layout == "simmim")
    meta = {
        "kind": "simmim" if layout == "simmim" else "backbone",
        "model_size": (config.get("model") or {}).get("size"),
        "model": spec.to_dict(),
        "step": client.get("step"),
        "world_size": client.get("world_size"),
        "zero_stage": client.get("zero_stage"),
        "source": str(tag_dir),
        "dtype": dtype,
        "config": config,
    }
    with write_atomically(output, force=force) as tmp:
        save_weights_file(tmp, state_dict, meta)
    log(f"consolidated {tag_dir} (step {meta['step']}, {len(state_dict)} tensors, {dtype}) -> {output}")
    return meta
