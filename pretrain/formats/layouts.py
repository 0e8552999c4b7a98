"""Which layout a state dict is in, the sentence that names it, and the SimMIM -> backbone key mapping."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from swinv2 import strip_derived_buffers

__all__ = ["backbone_from_simmim", "detect_layout", "layout_hint", "rename_legacy"]


def detect_layout(keys: Iterator[str] | list[str] | Mapping[str, Any]) -> str:
    """Name the layout of a state dict: one of ``LAYOUTS``, ``deepspeed-model-states`` or ``unknown``."""
    keys = list(keys)
    keyset = set(keys)
    if any(k.startswith(("swinv2.embeddings.", "embeddings.patch_embeddings.")) for k in keys) or any(
        ".attention.self." in k for k in keys
    ):
        return "hf"
    if "encoder.patch_embed.proj.weight" in keyset:
        return "simmim"
    if "patch_embed.proj.weight" in keyset:
        if any(k.startswith("head.fc.") or k.endswith("attn.k_bias") for k in keys):
            return "timm"
        has_downsample = any(".downsample." in k for k in keys)
        if has_downsample and not any(k.startswith("layers.0.downsample.") for k in keys):
            return "timm"
        return "ours"
    if {"module", "buffer_names"} & keyset or "ds_version" in keyset or "ds_config" in keyset:
        return "deepspeed-model-states"
    return "unknown"


_LAYOUT_ADVICE = {
    "timm": "a timm state dict: use `import --from timm`",
    "hf": "an HF transformers Swinv2 state dict: use `import --from hf` on its model directory",
    "simmim": "a SimMIM checkpoint (encoder.* + decoder.*): use `backbone` to get fine-tuning weights",
    "ours": "a SwinV2 backbone/classifier in the official layout (ours)",
    "deepspeed-model-states": "one file of a DeepSpeed checkpoint: use `consolidate` on its directory",
    "unknown": "not a SwinV2 checkpoint this tool knows (official, SimMIM, timm, HF, DeepSpeed)",
}


def layout_hint(layout: str) -> str:
    """A sentence naming a detected layout and the subcommand that reads it."""
    return f"this is {_LAYOUT_ADVICE.get(layout, layout)}"


def rename_legacy(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Early official releases call the position-bias MLP ``rpe_mlp``; the code calls it ``cpb_mlp``."""
    return {k.replace("rpe_mlp", "cpb_mlp"): v for k, v in state_dict.items()}


def backbone_from_simmim(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SimMIM keys -> backbone keys (spec §3.8): keep ``encoder.*`` minus the prefix, drop decoder, mask token and
    derived buffers, rename ``rpe_mlp``."""
    out = {k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    out.pop("mask_token", None)
    return rename_legacy(strip_derived_buffers(out))
