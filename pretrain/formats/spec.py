"""The architecture a set of SwinV2 weights belongs to: :class:`ModelSpec`, and how to read it from tensor shapes,
a training config or an HF ``config.json``."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from swinv2 import SwinTransformerV2
from swinv2.geometry import per_stage

from .common import ConversionError
from .tables import pretrained_windows_from_tables

__all__ = ["BLOCK_KEY", "ModelSpec", "infer_spec", "spec_from_config", "spec_from_hf_config"]

# ``layers.<stage>.blocks.<block>.`` at the start of an ours-layout key.
BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")


@dataclass
class ModelSpec:
    """Everything needed to rebuild a ``SwinTransformerV2`` for a set of weights.

    Weights fix the architecture; ``img_size``, ``window_size`` and ``pretrained_window_sizes`` are not visible in
    weights without buffers, so they come from metadata, an HF config, official buffers or the command line.
    """

    embed_dim: int
    depths: list[int]
    num_heads: list[int]
    patch_size: int = 4
    in_chans: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ape: bool = False
    patch_norm: bool = True
    num_classes: int = 0
    extra_norm_every: int = 0
    img_size: int | None = None
    window_size: list[int] | None = None
    pretrained_window_sizes: list[int] = field(default_factory=list)
    drop_path_rate: float = 0.1

    def __post_init__(self) -> None:
        if not self.pretrained_window_sizes:
            self.pretrained_window_sizes = [0] * len(self.depths)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def require_sizes(self, what: str) -> None:
        """Raise when img_size/window_size are unknown (they cannot be read from weights without buffers)."""
        missing = [name for name in ("img_size", "window_size") if getattr(self, name) is None]
        if missing:
            flags = " and ".join("--" + m.replace("_", "-") for m in missing)
            raise ConversionError(
                f"{what} needs the model's {' and '.join(missing)}, which these weights do not record; pass {flags}"
            )

    def model_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of ``SwinTransformerV2`` (img_size/window_size must be known)."""
        self.require_sizes("building the model")
        return {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "num_classes": self.num_classes,
            "embed_dim": self.embed_dim,
            "depths": tuple(self.depths),
            "num_heads": tuple(self.num_heads),
            "window_size": list(self.window_size or []),
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": self.qkv_bias,
            "ape": self.ape,
            "patch_norm": self.patch_norm,
            "pretrained_window_sizes": tuple(self.pretrained_window_sizes),
            "extra_norm_every": self.extra_norm_every,
            "drop_path_rate": self.drop_path_rate,
        }

    def build(self, device: torch.device | str = "cpu") -> SwinTransformerV2:
        """Build the model; on the meta device this only validates sizes (no memory)."""
        try:
            with torch.device(device):
                return SwinTransformerV2(**self.model_kwargs())
        except ValueError as err:
            raise ConversionError(f"cannot build SwinV2 with {self.describe()}: {err}") from err

    def describe(self) -> str:
        return (
            f"embed_dim={self.embed_dim} depths={self.depths} num_heads={self.num_heads} img_size={self.img_size} "
            f"window_size={self.window_size} pretrained_window_sizes={self.pretrained_window_sizes}"
        )


def infer_spec(state_dict: Mapping[str, torch.Tensor]) -> ModelSpec:
    """Read the architecture from tensor shapes of an ``ours``-layout state dict (no prefix).

    Derived buffers, when present (official files), also give the windows each stage ran with and the image size.
    """
    try:
        spec = _spec_from_shapes(state_dict)
    except KeyError as err:
        raise ConversionError(f"incomplete SwinV2 state dict: key {err} is missing") from err
    _sizes_from_buffers(spec, state_dict)
    pretrained = pretrained_windows_from_tables(state_dict, spec.depths)
    if pretrained is not None:
        spec.pretrained_window_sizes = pretrained
    return spec


