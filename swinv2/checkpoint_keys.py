"""State-dict key mappings between the official Microsoft SwinV2 layout (= ours) and timm's.

Official/ours: the patch merging sits at the END of stages 0..2 (``layers.N.downsample``) and the classifier is
``head``; timm puts it at the START of the next stage (``layers.N+1.downsample``) and names the classifier
``head.fc``. Derived buffers (relative_coords_table, relative_position_index, attn_mask, and timm's k_bias) are
rebuilt by every implementation and never need to travel between them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

__all__ = ["DERIVED_BUFFER_KEYWORDS", "official_to_timm", "strip_derived_buffers", "timm_to_official"]

DERIVED_BUFFER_KEYWORDS = ("relative_coords_table", "relative_position_index", "attn_mask")
_DOWNSAMPLE = re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.(?P<n>\d+)\.downsample\.")


def strip_derived_buffers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the derived buffers (any key containing one of ``DERIVED_BUFFER_KEYWORDS``) and timm's ``k_bias``.

    Works on prefixed keys too (``encoder.layers.0.blocks.1.attn_mask``).
    """
    return {
        k: v
        for k, v in state_dict.items()
        if not any(word in k for word in DERIVED_BUFFER_KEYWORDS) and not k.endswith("attn.k_bias")
    }


def _shift_downsample(key: str, offset: int) -> str:
    match = _DOWNSAMPLE.match(key)
    if not match:
        return key
    n = int(match.group("n")) + offset
    return f"{match.group('prefix')}layers.{n}.downsample.{key[match.end() :]}"


def official_to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official/ours -> timm: ``layers.N.downsample`` -> ``layers.N+1.downsample``, ``head.`` -> ``head.fc.``.

    Derived buffers are dropped (timm rebuilds its own).
    """
    out = {}
    for key, value in strip_derived_buffers(state_dict).items():
        key = _shift_downsample(key, +1)
        if key.startswith("head."):
            key = "head.fc." + key[len("head.") :]
        out[key] = value
    return out


def timm_to_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm -> official/ours: ``layers.N.downsample`` -> ``layers.N-1.downsample``, ``head.fc.`` -> ``head.``.

    Derived buffers and timm's ``k_bias`` are dropped.
    """
    out = {}
    for key, value in strip_derived_buffers(state_dict).items():
        key = _shift_downsample(key, -1)
        if key.startswith("head.fc."):
            key = "head." + key[len("head.fc.") :]
        out[key] = value
    return out
