"""Pretrained weights for fine-tuning and evaluation, from any place this project reads them.

- a DeepSpeed checkpoint (tag, ``checkpoints/`` or run folder) of pretraining or fine-tuning, any ZeRO stage and world
  size: consolidated in memory with :mod:`pretrain.convert.consolidate`'s code;
- a weights file in our layout (a consolidated SimMIM or backbone file, an exported classifier, an official release);
- a timm state dict (keys shifted to ours) or an HF model directory (``config.json`` beside the weights).

Every source becomes one state dict in our (official) layout without derived buffers; :func:`load_strictly` then
loads it so that every backbone key is used and only a new head is left at its initialisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swinv2.geometry import effective_windows

from ..backbone import ModelConfig
from ..checkpoint import CheckpointError, read_client_state
from ..checks import ConfigError
from ..formats import (
    ConversionError,
    backbone_from_simmim,
    detect_layout,
    hf_to_official,
    layout_hint,
    load_weights_file,
    rename_legacy,
    spec_from_hf_config,
    strip_derived_buffers,
    timm_to_official,
)

__all__ = ["Pretrained", "check_pretrained_windows", "load_strictly", "read_weights"]

# The geometry keys a source may record (what the position-bias MLP was trained for).
_GEOMETRY = ("img_size", "window_size", "patch_size", "pretrained_window_sizes")


@dataclass
class Pretrained:
    """Weights in our layout (derived buffers dropped), where they came from, and the geometry they record (None
    where the source records none, e.g. a timm state dict)."""

    weights: dict[str, torch.Tensor]
    source: str
    geometry: dict[str, Any] | None = None
    kind: str = "backbone"  # backbone, simmim (its encoder is kept) or classifier (head.* present)


def _geometry(model: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not model or model.get("img_size") is None or model.get("window_size") is None:
        return None
    return {k: model.get(k) for k in _GEOMETRY}


def _from_deepspeed(path: Path, tag: str | None) -> Pretrained:
    # The conversion tool's own consolidation, called as a library (it has no in-memory public entry point yet).
    from ..convert.consolidate import consolidated_state_dict, whole_checkpoint

    tag_dir = whole_checkpoint(path, tag)
    try:
        client = read_client_state(tag_dir)
    except CheckpointError as exc:
        raise ConversionError(str(exc)) from None
    state = strip_derived_buffers(consolidated_state_dict(tag_dir, "fp32"))
    model_cfg = dict((client.get("config") or {}).get("model") or {})
    return _by_layout(state, f"{tag_dir} (step {client.get('step')})", _geometry(model_cfg))


def _from_hf(path: Path) -> Pretrained:
    from ..convert.imports import read_hf_directory

    state, config = read_hf_directory(path)
    converted = hf_to_official(state)
    masked_image_modeling = any(k.startswith("decoder.") for k in converted)  # Swinv2ForMaskedImageModeling
    if masked_image_modeling:  # its encoder is the backbone; the decoder and the mask token stay behind
        converted = {k: v for k, v in converted.items() if not k.startswith("decoder.") and k != "mask_token"}
    spec = spec_from_hf_config(config)
    pretrained = _by_layout(converted, f"{path} (HF)", _geometry(spec.to_dict()))
    if masked_image_modeling:
        pretrained.kind = "simmim"
    return pretrained


def _by_layout(state: dict[str, torch.Tensor], source: str, geometry: dict[str, Any] | None) -> Pretrained:
    layout = detect_layout(state)
    if layout == "simmim":
        return Pretrained(backbone_from_simmim(state), source, geometry, "simmim")
    if layout == "timm":
        state = timm_to_official(state)
    elif layout != "ours":
        raise ConversionError(f"{source}: not SwinV2 weights fine-tuning can start from; {layout_hint(layout)}")
    state = strip_derived_buffers(rename_legacy(state))
    kind = "classifier" if any(k.startswith("head.") for k in state) else "backbone"
    return Pretrained(state, source, geometry, kind)


def read_weights(path: str | Path, fmt: str = "auto", tag: str | None = None, trust_pickle: bool = False) -> Pretrained:
    """Read SwinV2 weights from any supported source into our layout.

    Args:
        path: DeepSpeed checkpoint folder, weights file, or HF model directory.
        fmt: auto, deepspeed, ours, official, timm or hf (see ``finetune.init_format``); a named format that does not
            match what ``path`` holds is refused.
        tag: the DeepSpeed tag when ``path`` is a checkpoints or run folder (None = newest complete).
        trust_pickle: allow Python objects in a pickled file (official training checkpoints).

    Raises:
        ConversionError: a missing, damaged or foreign input, naming it and what reads it.
    """
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    if path.is_dir():
        found = "hf" if (path / "config.json").is_file() else "deepspeed"
        if fmt not in ("auto", found):
            raise ConversionError(f"{path}: init_format={fmt!r}, but this directory holds a {found} checkpoint")
        return _from_hf(path) if found == "hf" else _from_deepspeed(path, tag)
    if fmt in ("deepspeed", "hf"):
        raise ConversionError(f"{path}: init_format={fmt!r} reads a directory, not a file")
    state, meta, _ = load_weights_file(path, trust_pickle=trust_pickle)
    layout = detect_layout(state)
    wanted = {"ours": ("ours", "simmim"), "official": ("ours", "simmim"), "timm": ("timm",)}.get(fmt)
    if wanted is not None and layout not in wanted:
        raise ConversionError(f"{path}: init_format={fmt!r}, but {layout_hint(layout)}")
    return _by_layout(dict(state), str(path), _geometry(meta.get("model")))


def check_pretrained_windows(model: ModelConfig, pretrained: Pretrained) -> str:
    """Refuse a ``model.pretrained_window_sizes`` that normalises the position-bias MLP's inputs differently from
    pretraining (spec §2.1): it would load strictly and quietly start from a distorted position bias.

    Returns:
        A sentence for the log: what was compared, or why nothing could be.

    Raises:
        ConfigError: naming the value to set.
    """
    geo = pretrained.geometry
    if geo is None:
        return (
            f"{pretrained.source} records no pretraining image/window size: model.pretrained_window_sizes="
            f"{list(model.pretrained_window_sizes)} is taken as given"
        )
    depths = list(model.resolved("depths"))
    stages = len(depths)
    ran = effective_windows(int(geo["img_size"]), geo["window_size"], int(geo.get("patch_size") or 4), stages)
    before = list(geo.get("pretrained_window_sizes") or [0] * stages)
    before = before if len(before) == stages else [0] * stages
    trained_for = [p or r for p, r in zip(before, ran, strict=True)]
    new = effective_windows(model.img_size, model.window_size, model.patch_size, stages)
    ours = [p or w for p, w in zip(model.pretrained_window_sizes, new, strict=True)]
    if ours != trained_for:
        raise ConfigError(
            f"model.pretrained_window_sizes={list(model.pretrained_window_sizes)}: {pretrained.source} was pretrained "
            f"at img_size {geo['img_size']} with window {geo['window_size']}, so its position-bias MLP was trained for "
            f"windows {trained_for}, but this model (img_size {model.img_size}, window {model.window_size}) would "
            f"normalise by {ours}; accepted: model.pretrained_window_sizes={trained_for}"
        )
    return f"pretrained windows {trained_for} of {pretrained.source} match model.pretrained_window_sizes"


def _target_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Persistent state of ``model`` by name, with full shapes (also for ZeRO-3 partitioned parameters)."""
    shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}
    for name, buffer in model.state_dict(keep_vars=True).items():
        if name not in shapes:
            shapes[name] = tuple(buffer.shape)
    return shapes


