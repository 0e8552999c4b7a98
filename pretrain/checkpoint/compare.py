"""The saved run's config against this run's, before a checkpoint is loaded.

A resume must never be a surprise: a different architecture (anything that changes parameter names or shapes, or
what the stored position-bias MLP was trained for) cannot continue and is refused naming each key; every other
difference (batch size, learning rate, data, precision, ...) is allowed and listed in the log.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from swinv2 import MODEL_SIZES
from swinv2.geometry import per_stage

__all__ = ["ARCHITECTURE_KEYS", "ConfigDiff", "compare_configs"]

# Keys whose change alters the model the weights belong to: widths, depths, heads and their options change
# parameter names or shapes; the image, window and pretrained-window sizes change the geometry the position-bias MLP
# and the attention masks were trained on. SimMIM's decoder follows from the model's patch size, stages and channels.
# embed_dim, depths, num_heads and extra_norm_every are compared as resolved (a value left at None takes model.size's).
ARCHITECTURE_KEYS = (
    "model.embed_dim",
    "model.depths",
    "model.num_heads",
    "model.extra_norm_every",
    "model.patch_size",
    "model.in_chans",
    "model.mlp_ratio",
    "model.qkv_bias",
    "model.ape",
    "model.patch_norm",
    "model.img_size",
    "model.window_size",
    "model.pretrained_window_sizes",
)
_SIZED = ("embed_dim", "depths", "num_heads", "extra_norm_every")
_PER_STAGE = ("window_size", "pretrained_window_sizes")
_ABSENT = "<absent>"

Change = tuple[str, Any, Any]


@dataclass(frozen=True)
class ConfigDiff:
    """Differences between a saved config and this run's, as (dotted key, saved value, this run's value)."""

    architecture: list[Change] = field(default_factory=list)
    other: list[Change] = field(default_factory=list)

    @staticmethod
    def describe(changes: Sequence[Change]) -> str:
        """``key: old -> new; ...``."""
        return "; ".join(f"{key}: {old} -> {new}" for key, old, new in changes)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _resolved_model(flat: dict[str, Any]) -> dict[str, Any]:
    """The model keys as the model is built: size defaults filled in, per-stage values expanded."""
    out = dict(flat)
    size = MODEL_SIZES.get(str(flat.get("model.size")), {})
    for name in _SIZED:
        key = f"model.{name}"
        if out.get(key) is None and name in size:
            value = size[name]
            out[key] = list(value) if isinstance(value, tuple) else value
    depths = out.get("model.depths")
    for name in _PER_STAGE:
        key = f"model.{name}"
        if isinstance(depths, list) and out.get(key) is not None:
            with contextlib.suppress(TypeError, ValueError):  # else compared as written
                out[key] = per_stage(out[key], len(depths), key)
    return out


def compare_configs(
    saved: Mapping[str, Any], current: Mapping[str, Any], architecture: Sequence[str] = ARCHITECTURE_KEYS
) -> ConfigDiff:
    """Compare a checkpoint's saved config (client state ``config``) with this run's (both as plain dicts).

    Args:
        saved: the resolved config stored in the checkpoint.
        current: this run's resolved config.
        architecture: dotted keys whose change makes the checkpoint unusable (a task adds its own, e.g. a head).

    Returns:
        The differences, split into architecture changes and the rest, each sorted by key.
    """
    old, new = _resolved_model(_flatten(saved)), _resolved_model(_flatten(current))
    arch, other = [], []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if before == after:
            continue
        # A key one side lacks comes from another version of the config schema: listed, never refused.
        refused = key in architecture and _ABSENT not in (before, after)
        (arch if refused else other).append((key, before, after))
    return ConfigDiff(arch, other)
