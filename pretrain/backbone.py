"""The ``model`` config section: which SwinV2 backbone a task builds, its checks, and its constructor arguments.

Pretraining (SimMIM) and fine-tuning build the same backbone from this section; :func:`backbone_kwargs` is the one
place that turns the section into ``SwinTransformerV2`` keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from swinv2 import MODEL_SIZES, parse_checkpointing
from swinv2.geometry import check_geometry
from swinv2.swin_transformer_v2 import ATTN_IMPLS

from .checks import ConfigError, one_of, per_stage_list, require

__all__ = ["IN_CHANS", "ModelConfig", "backbone_kwargs"]

# The data pipelines decode every image to RGB, so the model sees 3 channels.
IN_CHANS = 3


@dataclass
class ModelConfig:
    # Named size: tiny, small, base, large, huge, giant (see swinv2.MODEL_SIZES); fields below left at None
    # take the size's value.
    size: str = "base"
    img_size: int = 192
    patch_size: int = 4
    in_chans: int = 3
    window_size: int = 12
    pretrained_window_sizes: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    embed_dim: int | None = None
    depths: list[int] | None = None
    num_heads: list[int] | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    ape: bool = False
    patch_norm: bool = True
    # The SwinV2 paper's extra LayerNorm on the main branch every k blocks (H and G); None = the size's default.
    extra_norm_every: int | None = None
    # Attention kernel: auto (measured choice per device and dtype), sdpa, or explicit.
    attn_impl: str = "auto"
    # Sequential window attention: process at most this many windows at a time (0 = all at once).
    window_chunk_size: int = 0
    # Activation checkpointing, parsed by swinv2.parse_checkpointing into set_grad_checkpointing arguments: "none",
    # "all", "every:K" (every K-th block counted over the whole network), "stages:I,J" (all blocks of stages I, J;
    # indices below the number of stages) or "every:K+stages:I,J".
    activation_checkpointing: str = "none"
    # torch.compile each Swin block (regional compilation: one graph per block kind, checkpoint keys unchanged).
    # Costs a compile at start-up (about a minute per block kind on a small CPU); not with ZeRO-3, whose per-module
    # parameter gathering would be traced into the compiled blocks.
    compile: bool = False

    def resolved(self, key: str) -> Any:
        """``key`` (embed_dim, depths, num_heads, extra_norm_every) with the named size's value where left at None."""
        value = getattr(self, key)
        return MODEL_SIZES[self.size][key] if value is None else value

    def check(self) -> None:
        one_of("model.size", self.size, list(MODEL_SIZES))
        one_of("model.attn_impl", self.attn_impl, ATTN_IMPLS)
        depths, heads = list(self.resolved("depths")), list(self.resolved("num_heads"))
        require(
            len(depths) > 0 and all(d > 0 for d in depths),
            f"model.depths={depths}; accepted: a non-empty list of positive block counts, one per stage",
        )
        require(
            len(depths) == len(heads),
            f"model.depths={depths} and model.num_heads={heads} need the same, non-zero length",
        )
        per_stage_list(
            "model.pretrained_window_sizes",
            self.pretrained_window_sizes,
            len(depths),
            "per stage 0 (not pretrained) or a positive window size",
        )
        try:
            checkpointing = parse_checkpointing(self.activation_checkpointing)
        except ValueError as exc:
            raise ConfigError(f"model.activation_checkpointing: {exc}") from None
        # parse_checkpointing cannot know the number of stages; set_grad_checkpointing would only refuse once the
        # model exists.
        stages_out = [i for i in checkpointing.get("stages", []) if i >= len(depths)]
        require(
            not stages_out,
            f"model.activation_checkpointing={self.activation_checkpointing!r}: stages {stages_out} do not exist; "
            f"accepted: stage indices 0..{len(depths) - 1}",
        )
        self._check_ranges()
        embed_dim = self.resolved("embed_dim")
        for i, h in enumerate(heads):
            require(
                h > 0 and (embed_dim * 2**i) % h == 0,
                f"model.num_heads[{i}]={h} does not divide the stage {i} width {embed_dim * 2**i} "
                f"(model.embed_dim={embed_dim})",
            )
        if self.img_size % self.patch_size:
            valid = [
                self.patch_size * k
                for k in range(max(1, self.img_size // self.patch_size - 2), self.img_size // self.patch_size + 3)
            ]
            raise ConfigError(
                f"model.img_size={self.img_size} is not a multiple of model.patch_size={self.patch_size}; e.g. {valid}"
            )
        try:
            check_geometry(self.img_size, self.patch_size, self.window_size, len(depths))
        except ValueError as exc:
            raise ConfigError(
                f"model.img_size={self.img_size} with model.window_size={self.window_size}: {exc}"
            ) from None

    def _check_ranges(self) -> None:
        """Ranges of the scalar settings (the backbone would fail later, or train wrongly, on these)."""
        require(
            self.embed_dim is None or self.embed_dim > 0,
            f"model.embed_dim={self.embed_dim}; accepted: a positive integer or null (the size's default)",
        )
        require(
            self.in_chans == IN_CHANS,
            f"model.in_chans={self.in_chans}; accepted: {IN_CHANS} (the pipeline decodes to RGB)",
        )
        require(self.mlp_ratio > 0, f"model.mlp_ratio={self.mlp_ratio}; accepted: > 0")
        for key in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            rate = getattr(self, key)
            require(0.0 <= rate < 1.0, f"model.{key}={rate}; accepted: 0 <= rate < 1")
        require(
            self.extra_norm_every is None or self.extra_norm_every >= 0,
            f"model.extra_norm_every={self.extra_norm_every}; accepted: 0 (off), a positive block count, or null (the "
            f"size's default)",
        )
        require(
            all(w >= 0 for w in self.pretrained_window_sizes),
            f"model.pretrained_window_sizes={list(self.pretrained_window_sizes)}; accepted: per stage 0 (not "
            f"pretrained) or a positive window size",
        )
        require(
            self.patch_size > 0 and self.img_size > 0,
            f"model.img_size={self.img_size} and model.patch_size={self.patch_size} must be positive",
        )
        require(self.window_size > 0, f"model.window_size={self.window_size}; accepted: a positive integer")
        require(
            self.window_chunk_size >= 0,
            f"model.window_chunk_size={self.window_chunk_size}; accepted: 0 (off) or > 0",
        )


def backbone_kwargs(m: ModelConfig) -> dict[str, Any]:
    """``SwinTransformerV2`` keyword arguments for the section (named size's values where the section says None)."""
    return {
        "img_size": m.img_size,
        "patch_size": m.patch_size,
        "in_chans": m.in_chans,
        "window_size": m.window_size,
        "embed_dim": m.resolved("embed_dim"),
        "depths": list(m.resolved("depths")),
        "num_heads": list(m.resolved("num_heads")),
        "extra_norm_every": m.resolved("extra_norm_every"),
        "mlp_ratio": m.mlp_ratio,
        "qkv_bias": m.qkv_bias,
        "drop_rate": m.drop_rate,
        "attn_drop_rate": m.attn_drop_rate,
        "drop_path_rate": m.drop_path_rate,
        "ape": m.ape,
        "patch_norm": m.patch_norm,
        "pretrained_window_sizes": list(m.pretrained_window_sizes),
        "attn_impl": m.attn_impl,
        "window_chunk_size": m.window_chunk_size,
    }
