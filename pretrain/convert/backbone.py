"""``backbone``: a SimMIM checkpoint (ours or official) -> backbone weights for fine-tuning (spec §3.8)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from swinv2.geometry import effective_windows

from ..formats import (
    ConversionError,
    ModelSpec,
    backbone_from_simmim,
    check_weights,
    save_weights_file,
    write_atomically,
)
from .common import check_output, load_ours, log
from .sizes import apply_sizes, encoder_part, pretrained_flag, recorded_spec

__all__ = ["make_backbone"]


def _pretrained_windows(
    path: Path, pre: ModelSpec, spec: ModelSpec, flag: list[int] | None, trained_for: list[int] | None
) -> list[int]:
    """The pretrained windows to record: what pretraining normalised by, or the flag when it agrees with that."""
    stages = len(pre.depths)
    if flag is None:
        if trained_for is None:
            missing = " and ".join(n for n in ("img_size", "window_size") if getattr(pre, n) is None)
            raise ConversionError(
                f"{path}: finding the windows each stage ran with in pretraining needs the pretraining {missing}, "
                f"which the file does not record; pass --pretrain-img-size and --pretrain-window-size, or "
                f"--pretrained-window-sizes"
            )
        return trained_for
    if trained_for is not None:
        # 0 stands for the stage's new window: equivalent when that is the window pretraining normalised by.
        new = (
            effective_windows(spec.img_size, spec.window_size, spec.patch_size, stages)
            if spec.img_size is not None and spec.window_size is not None
            else [0] * stages
        )
        differ = [i for i in range(stages) if (flag[i] or new[i]) != trained_for[i]]
        if differ:
            raise ConversionError(
                f"{path}: --pretrained-window-sizes {flag} contradicts the file: pretraining ran at img_size "
                f"{pre.img_size} with windows {pre.window_size} (pretrained_window_sizes "
                f"{pre.pretrained_window_sizes}), so the position-bias MLP was trained for windows {trained_for}; "
                f"stages {differ} differ. Leave the flag out to record {trained_for}"
            )
    return flag


def make_backbone(
    path: str | Path,
    output: str | Path,
    *,
    img_size: int | None = None,
    window_size: Sequence[int] | None = None,
    pretrain_img_size: int | None = None,
    pretrain_window_size: Sequence[int] | None = None,
    pretrained_window_sizes: Sequence[int] | None = None,
    dtype: str | None = None,
    force: bool = False,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """SimMIM checkpoint (ours or official) -> backbone weights for fine-tuning (spec §3.8), loadable strictly.

    Args:
        path: SimMIM weights (our consolidated file or an official SimMIM .pth).
        output: weights file to write.
        img_size: fine-tuning image size (default: the pretraining one).
        window_size: fine-tuning window, one or per stage (default: the pretraining one).
        pretrain_img_size: pretraining image size when the file does not record it.
        pretrain_window_size: pretraining window when the file does not record it.
        pretrained_window_sizes: the value to record, one or per stage; by default the windows each stage ran with
            in pretraining. It stands in for unknown pretraining sizes; one that contradicts them is refused.
        dtype: fp32/bf16 (default: keep).
        force: replace an existing output.
        trust_pickle: allow Python objects in a pickled input.

    Returns:
        The metadata written, whose ``model.pretrained_window_sizes`` is the per-stage window of pretraining.
    """
    path, output = Path(path), Path(output)
    check_output(output, force)
    state_dict, meta, layout = load_ours(path, trust_pickle=trust_pickle, what="backbone")
    if layout != "simmim":
        raise ConversionError(
            f"{path}: already a backbone/classifier (no encoder./decoder. keys); backbone expects a SimMIM checkpoint"
        )
    # Infer from the unstripped encoder so official buffers can reveal the pretraining windows and image size.
    pre, _ = recorded_spec(encoder_part(state_dict), meta)
    apply_sizes(pre, pretrain_img_size, pretrain_window_size, carry=False)
    stages = len(pre.depths)
    trained_for = None  # per stage, the window that normalised the MLP's coordinates in pretraining
    if pre.img_size is not None and pre.window_size is not None:
        ran = effective_windows(pre.img_size, pre.window_size, pre.patch_size, stages)
        # A stage of a pretraining that itself started from another window keeps that window's normalisation.
        trained_for = [p or r for p, r in zip(pre.pretrained_window_sizes, ran, strict=True)]
    flag = pretrained_flag(pretrained_window_sizes, stages)
    spec = ModelSpec.from_dict(pre.to_dict())
    spec.num_classes = 0
    apply_sizes(spec, img_size, window_size, carry=False)
    pretrained = _pretrained_windows(path, pre, spec, flag, trained_for)
    spec.pretrained_window_sizes = pretrained
    backbone = backbone_from_simmim(state_dict)
    check_weights(backbone, spec, f"{path}: backbone weights do not fit the model")
    out_meta = {
        "kind": "backbone",
        "model": spec.to_dict(),
        "pretrain": {"img_size": pre.img_size, "window_size": pre.window_size},
        "step": meta.get("step"),
        "source": str(path),
        "dtype": dtype,
    }
    with write_atomically(output, force=force) as tmp:
        save_weights_file(tmp, backbone, out_meta, dtype=dtype)
    log(f"backbone of {path}: {len(backbone)} tensors, pretrained_window_sizes={pretrained} -> {output}")
    return out_meta
