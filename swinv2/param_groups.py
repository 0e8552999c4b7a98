"""Optimizer parameter groups: weight-decay exclusion and layer-wise lr decay (official ``get_swin_layer`` ids).

The lr scale of a group is stored once, as ``lr_scale``; the group's lr is NOT pre-multiplied. The scheduler (or
the trainer) multiplies its lr by ``lr_scale`` exactly once (spec §3.9, §5: the official code stores both and timm
>= 0.6 multiplies again, applying the scale twice).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from .swin_transformer_v2 import SwinTransformerV2

__all__ = ["find_backbone", "layer_id", "param_groups"]

_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def find_backbone(model: nn.Module) -> tuple[str, SwinTransformerV2 | None]:
    """The first SwinTransformerV2 inside ``model`` (itself included) and its name prefix ("" or "encoder.")."""
    for name, module in model.named_modules():
        if isinstance(module, SwinTransformerV2):
            return (name + "." if name else ""), module
    return "", None


def layer_id(name: str, depths: Sequence[int]) -> int:
    """Official ``get_swin_layer`` id of a parameter name relative to the backbone (prefix already removed).

    mask_token and patch_embed -> 0; ``layers.i.blocks.j`` -> sum(depths[:i]) + j + 1;
    ``layers.i.downsample`` -> sum(depths[:i + 1]); everything else (norm, head, absolute_pos_embed) -> sum(depths) + 1.

    Args:
        name: parameter name without the backbone prefix.
        depths: blocks per stage.
    """
    if name in ("mask_token",) or name.startswith("patch_embed"):
        return 0
    match = _BLOCK.match(name)
    if match:
        i, j = int(match.group(1)), int(match.group(2))
        return sum(depths[:i]) + j + 1
    match = _DOWNSAMPLE.match(name)
    if match:
        i = int(match.group(1))
        return sum(depths[: i + 1])
    return sum(depths) + 1


def _matches_name(name: str, names: Iterable[str]) -> bool:
    # Exact match, or a match after any module prefix ("encoder.absolute_pos_embed" matches "absolute_pos_embed").
    return any(name == n or name.endswith("." + n) for n in names)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    no_decay_names: Iterable[str] = (),
    no_decay_keywords: Iterable[str] = (),
) -> list[dict]:
    """Split trainable parameters into weight-decay / no-decay groups, optionally per layer for lr decay.

    Never decayed: 1-D parameters (by their full shape, also when ZeRO-3 has partitioned them) and names ending in
    ".bias" (as the official optimizer builder), plus names in ``no_decay_names`` (exact, or after a module prefix) and
    names containing one of ``no_decay_keywords``. Pass the backbone's ``no_weight_decay()`` /
    ``no_weight_decay_keywords()`` to get the official fine-tuning behaviour.

    Args:
        model: a SwinTransformerV2, or any module holding one (e.g. SimMIM's ``encoder``); layer ids are computed
            for names relative to the first SwinTransformerV2 found, anything outside it gets the top id.
        weight_decay: decay of the decay groups (0 for the others).
        layer_decay: layer-wise lr decay factor; 1.0 gives two groups with lr_scale 1.0.
        no_decay_names: exact parameter names excluded from decay.
        no_decay_keywords: substrings of parameter names excluded from decay.

    Returns:
        Groups with keys "params", "weight_decay", "lr_scale", "layer_id" (the last only when layer_decay != 1).
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay={layer_decay}; accepted: 0 < layer_decay <= 1")
    no_decay_names = tuple(no_decay_names)
    no_decay_keywords = tuple(no_decay_keywords)
    prefix, backbone = find_backbone(model)
    depths = backbone.depths if backbone is not None else (0,)
    top = sum(depths) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Under ZeRO-3 (deepspeed.zero.Init) a parameter's data is an empty 1-D partition; ``ds_shape`` keeps the
        # full shape, which is what the rule is about.
        no_decay = (
            len(getattr(param, "ds_shape", param.shape)) <= 1
            or name.endswith(".bias")
            or _matches_name(name, no_decay_names)
            or any(word in name for word in no_decay_keywords)
        )
        if layer_decay == 1.0:
            lid = None
        elif prefix and not name.startswith(prefix):
            lid = top
        else:
            lid = layer_id(name[len(prefix) :], depths)
        key = (lid if lid is not None else -1, no_decay)
        if key not in groups:
            group = {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": 1.0 if lid is None else layer_decay ** (top - lid),
            }
            if lid is not None:
                group["layer_id"] = lid
            groups[key] = group
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], k[1]))]