def load_strictly(model: nn.Module, weights: Mapping[str, torch.Tensor], *, new_head: bool, source: str) -> int:
    """Load ``weights`` into ``model``: every key of ``weights`` must be used and every key of ``model`` filled, except
    the head when ``new_head`` (its keys in ``weights``, e.g. an ImageNet classifier's, are then dropped).

    Works under ZeRO-3 (parameters gathered for the copy, rank 0's values kept). Returns the number of tensors loaded.

    Raises:
        ConversionError: naming missing, unexpected and mismatched keys.
    """
    weights = {k: v for k, v in weights.items() if not (new_head and k.startswith("head."))}
    target = _target_shapes(model)
    missing = sorted(k for k in target if k not in weights and not (new_head and k.startswith("head.")))
    unexpected = sorted(k for k in weights if k not in target)
    mismatched = sorted(k for k in weights if k in target and tuple(weights[k].shape) != target[k])
    if missing or unexpected or mismatched:
        parts = [
            f"{what} {len(keys)}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if keys
        ]
        shapes = "; ".join(f"{k} {tuple(weights[k].shape)} vs model {target[k]}" for k in mismatched[:3])
        raise ConversionError(
            f"{source}: the weights do not fit this model ({'; '.join(parts)}){'; ' + shapes if shapes else ''}. "
            f"Check model.size / embed_dim / depths / num_heads / extra_norm_every against the pretrained model"
        )
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    gathered: Any = contextlib.nullcontext()
    if params:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    with gathered, torch.no_grad():
        result = model.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return len(weights)