def _spec_from_shapes(state_dict: Mapping[str, torch.Tensor]) -> ModelSpec:
    """The architecture (widths, depths, heads, options) from parameter names and shapes."""
    if "patch_embed.proj.weight" not in state_dict:
        raise ConversionError("not a SwinV2 state dict in the official layout: patch_embed.proj.weight is missing")
    proj = state_dict["patch_embed.proj.weight"]
    embed_dim, in_chans, patch_size = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    blocks: dict[int, set[int]] = {}
    extra_norm_positions: list[int] = []
    for key in state_dict:
        match = BLOCK_KEY.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
            if key.endswith("extra_norm.weight"):
                extra_norm_positions.append(int(match.group(2)))
    stages = sorted(blocks)
    if stages != list(range(len(stages))):
        raise ConversionError(f"stage indices {stages} are not contiguous from 0")
    hidden = state_dict["layers.0.blocks.0.mlp.fc1.weight"].shape[0]
    head = state_dict.get("head.weight")
    return ModelSpec(
        embed_dim=embed_dim,
        depths=[max(blocks[i]) + 1 for i in stages],
        num_heads=[int(state_dict[f"layers.{i}.blocks.0.attn.logit_scale"].shape[0]) for i in stages],
        patch_size=patch_size,
        in_chans=in_chans,
        mlp_ratio=float(hidden) / embed_dim,
        qkv_bias="layers.0.blocks.0.attn.q_bias" in state_dict,
        ape="absolute_pos_embed" in state_dict,
        patch_norm="patch_embed.norm.weight" in state_dict,
        num_classes=int(head.shape[0]) if head is not None else 0,
        extra_norm_every=min(extra_norm_positions) + 1 if extra_norm_positions else 0,
    )


def _sizes_from_buffers(spec: ModelSpec, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Windows and image size from the derived buffers official files keep (in place; left None without them).

    relative_position_index (N, N) per block gives each stage's (clamped) window, attn_mask (nW, N, N) on shifted
    blocks the stage's token count, hence the image size; the absolute position embedding (1, L, C) has one row per
    patch of a square input.
    """
    windows = []
    for i in range(len(spec.depths)):
        index = state_dict.get(f"layers.{i}.blocks.0.attn.relative_position_index")
        windows.append(math.isqrt(int(index.shape[0])) if index is not None else None)
    if all(w is not None for w in windows):
        spec.window_size = windows
    for i, depth in enumerate(spec.depths):
        for j in range(depth):
            mask = state_dict.get(f"layers.{i}.blocks.{j}.attn_mask")
            if mask is not None and mask.dim() == 3:
                tokens = int(mask.shape[0]) * int(mask.shape[1])
                spec.img_size = math.isqrt(tokens) * spec.patch_size * 2**i
                return
    pos = state_dict.get("absolute_pos_embed")
    if pos is not None and pos.dim() == 3 and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
        spec.img_size = math.isqrt(int(pos.shape[1])) * spec.patch_size


def _stages(value: int | Sequence[int] | None, stages: int, key: str) -> list[int] | None:
    """A one-or-per-stage config value expanded to one per stage (None stays None)."""
    if value is None:
        return None
    try:
        return per_stage(value if isinstance(value, int) else list(value), stages, key)
    except ValueError as err:
        raise ConversionError(str(err)) from None


def spec_from_config(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> ModelSpec:
    """Architecture from the weights, sizes from a resolved training config dict (its ``model`` section)."""
    spec = infer_spec(state_dict)
    model = dict(config.get("model", {}))
    stages = len(spec.depths)
    spec.img_size = int(model["img_size"]) if model.get("img_size") is not None else None
    spec.window_size = _stages(model.get("window_size"), stages, "model.window_size")
    pretrained = _stages(model.get("pretrained_window_sizes"), stages, "model.pretrained_window_sizes")
    if pretrained:
        spec.pretrained_window_sizes = pretrained
    if model.get("drop_path_rate") is not None:
        spec.drop_path_rate = float(model["drop_path_rate"])
    return spec


def spec_from_hf_config(config: Mapping[str, Any], num_classes: int = 0) -> ModelSpec:
    """ModelSpec from an HF ``config.json`` of model_type swinv2."""
    depths = [int(d) for d in config["depths"]]
    return ModelSpec(
        embed_dim=int(config["embed_dim"]),
        depths=depths,
        num_heads=[int(h) for h in config["num_heads"]],
        patch_size=int(config.get("patch_size", 4)),
        in_chans=int(config.get("num_channels", 3)),
        mlp_ratio=float(config.get("mlp_ratio", 4.0)),
        qkv_bias=bool(config.get("qkv_bias", True)),
        ape=bool(config.get("use_absolute_embeddings", False)),
        patch_norm=True,
        num_classes=num_classes,
        img_size=int(config["image_size"]),
        window_size=[int(config["window_size"])] * len(depths),
        pretrained_window_sizes=[int(p) for p in config.get("pretrained_window_sizes") or [0] * len(depths)],
        drop_path_rate=float(config.get("drop_path_rate", 0.1)),
    )
