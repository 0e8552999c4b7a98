"""``import``: official Microsoft, timm or HF weights -> ours, one function per source format."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..formats import (
    ConversionError,
    ModelSpec,
    backbone_from_simmim,
    check_weights,
    detect_layout,
    hf_to_official,
    infer_spec,
    layout_hint,
    load_weights_file,
    rename_legacy,
    save_weights_file,
    spec_from_hf_config,
    strip_derived_buffers,
    timm_to_official,
    write_atomically,
)
from .common import check_output, describe_directory, log
from .sizes import encoder_part, settle_spec

__all__ = ["IMPORT_SOURCES", "import_weights", "read_hf_directory"]

IMPORT_SOURCES = ("official", "timm", "hf")


@dataclass
class _Imported:
    """What a source gives: weights in our layout, whether they are SimMIM's, the model they record, and what
    recorded its pretrained windows (for :func:`settle_spec`)."""

    weights: dict[str, torch.Tensor]
    simmim: bool
    spec: ModelSpec
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # official files: unprefixed, buffers kept
    origin: str = ""


def _from_official(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> _Imported:
    # Official files carry the derived buffers: read sizes and pretrained windows from them before dropping them.
    state_dict = rename_legacy(state_dict)
    simmim = detect_layout(state_dict) == "simmim"
    full = encoder_part(state_dict) if simmim else dict(state_dict)
    return _Imported(strip_derived_buffers(state_dict), simmim, infer_spec(full), buffers=full)


def _from_timm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> _Imported:
    converted = timm_to_official(state_dict)
    return _Imported(converted, False, infer_spec(converted))


def _from_hf(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> _Imported:
    converted = hf_to_official(state_dict)
    simmim = any(k.startswith("decoder.") for k in converted)
    if simmim:
        converted = {(k if k.startswith("decoder.") else "encoder." + k): v for k, v in converted.items()}
    backbone_part = backbone_from_simmim(converted) if simmim else converted
    spec = spec_from_hf_config(config, num_classes=infer_spec(backbone_part).num_classes)
    return _Imported(converted, simmim, spec, origin="config.json")


# source -> (the layouts its files are in, the reader)
_SOURCES: dict[str, tuple[tuple[str, ...], Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], _Imported]]] = {
    "official": (("ours", "simmim"), _from_official),
    "timm": (("timm",), _from_timm),
    "hf": (("hf",), _from_hf),
}


def read_hf_directory(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(HF state dict, config.json) of an HF transformers Swinv2 model directory (``save_pretrained`` output)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{path}: no config.json; an HF model directory (save_pretrained output) is expected")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "swinv2":
        raise ConversionError(f"{path}: model_type {config.get('model_type')!r}; accepted: 'swinv2'")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            state_dict, _, _ = load_weights_file(path / name)
            return state_dict, config
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            # Sharded save_pretrained output: the index maps every key to its shard file.
            shards = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
            state_dict = {}
            for shard in shards:
                state_dict.update(load_weights_file(path / shard)[0])
            return state_dict, config
    raise ConversionError(f"{path}: no model.safetensors, pytorch_model.bin or a sharded index next to config.json")


def _read_input(source: str, path: Path, trust_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, HF config or {}) of the input, which must be a directory for hf and a file otherwise."""
    if path.is_dir():
        if source != "hf":
            raise ConversionError(f"{path}: --from {source} reads a weights file; {describe_directory(path)}")
        return read_hf_directory(path)
    if source == "hf":
        raise ConversionError(f"{path}: --from hf reads an HF model directory (with config.json), not a file")
    state_dict, _, _ = load_weights_file(path, trust_pickle=trust_pickle)
    return state_dict, {}


def import_weights(
    source: str,
    path: str | Path,
    output: str | Path,
    *,
    img_size: int | None = None,
    window_size: Sequence[int] | None = None,
    pretrained_window_sizes: Sequence[int] | None = None,
    dtype: str | None = None,
    force: bool = False,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Official / timm / HF weights -> ours (backbone/classifier layout, or SimMIM layout for SimMIM inputs).

    Args:
        source: official, timm or hf.
        path: a weights file (official, timm) or an HF model directory (hf).
        output: weights file to write.
        img_size: image size to record (official files with buffers and HF configs record their own).
        window_size: window to record, one or per stage.
        pretrained_window_sizes: pretrained windows to record, one or per stage (official files with
            relative_coords_table buffers and HF configs record their own; a value contradicting the buffers is
            refused).
        dtype: fp32/bf16 (default: keep).
        force: replace an existing output.
        trust_pickle: allow Python objects in a pickled input (official training checkpoints).
    """
    if source not in IMPORT_SOURCES:
        raise ConversionError(f"--from {source!r}; accepted: {', '.join(IMPORT_SOURCES)}")
    path, output = Path(path), Path(output)
    check_output(output, force)
    state_dict, config = _read_input(source, path, trust_pickle)
    layouts, reader = _SOURCES[source]
    layout = detect_layout(state_dict)
    if layout not in layouts:
        raise ConversionError(f"{path}: --from {source} given, but {layout_hint(layout)}")
    got = reader(state_dict, config)
    spec = settle_spec(
        got.spec,
        img_size=img_size,
        window_size=window_size,
        pretrained=pretrained_window_sizes,
        buffers=got.buffers,
        origin=got.origin,
        where=str(path),
    )
    check_weights(got.weights, spec, f"{path}: imported weights do not fit our SwinV2", simmim=got.simmim)
    if spec.img_size is None or spec.window_size is None:
        log(f"note: {path} does not record img_size/window_size; pass --img-size/--window-size to store them")
    meta = {"kind": "simmim" if got.simmim else "backbone", "model": spec.to_dict(), "source": f"{source}:{path}"}
    with write_atomically(output, force=force) as tmp:
        save_weights_file(tmp, got.weights, meta, dtype=dtype)
    log(f"imported {source} {path} ({len(got.weights)} tensors) -> {output}")
    return meta
