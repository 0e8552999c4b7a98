"""``export``: ours -> a timm weights file, an HF model directory or the official layout, one function per target."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..formats import (
    ConversionError,
    ModelSpec,
    backbone_from_simmim,
    check_weights,
    hf_config,
    official_buffers,
    official_to_hf,
    official_to_timm,
    save_weights_file,
    strip_derived_buffers,
    write_atomically,
)
from .common import check_output, load_ours, log
from .sizes import encoder_part, recorded_spec, settle_spec

__all__ = ["EXPORT_TARGETS", "export"]

EXPORT_TARGETS = ("timm", "hf", "official")


@dataclass
class _Source:
    """Our weights as read and checked: the state dict (derived buffers dropped), its backbone part, the model."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    backbone: dict[str, torch.Tensor]
    spec: ModelSpec
    simmim: bool


def _to_timm(src: _Source, output: Path, dtype: str | None, force: bool) -> None:
    spec = src.spec
    if src.simmim:
        log("note: timm's SwinTransformerV2 has no SimMIM parts; exporting the encoder only")
    problems = []
    if spec.ape:
        problems.append("ape=True (timm's V2 has no absolute position embedding)")
    if spec.extra_norm_every:
        problems.append(f"extra_norm_every={spec.extra_norm_every}")
    if problems:
        raise ConversionError(f"cannot express this model in timm's SwinTransformerV2: {', '.join(problems)}")
    out_meta = {"kind": "timm", "model": spec.to_dict(), "source": str(src.path)}
    with write_atomically(output, force=force) as tmp:
        save_weights_file(tmp, official_to_timm(src.backbone), out_meta, dtype=dtype, pth_wrapper=None)


def _hf_architecture(src: _Source) -> str:
    if src.simmim:
        return "Swinv2ForMaskedImageModeling"
    return "Swinv2ForImageClassification" if src.spec.num_classes else "Swinv2Model"


def _to_hf(src: _Source, output: Path, dtype: str | None, force: bool) -> None:
    arch = _hf_architecture(src)
    config = hf_config(src.spec, arch)
    source = dict(src.backbone)
    if src.simmim:
        source["mask_token"] = src.state_dict["encoder.mask_token"]
        source.update({k: v for k, v in src.state_dict.items() if k.startswith("decoder.")})
    hf_state = official_to_hf(source, prefixed=arch != "Swinv2Model")
    if dtype is not None:
        stored = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    else:
        kinds = {v.dtype for v in hf_state.values() if v.is_floating_point()}
        stored = str(kinds.pop()).replace("torch.", "") if len(kinds) == 1 else None
    if stored is not None:
        # transformers >= 4.56 reads "dtype", older versions (this project accepts >= 4.45) "torch_dtype".
        config["dtype"] = config["torch_dtype"] = stored
    with write_atomically(output, force=force, directory=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_weights_file(tmp / "model.safetensors", hf_state, None, dtype=dtype)


def _to_official(src: _Source, output: Path, dtype: str | None, force: bool) -> None:
    spec = src.spec
    if spec.extra_norm_every:
        raise ConversionError(f"extra_norm_every={spec.extra_norm_every} has no counterpart in the official code")
    spec.require_sizes("export to the official layout (its state dict holds the derived buffers)")
    # Weights stay on the meta device (no memory); only the small derived buffers are built for real.
    model = spec.build("meta")
    model.reset_derived_buffers(device="cpu")
    prefix = "encoder." if src.simmim else ""
    full = dict(src.state_dict)
    # The official model keeps the derived buffers persistent: include them so its load_state_dict(strict=True)
    # accepts the file.
    full.update({prefix + k: v for k, v in official_buffers(model).items()})
    kind = "official-simmim" if src.simmim else "official"
    out_meta = {"kind": kind, "model": spec.to_dict(), "source": str(src.path)}
    with write_atomically(output, force=force) as tmp:
        save_weights_file(tmp, full, out_meta, dtype=dtype, pth_wrapper="model")


_TARGETS: dict[str, Callable[[_Source, Path, str | None, bool], None]] = {
    "timm": _to_timm,
    "hf": _to_hf,
    "official": _to_official,
}


def _read_source(
    path: Path, img_size: int | None, window_size: Sequence[int] | None, pretrained: Sequence[int] | None
) -> _Source:
    state_dict, meta, layout = load_ours(path, trust_pickle=False, what="export")
    simmim = layout == "simmim"
    # Before dropping the buffers: an official-layout input shows its sizes and pretrained windows in them.
    full = encoder_part(state_dict) if simmim else state_dict
    spec, origin = recorded_spec(full, meta)
    settle_spec(
        spec,
        img_size=img_size,
        window_size=window_size,
        pretrained=pretrained,
        buffers=full,
        origin=origin,
        where=str(path),
    )
    state_dict = strip_derived_buffers(state_dict)
    backbone = backbone_from_simmim(state_dict) if simmim else state_dict
    check_weights(state_dict, spec, f"{path}: weights do not match their recorded model", simmim=simmim)
    return _Source(path, state_dict, backbone, spec, simmim)


def export(
    target: str,
    path: str | Path,
    output: str | Path,
    *,
    img_size: int | None = None,
    window_size: Sequence[int] | None = None,
    pretrained_window_sizes: Sequence[int] | None = None,
    dtype: str | None = None,
    force: bool = False,
) -> Path:
    """Ours -> timm weights file, HF model directory (config.json + model.safetensors) or official .pth.

    Args:
        target: timm, hf or official.
        path: our weights file (backbone/classifier or SimMIM).
        output: file (timm, official) or directory (hf).
        img_size: override the recorded image size (HF config, official buffers).
        window_size: override the recorded window; a stage whose window changes keeps its position-bias
            normalisation (its old window becomes its pretrained window when none is recorded).
        pretrained_window_sizes: override the recorded pretrained windows, one or per stage.
        dtype: fp32/bf16 (default: keep).
        force: replace an existing output.
    """
    if target not in EXPORT_TARGETS:
        raise ConversionError(f"--to {target!r}; accepted: {', '.join(EXPORT_TARGETS)}")
    path, output = Path(path), Path(output)
    check_output(output, force, weights_file=target != "hf")
    source = _read_source(path, img_size, window_size, pretrained_window_sizes)
    _TARGETS[target](source, output, dtype, force)
    log(f"exported {path} -> {target} {output}")
    return output
