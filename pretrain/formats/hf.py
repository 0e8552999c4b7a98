"""HF transformers Swinv2: the key map to and from the official layout, and the ``config.json`` of an export.

HF names every block part differently and splits the fused qkv projection into query/key/value; ``Swinv2For*``
models prefix the encoder with ``swinv2.``. The official <-> timm map lives beside the model in
:mod:`swinv2.checkpoint_keys`; this one raises :class:`ConversionError` for keys HF has no place for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from swinv2 import strip_derived_buffers
from swinv2.geometry import effective_windows

from .common import ConversionError, short_list
from .spec import BLOCK_KEY, ModelSpec

__all__ = ["hf_config", "hf_to_official", "official_to_hf"]

# Per-block suffixes, official -> HF (qkv handled separately: one tensor splits into three).
_HF_BLOCK = {
    "norm1.": "layernorm_before.",
    "norm2.": "layernorm_after.",
    "attn.q_bias": "attention.self.query.bias",
    "attn.v_bias": "attention.self.value.bias",
    "attn.logit_scale": "attention.self.logit_scale",
    "attn.cpb_mlp.": "attention.self.continuous_position_bias_mlp.",
    "attn.proj.": "attention.output.dense.",
    "mlp.fc1.": "intermediate.dense.",
    "mlp.fc2.": "output.dense.",
}
_HF_TOP = {
    "patch_embed.proj.": "embeddings.patch_embeddings.projection.",
    "patch_embed.norm.": "embeddings.norm.",
    "norm.": "layernorm.",
    "mask_token": "embeddings.mask_token",
}
_HF_BLOCK_INV = {v: k for k, v in _HF_BLOCK.items()}
_HF_TOP_INV = {v: k for k, v in _HF_TOP.items()}
_QKV = re.compile(r"attention\.self\.(query|key|value)\.weight")


def _replace_prefix(rest: str, table: Mapping[str, str]) -> str | None:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old) :]
    return None


def _official_block_to_hf(key: str, value: torch.Tensor, match: re.Match, base: str) -> dict[str, torch.Tensor] | None:
    """The HF entries of one block key (three for the fused qkv weight); None when HF has no counterpart."""
    rest = key[match.end() :]
    hb = f"{base}encoder.layers.{match.group(1)}.blocks.{match.group(2)}."
    if rest == "attn.qkv.weight":
        # Rows [0:C] query, [C:2C] key, [2C:3C] value; cloned so that each is its own storage on save.
        parts = zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True)
        return {f"{hb}attention.self.{name}.weight": part.clone() for name, part in parts}
    new = _replace_prefix(rest, _HF_BLOCK)
    return None if new is None else {hb + new: value}


def official_to_hf(state_dict: Mapping[str, torch.Tensor], *, prefixed: bool) -> dict[str, torch.Tensor]:
    """Official/ours backbone keys (optionally with ``mask_token``, ``head.*``, ``decoder.*``) -> HF Swinv2 keys.

    Args:
        state_dict: ours layout without ``encoder.`` prefix; ``decoder.*`` keys pass through unchanged.
        prefixed: prepend ``swinv2.`` to encoder keys (``Swinv2For*`` models) or not (``Swinv2Model``).

    Raises:
        ConversionError: for keys HF has no place for (absolute position embedding, extra norms).
    """
    base = "swinv2." if prefixed else ""
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in strip_derived_buffers(state_dict).items():
        match = BLOCK_KEY.match(key)
        if match:
            mapped = _official_block_to_hf(key, value, match, base)
        elif key.startswith("layers.") and ".downsample." in key:
            mapped = {base + "encoder." + key: value}
        elif key.startswith("head."):
            mapped = {"classifier." + key[len("head.") :]: value}
        elif key.startswith("decoder."):
            mapped = {key: value}
        else:
            new = _replace_prefix(key, _HF_TOP)
            mapped = None if new is None else {base + new: value}
        if mapped is None:
            unmapped.append(key)
        else:
            out.update(mapped)
    if unmapped:
        raise ConversionError(f"HF Swinv2 has no counterpart for these keys: {short_list(unmapped)}")
    return out


def _hf_key_to_official(bare: str, value: torch.Tensor, qkv: dict[str, dict[str, torch.Tensor]]) -> str | None:
    """The official name of one HF key without ``swinv2.`` ("" when collected into ``qkv``, None when unknown)."""
    if bare.startswith("encoder.layers."):
        rest = bare[len("encoder.") :]
        match = BLOCK_KEY.match(rest)
        if not match:
            return rest
        ob, tail = rest[: match.end()], rest[match.end() :]
        qkv_match = _QKV.fullmatch(tail)
        if qkv_match:
            qkv.setdefault(ob, {})[qkv_match.group(1)] = value
            return ""
        new = _replace_prefix(tail, _HF_BLOCK_INV)
        return None if new is None else ob + new
    if bare.startswith("classifier."):
        return "head." + bare[len("classifier.") :]
    if bare.startswith("decoder."):
        return bare
    return _replace_prefix(bare, _HF_TOP_INV)


def hf_to_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Swinv2 keys (any of Swinv2Model / ForImageClassification / ForMaskedImageModeling) -> official/ours keys.

    ``swinv2.`` is removed, query/key/value weights are concatenated into qkv (HF's key projection has no bias,
    exactly like the official zero k bias), ``classifier`` -> ``head``, ``embeddings.mask_token`` -> ``mask_token``;
    ``decoder.*`` passes through. Non-persistent HF buffers, if any, are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unmapped = []
    for key, value in strip_derived_buffers(state_dict).items():
        bare = key[len("swinv2.") :] if key.startswith("swinv2.") else key
        new = _hf_key_to_official(bare, value, qkv)
        if new is None:
            unmapped.append(key)
        elif new:
            out[new] = value
    for ob, parts in qkv.items():
        missing = [p for p in ("query", "key", "value") if p not in parts]
        if missing:
            raise ConversionError(f"HF block {ob} lacks attention {', '.join(missing)} weights")
        out[ob + "attn.qkv.weight"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if unmapped:
        raise ConversionError(f"keys with no official counterpart: {short_list(unmapped)}")
    return out


def _hf_problems(spec: ModelSpec) -> list[str]:
    """What ``spec`` has that HF Swinv2 cannot express (empty when it can)."""
    problems = []
    windows = list(spec.window_size or [])
    # Per-stage windows read from official buffers are the clamped ones ([16, 16, 16, 8] at 256/w16); one window
    # reproduces them when every stage's window is either the largest or the whole (clamped) stage.
    uniform = max(windows)
    clamped = effective_windows(spec.img_size, [uniform] * len(windows), spec.patch_size, len(windows))
    if clamped != effective_windows(spec.img_size, windows, spec.patch_size, len(windows)):
        problems.append(f"window_size={windows} differs between stages (HF has one window_size)")
    if spec.ape:
        problems.append("ape=True (HF's absolute position embedding has L+1 positions, spec §4.6)")
    if spec.extra_norm_every:
        problems.append(f"extra_norm_every={spec.extra_norm_every} (HF has no extra main-branch norm)")
    if not spec.patch_norm:
        problems.append("patch_norm=False (HF always normalises patch embeddings)")
    return problems


def hf_config(spec: ModelSpec, architecture: str) -> dict[str, Any]:
    """An HF ``config.json`` dict for ``spec`` (HF has one window size for all stages and no extra norms)."""
    spec.require_sizes("export to HF")
    problems = _hf_problems(spec)
    if problems:
        raise ConversionError("cannot express this model in HF Swinv2: " + "; ".join(problems))
    config: dict[str, Any] = {
        "model_type": "swinv2",
        "architectures": [architecture],
        "image_size": spec.img_size,
        "patch_size": spec.patch_size,
        "num_channels": spec.in_chans,
        "embed_dim": spec.embed_dim,
        "depths": list(spec.depths),
        "num_heads": list(spec.num_heads),
        "window_size": max(spec.window_size or []),
        "pretrained_window_sizes": list(spec.pretrained_window_sizes),
        "mlp_ratio": spec.mlp_ratio,
        "qkv_bias": spec.qkv_bias,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": spec.drop_path_rate,
        "hidden_act": "gelu",
        "use_absolute_embeddings": False,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-5,
        # The SimMIM decoder upsamples by the total stride of the encoder.
        "encoder_stride": spec.patch_size * 2 ** (len(spec.depths) - 1),
    }
    if architecture == "Swinv2ForImageClassification":
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(spec.num_classes)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(spec.num_classes)}
    return config
