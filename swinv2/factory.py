"""Named SwinV2 sizes, the model factory, the activation-checkpointing spec parser and regional compilation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .swin_transformer_v2 import SwinTransformerBlock, SwinTransformerV2

__all__ = ["MODEL_SIZES", "compile_blocks", "compile_counts", "create_model", "parse_checkpointing"]

# Spec §1.8. T/S/B/L are the official configs; H and G are the paper's (C=352 and C=512) with head dim 32, and the
# paper's extra main-branch LayerNorm every 6 blocks switched on by default (extra_norm_every; 0 = official layout).
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "extra_norm_every": 0},
    "small": {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24), "extra_norm_every": 0},
    "base": {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32), "extra_norm_every": 0},
    "large": {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48), "extra_norm_every": 0},
    "huge": {"embed_dim": 352, "depths": (2, 2, 18, 2), "num_heads": (11, 22, 44, 88), "extra_norm_every": 6},
    "giant": {"embed_dim": 512, "depths": (2, 2, 42, 4), "num_heads": (16, 32, 64, 128), "extra_norm_every": 6},
}


def create_model(size: str, **kwargs: Any) -> SwinTransformerV2:
    """Build a named size; keyword arguments override the size's values or set any other constructor argument.

    Args:
        size: one of ``MODEL_SIZES`` (tiny, small, base, large, huge, giant).
        **kwargs: ``SwinTransformerV2`` arguments (img_size, window_size, num_classes, drop_path_rate, ...). A value
            of None is ignored, so config fields left at None take the size's default.

    Returns:
        The model (on the current default device: build under ``torch.device("meta")`` or ``deepspeed.zero.Init``
        to avoid materialising large sizes).
    """
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; accepted: {', '.join(MODEL_SIZES)}")
    args = dict(MODEL_SIZES[size])
    args.update({k: v for k, v in kwargs.items() if v is not None})
    return SwinTransformerV2(**args)


def parse_checkpointing(spec: str) -> dict[str, Any]:
    """Turn an activation-checkpointing spec into ``SwinTransformerV2.set_grad_checkpointing`` keyword arguments.

    Args:
        spec: "none", "all", "every:K" (every K-th block over the whole network, K >= 1), "stages:I,J" (all blocks
            of the listed stages), or both selections joined by "+" ("every:2+stages:2,3": every 2nd block, counted
            over the network, among the blocks of stages 2 and 3).

    Returns:
        e.g. {"enable": True, "every": 2} for "every:2".
    """
    accepted = 'accepted: "none", "all", "every:K" (K >= 1), "stages:I,J" (stage indices), or "every:K+stages:I,J"'
    text = str(spec).strip().lower()
    if text in ("none", "off", ""):
        return {"enable": False}
    if text == "all":
        return {"enable": True}
    result: dict[str, Any] = {"enable": True}
    for part in text.split("+"):
        kind, _, value = part.strip().partition(":")
        try:
            if kind == "every" and "every" not in result:
                result["every"] = int(value)
                if result["every"] < 1:
                    raise ValueError
                continue
            if kind == "stages" and "stages" not in result:
                result["stages"] = [int(v) for v in value.split(",") if v.strip()]
                if not result["stages"] or any(s < 0 for s in result["stages"]):
                    raise ValueError
                continue
        except ValueError:
            pass
        raise ValueError(f"activation checkpointing spec {spec!r} not understood; {accepted}")
    return result


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> int:
    """Compile every ``SwinTransformerBlock`` inside ``model`` in place (regional compilation).

    Blocks are where the time goes, and blocks of one kind (stage, shifted or not) share a graph: compile time grows
    with the number of block kinds, not with depth. Module structure and state-dict keys are unchanged
    (``nn.Module.compile``, no ``_orig_mod`` prefix), so checkpoints load either way; everything outside the blocks
    stays eager.

    Dynamo compiles one graph per block kind and per mode (train / eval, autocast or not) for the single code
    object all blocks share; its recompile limit (default 8) is raised to cover every kind, so no block falls
    back to eager silently.

    Args:
        model: a ``SwinTransformerV2`` or any module containing its blocks (the SimMIM wrapper).
        **compile_kwargs: passed to ``torch.compile`` (mode, backend, options, fullgraph, ...).

    Returns:
        The number of blocks compiled.
    """
    blocks = [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]
    if not blocks:
        raise ValueError(f"compile_blocks: {type(model).__name__} contains no SwinTransformerBlock")
    kinds = {
        (b.dim, b.input_resolution, b.window_size, b.shift_size, b.extra_norm is not None, b.drop_path.drop_prob > 0)
        for b in blocks
    }
    limit = 4 * len(kinds)  # train / eval x autocast on / off per kind
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def compile_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process, e.g. after the first step of a run with compiled blocks:
    a graph break or a block left eager shows here, not only as a slower run."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
