"""The sizes a conversion records: image size, windows and pretrained windows from the input, the flags, and the
buffers an official file stores (which are the truth when present)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from swinv2.geometry import effective_windows, per_stage

from ..formats import ConversionError, ModelSpec, coords_table_matches, infer_spec, pretrained_windows_from_tables
from .common import log

__all__ = ["apply_sizes", "encoder_part", "pretrained_flag", "recorded_spec", "settle_spec", "stage_values"]


def stage_values(values: Sequence[int] | None, stages: int, flag: str) -> list[int] | None:
    """A per-stage flag value: one number for every stage, or one per stage; None when not given."""
    if not values:
        return None
    try:
        return per_stage([int(v) for v in values], stages, flag)
    except ValueError:
        raise ConversionError(f"{flag} {list(values)}: give one value or one per stage ({stages} stages)") from None


def pretrained_flag(values: Sequence[int] | None, stages: int) -> list[int] | None:
    """--pretrained-window-sizes, expanded and checked (0 = the stage's own window, or a window of at least 2)."""
    out = stage_values(values, stages, "--pretrained-window-sizes")
    if out is not None and any(p < 0 or p == 1 for p in out):
        raise ConversionError(
            f"--pretrained-window-sizes {list(values or [])}: accepted per stage: 0 (the stage's own window) or a "
            f"window of at least 2"
        )
    return out


def apply_sizes(
    spec: ModelSpec, img_size: int | None, window_size: Sequence[int] | None, *, carry: bool = True
) -> ModelSpec:
    """Set new image/window sizes.

    With ``carry``, a stage whose effective window changes and that records no pretrained window gets the window
    it had: the position-bias MLP was trained on coordinates normalised by that one (spec §2.1), and recording 0
    would silently change the bias.
    """
    stages = len(spec.depths)
    before = None
    if spec.img_size is not None and spec.window_size is not None:
        before = effective_windows(spec.img_size, spec.window_size, spec.patch_size, stages)
    if img_size is not None:
        spec.img_size = int(img_size)
    windows = stage_values(window_size, stages, "--window-size")
    if windows is not None:
        spec.window_size = windows
    if carry and before is not None and spec.img_size is not None and spec.window_size is not None:
        after = effective_windows(spec.img_size, spec.window_size, spec.patch_size, stages)
        carried = [
            p or (b if b != a else 0) for p, b, a in zip(spec.pretrained_window_sizes, before, after, strict=True)
        ]
        if carried != spec.pretrained_window_sizes:
            log(
                f"note: windows per stage change from {before} to {after}; recording pretrained_window_sizes "
                f"{carried} so the position-bias MLP keeps the coordinates it was trained with"
            )
            spec.pretrained_window_sizes = carried
    return spec


def _has_tables(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith("attn.relative_coords_table") for k in state_dict)


def _check_flag_against_tables(
    state_dict: Mapping[str, torch.Tensor], spec: ModelSpec, flag: list[int], where: str
) -> None:
    """Refuse a --pretrained-window-sizes that does not rebuild the relative_coords_table buffers the file stores."""
    bad = []
    for i, depth in enumerate(spec.depths):
        for j in range(depth):
            key = f"layers.{i}.blocks.{j}.attn.relative_coords_table"
            if key in state_dict and not coords_table_matches(state_dict[key], flag[i], key):
                bad.append(i)
                break
    if bad:
        stored = pretrained_windows_from_tables(state_dict, list(spec.depths))
        raise ConversionError(
            f"{where}: --pretrained-window-sizes {flag} contradicts the relative_coords_table buffers stored in the "
            f"file, built with pretrained_window_sizes {stored} (0 = the stage's own window; windows per stage "
            f"{spec.window_size}); stages {bad} differ. Leave the flag out to use the stored value"
        )


def settle_spec(
    spec: ModelSpec,
    *,
    img_size: int | None,
    window_size: Sequence[int] | None,
    pretrained: Sequence[int] | None,
    buffers: Mapping[str, torch.Tensor],
    origin: str,
    where: str,
) -> ModelSpec:
    """Apply the size flags and --pretrained-window-sizes to what the input records.

    The pretrained windows only change the position-bias MLP's coordinate normaliser. Buffers stored in official
    files are the truth: a flag that rebuilds other tables is refused. Metadata and HF configs may be wrong (imports
    used to record zeros), so the flag replaces them, with a note.

    Args:
        spec: what the input records (modified in place).
        img_size, window_size: new sizes (None: keep).
        pretrained: the --pretrained-window-sizes flag (None: keep); either is carried across a window change.
        buffers: the unprefixed backbone state dict before derived buffers are dropped.
        origin: what recorded ``spec.pretrained_window_sizes`` ("its metadata", "config.json"), "" for nothing.
        where: the input, for messages.
    """
    flag = pretrained_flag(pretrained, len(spec.depths))
    if flag is not None:
        if _has_tables(buffers):
            _check_flag_against_tables(buffers, spec, flag, where)
        elif origin and flag != spec.pretrained_window_sizes:
            log(
                f"note: {where}: {origin} records pretrained_window_sizes {spec.pretrained_window_sizes}; "
                f"--pretrained-window-sizes {flag} replaces it"
            )
        # The flag describes the weights as they are (the tables checked it against their windows), so a window
        # change carries it like a recorded value: a 0 becomes the stage's old window.
        spec.pretrained_window_sizes = flag
    apply_sizes(spec, img_size, window_size)
    if flag is None and not origin and not _has_tables(buffers):
        log(
            f"note: {where} does not record pretrained_window_sizes; recording {spec.pretrained_window_sizes}. Pass "
            f"--pretrained-window-sizes if the weights were fine-tuned from another window (e.g. 12 12 12 6 for "
            f"the 192/w12 -> 256/w16 releases)"
        )
    return spec


def recorded_spec(backbone_full: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> tuple[ModelSpec, str]:
    """The model an input records: its metadata (our files), else what tensor shapes and official buffers show.

    Returns:
        (spec, what recorded its pretrained windows: "its metadata" or "" when only the buffers, if any, do).
    """
    inferred = infer_spec(backbone_full)
    if meta.get("model"):
        spec = ModelSpec.from_dict(meta["model"])
        spec.num_classes = inferred.num_classes
        return spec, "its metadata"
    return inferred, ""


def encoder_part(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder of a SimMIM state dict, unprefixed, buffers kept (they show the sizes), mask token dropped."""
    out = {k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    out.pop("mask_token", None)
    return out
