"""Checkpoint layouts of SwinV2 weights and the mappings between them (spec §2.3).

Layouts (names used in messages and on the command line):

- ``ours``: the official Microsoft key names without prefix (backbone or classifier; ``head.*``). Our own files carry
  a metadata record; official files carry the derived buffers as persistent entries.
- ``simmim``: the official SimMIM layout, ``encoder.*`` + ``encoder.mask_token`` + ``decoder.0.*`` (our SimMIM model
  has the same keys).
- ``timm``: timm's ``SwinTransformerV2`` (downsample at the start of the next stage, ``head.fc.*``).
- ``hf``: HF transformers ``Swinv2Model`` (no prefix) or ``Swinv2For*`` (``swinv2.`` prefix, ``classifier.*`` or
  ``decoder.0.*``), separate query/key/value projections.

The official <-> timm key shift lives in :mod:`swinv2.checkpoint_keys`; this module adds the HF mapping, format
detection, architecture inference from tensor shapes, and safe file reading/writing.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from swinv2 import SwinTransformerV2, official_to_timm, strip_derived_buffers, timm_to_official
from swinv2.swin_transformer_v2 import relative_coords_table

__all__ = [
    "LAYOUTS",
    "META_KEY",
    "ConversionError",
    "ModelSpec",
    "backbone_from_simmim",
    "cast_fn",
    "check_weights",
    "coords_table_matches",
    "detect_layout",
    "effective_windows",
    "hf_config",
    "hf_to_official",
    "infer_spec",
    "layout_hint",
    "load_weights_file",
    "official_buffers",
    "official_to_hf",
    "official_to_timm",
    "pretrained_window_from_table",
    "pretrained_windows_from_tables",
    "rename_legacy",
    "save_weights_file",
    "spec_from_config",
    "spec_from_hf_config",
    "strip_derived_buffers",
    "timm_to_official",
    "write_atomically",
]

LAYOUTS = ("ours", "simmim", "timm", "hf")
# Key of our metadata record: safetensors header metadata entry, or top-level key of a .pth dict.
META_KEY = "swinv2_pretrain"
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class ConversionError(ValueError):
    """A bad input, option or output for a conversion; the message says what was found and what is accepted."""


# ------------------------------------------------------------------------------------------------ architecture spec
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


def effective_windows(img_size: int, window_size: list[int], patch_size: int, num_stages: int) -> list[int]:
    """Per stage, the window a model actually runs with after the official clamp rule (window <= stage side).

    Args:
        img_size: input side.
        window_size: requested window per stage.
        patch_size: patch side.
        num_stages: number of stages.

    Returns:
        e.g. [12, 12, 12, 6] for 192/w12 with patch 4 and four stages.
    """
    side = img_size // patch_size
    out = []
    for i in range(num_stages):
        out.append(min(side // 2**i, int(window_size[i])))
    return out


def _per_stage(value: int | list[int] | None, stages: int) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [value] * stages
    value = [int(v) for v in value]
    if len(value) == 1:
        return value * stages
    if len(value) != stages:
        raise ConversionError(f"window size list {value} needs one entry per stage ({stages}) or a single value")
    return value


_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")


def infer_spec(state_dict: Mapping[str, torch.Tensor]) -> ModelSpec:
    """Read the architecture from tensor shapes of an ``ours``-layout state dict (no prefix).

    Derived buffers, when present (official files), also give the windows each stage ran with and the image size.
    """
    try:
        return _infer_spec(state_dict)
    except KeyError as err:
        raise ConversionError(f"incomplete SwinV2 state dict: key {err} is missing") from err


def _infer_spec(state_dict: Mapping[str, torch.Tensor]) -> ModelSpec:
    if "patch_embed.proj.weight" not in state_dict:
        raise ConversionError("not a SwinV2 state dict in the official layout: patch_embed.proj.weight is missing")
    proj = state_dict["patch_embed.proj.weight"]
    embed_dim, in_chans, patch_size = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    blocks: dict[int, set[int]] = {}
    extra_norm_positions: list[int] = []
    for key in state_dict:
        match = _BLOCK.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
            if key.endswith("extra_norm.weight"):
                extra_norm_positions.append(int(match.group(2)))
    stages = sorted(blocks)
    if stages != list(range(len(stages))):
        raise ConversionError(f"stage indices {stages} are not contiguous from 0")
    depths = [max(blocks[i]) + 1 for i in stages]
    num_heads = [int(state_dict[f"layers.{i}.blocks.0.attn.logit_scale"].shape[0]) for i in stages]
    hidden = state_dict["layers.0.blocks.0.mlp.fc1.weight"].shape[0]
    head = state_dict.get("head.weight")
    spec = ModelSpec(
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        patch_size=patch_size,
        in_chans=in_chans,
        mlp_ratio=float(hidden) / embed_dim,
        qkv_bias="layers.0.blocks.0.attn.q_bias" in state_dict,
        ape="absolute_pos_embed" in state_dict,
        patch_norm="patch_embed.norm.weight" in state_dict,
        num_classes=int(head.shape[0]) if head is not None else 0,
        extra_norm_every=min(extra_norm_positions) + 1 if extra_norm_positions else 0,
    )
    # Official files keep relative_position_index (N, N) per block and attn_mask (nW, N, N) on shifted blocks:
    # the first gives each stage's (clamped) window, the second the stage's token count, hence the image size.
    windows = []
    for i in stages:
        index = state_dict.get(f"layers.{i}.blocks.0.attn.relative_position_index")
        windows.append(math.isqrt(int(index.shape[0])) if index is not None else None)
    if all(w is not None for w in windows):
        spec.window_size = windows
    for i in stages:
        for j in range(depths[i]):
            mask = state_dict.get(f"layers.{i}.blocks.{j}.attn_mask")
            if mask is not None and mask.dim() == 3:
                tokens = int(mask.shape[0]) * int(mask.shape[1])
                spec.img_size = math.isqrt(tokens) * patch_size * 2**i
                break
        if spec.img_size is not None:
            break
    # The absolute position embedding (1, L, C) has one row per patch of a square input.
    pos = state_dict.get("absolute_pos_embed")
    if spec.img_size is None and pos is not None and pos.dim() == 3 and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
        spec.img_size = math.isqrt(int(pos.shape[1])) * patch_size
    pretrained = pretrained_windows_from_tables(state_dict, depths)
    if pretrained is not None:
        spec.pretrained_window_sizes = pretrained
    return spec


def _table_tolerance(table: torch.Tensor) -> float:
    # Official tables are float32 and rebuilt bit for bit; a table saved in half precision is only close.
    return 1e-5 if table.dtype in (torch.float32, torch.float64) else 2e-2


def _table_window(table: torch.Tensor, what: str) -> int:
    shape = tuple(table.shape)
    if len(shape) != 4 or shape[0] != 1 or shape[3] != 2 or shape[1] != shape[2] or shape[1] % 2 == 0:
        raise ConversionError(f"{what}: shape {shape}; a relative_coords_table is (1, 2W-1, 2W-1, 2)")
    return (shape[1] + 1) // 2


def coords_table_matches(table: torch.Tensor, pretrained: int, what: str = "relative_coords_table") -> bool:
    """Whether ``table`` is the one a block of its window builds with pretrained window ``pretrained`` (0 = its own).

    The table is rebuilt with the same code as the model and compared, so equivalent values (P equal to the window,
    or 0) match each other.
    """
    return _table_distance(table, pretrained, what) <= _table_tolerance(table)


def _table_distance(table: torch.Tensor, pretrained: int, what: str) -> float:
    window = _table_window(table, what)
    rebuilt = relative_coords_table((window, window), (pretrained, pretrained))
    return float((rebuilt - table.detach().float()).abs().max())


def pretrained_window_from_table(table: torch.Tensor, what: str = "relative_coords_table") -> int:
    """The pretrained window P a stored relative_coords_table was built with; 0 when it is the block's own window.

    The largest offset W-1 maps to log2(8 (W-1)/(P-1) + 1) / 3 (spec §1.3): that gives a candidate P, confirmed by
    rebuilding the whole table for it and its neighbours.

    Raises:
        ConversionError: the table matches no pretrained window (damaged, or not built by the SwinV2 rule).
    """
    window = _table_window(table, what)
    if window == 1:
        return 0  # a 1x1 window has the single offset 0: every P gives the same all-zero table
    top = float(table[0, -1, window - 1, 0])
    scaled = 2.0 ** (3.0 * top) - 1.0
    guess = round(8.0 * (window - 1) / scaled) + 1 if scaled > 0 else window
    # P = 1 is not a window the official code can build (it divides by P - 1); ours treats it as 2.
    candidates = sorted({window, *(p for p in (guess - 1, guess, guess + 1) if p >= 2)})
    # The closest one: in a half-precision table neighbouring large windows can both lie within the tolerance.
    distance, best = min((_table_distance(table, p, what), p) for p in candidates)
    if distance <= _table_tolerance(table):
        return 0 if best == window else best
    raise ConversionError(
        f"{what}: not the relative_coords_table of a {window}x{window} window for any pretrained window (tried "
        f"{sorted({window, guess})}); the file's buffers are damaged or were not built by the SwinV2 rule"
    )


def pretrained_windows_from_tables(state_dict: Mapping[str, torch.Tensor], depths: list[int]) -> list[int] | None:
    """Per stage, the pretrained window read from the stored relative_coords_table buffers (official files).

    Returns:
        One value per stage (0 = the stage's own window), or None when a stage has no stored table.

    Raises:
        ConversionError: blocks of one stage were built with different pretrained windows.
    """
    out = []
    for i, depth in enumerate(depths):
        found: dict[int, list[int]] = {}
        for j in range(depth):
            key = f"layers.{i}.blocks.{j}.attn.relative_coords_table"
            if key in state_dict:
                found.setdefault(pretrained_window_from_table(state_dict[key], key), []).append(j)
        if not found:
            return None
        if len(found) > 1:
            detail = ", ".join(f"blocks {blocks}: {p}" for p, blocks in sorted(found.items()))
            raise ConversionError(
                f"stage {i}: its relative_coords_table buffers disagree on the pretrained window ({detail}; 0 = the "
                f"block's own window); every block of a stage is built with the same one"
            )
        out.append(next(iter(found)))
    return out


def spec_from_config(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> ModelSpec:
    """Architecture from the weights, sizes from a resolved training config dict (its ``model`` section)."""
    spec = infer_spec(state_dict)
    model = dict(config.get("model", {}))
    spec.img_size = int(model["img_size"]) if model.get("img_size") is not None else None
    spec.window_size = _per_stage(model.get("window_size"), len(spec.depths))
    pretrained = model.get("pretrained_window_sizes")
    if pretrained is not None:
        spec.pretrained_window_sizes = _per_stage(list(pretrained), len(spec.depths)) or spec.pretrained_window_sizes
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


# ------------------------------------------------------------------------------------------------------- detection
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


# --------------------------------------------------------------------------------------------------- HF key mapping
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


def _replace_prefix(rest: str, table: Mapping[str, str]) -> str | None:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old) :]
    return None


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
        match = _BLOCK.match(key)
        if match:
            rest = key[match.end() :]
            hb = f"{base}encoder.layers.{match.group(1)}.blocks.{match.group(2)}."
            if rest == "attn.qkv.weight":
                # Rows [0:C] query, [C:2C] key, [2C:3C] value; cloned so that each is its own storage on save.
                for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                    out[f"{hb}attention.self.{name}.weight"] = part.clone()
                continue
            new = _replace_prefix(rest, _HF_BLOCK)
            if new is None:
                unmapped.append(key)
                continue
            out[hb + new] = value
        elif key.startswith("layers.") and ".downsample." in key:
            out[base + "encoder." + key] = value
        elif key.startswith("head."):
            out["classifier." + key[len("head.") :]] = value
        elif key.startswith("decoder."):
            out[key] = value
        else:
            new = _replace_prefix(key, _HF_TOP)
            if new is None:
                unmapped.append(key)
                continue
            out[base + new] = value
    if unmapped:
        raise ConversionError(f"HF Swinv2 has no counterpart for these keys: {_short_list(unmapped)}")
    return out


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
        if bare.startswith("encoder.layers."):
            rest = bare[len("encoder.") :]
            match = _BLOCK.match(rest)
            if match:
                ob = rest[: match.end()]
                tail = rest[match.end() :]
                qkv_match = re.fullmatch(r"attention\.self\.(query|key|value)\.weight", tail)
                if qkv_match:
                    qkv.setdefault(ob, {})[qkv_match.group(1)] = value
                    continue
                new = _replace_prefix(tail, _HF_BLOCK_INV)
                if new is None:
                    unmapped.append(key)
                    continue
                out[ob + new] = value
            else:
                out[rest] = value
        elif bare.startswith("classifier."):
            out["head." + bare[len("classifier.") :]] = value
        elif bare.startswith("decoder."):
            out[bare] = value
        else:
            new = _replace_prefix(bare, _HF_TOP_INV)
            if new is None:
                unmapped.append(key)
                continue
            out[new] = value
    for ob, parts in qkv.items():
        missing = [p for p in ("query", "key", "value") if p not in parts]
        if missing:
            raise ConversionError(f"HF block {ob} lacks attention {', '.join(missing)} weights")
        out[ob + "attn.qkv.weight"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if unmapped:
        raise ConversionError(f"keys with no official counterpart: {_short_list(unmapped)}")
    return out


def hf_config(spec: ModelSpec, architecture: str) -> dict[str, Any]:
    """An HF ``config.json`` dict for ``spec`` (HF has one window size for all stages and no extra norms)."""
    spec.require_sizes("export to HF")
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
        "window_size": uniform,
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


# ------------------------------------------------------------------------------------------------- other mappings
def rename_legacy(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Early official releases call the position-bias MLP ``rpe_mlp``; the code calls it ``cpb_mlp``."""
    return {k.replace("rpe_mlp", "cpb_mlp"): v for k, v in state_dict.items()}


def backbone_from_simmim(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SimMIM keys -> backbone keys (spec §3.8): keep ``encoder.*`` minus the prefix, drop decoder, mask token and
    derived buffers, rename ``rpe_mlp``."""
    out = {k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    out.pop("mask_token", None)
    return rename_legacy(strip_derived_buffers(out))


def official_buffers(model: SwinTransformerV2) -> dict[str, torch.Tensor]:
    """The derived buffers the official code keeps in its state dict, taken from a built model (same values).

    relative_coords_table and relative_position_index on every block's attention, attn_mask on shifted blocks only
    (the official code registers None on the others, which state_dict() skips).
    """
    out = {}
    for name, buf in model.named_buffers():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("relative_coords_table", "relative_position_index", "attn_mask"):
            out[name] = buf.detach().clone()
    return out


def check_weights(state_dict: Mapping[str, torch.Tensor], spec: ModelSpec, what: str, *, simmim: bool = False) -> None:
    """Check keys and shapes against our SwinV2 (or SimMIM) for ``spec``, built on the meta device (no memory).

    Neither keys nor shapes depend on the image or window size, apart from the derived buffers (ignored here) and
    the absolute position embedding, so when the sizes are unknown a placeholder geometry is built and only that
    embedding's shape goes unchecked.

    Args:
        state_dict: ours layout (backbone/classifier) or, with ``simmim``, the SimMIM layout.
        spec: the architecture; ``img_size``/``window_size`` may be None.
        what: start of the error message (which file, which step).
        simmim: expect ``encoder.*`` + ``encoder.mask_token`` + ``decoder.0.*``.

    Raises:
        ConversionError: listing missing, unexpected and shape-mismatched keys by name.
    """
    probe = ModelSpec.from_dict(spec.to_dict())
    placeholder = probe.img_size is None or probe.window_size is None
    if placeholder:
        # Stage sides 2^(n-1) ... 1 with windows at least as large: every window is clamped, nothing is shifted.
        side = 2 ** (len(probe.depths) - 1)
        probe.img_size, probe.window_size = probe.patch_size * side, [side] * len(probe.depths)
        probe.pretrained_window_sizes = [0] * len(probe.depths)
    model = probe.build("meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if simmim:
        expected = {"encoder." + k: shape for k, shape in expected.items()}
        # The decoder is a 1x1 conv to stride^2 * in_chans channels, stride = the encoder's total downsampling.
        out = (probe.patch_size * 2 ** (len(probe.depths) - 1)) ** 2 * probe.in_chans
        expected["encoder.mask_token"] = (1, 1, probe.embed_dim)
        expected["decoder.0.weight"] = (out, model.num_features, 1, 1)
        expected["decoder.0.bias"] = (out,)
    ignore = {k for k in expected if k.endswith("absolute_pos_embed")} if placeholder else set()
    _compare_shapes(strip_derived_buffers(state_dict), expected, what, ignore_shapes=ignore)


def _compare_shapes(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    what: str,
    ignore_shapes: set[str] | frozenset[str] = frozenset(),
) -> None:
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(state_dict))
        if k not in ignore_shapes and tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_short_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_short_list(mismatched)}")
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))


def _short_list(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


# ------------------------------------------------------------------------------------------------------ file I/O
def load_weights_file(
    path: str | Path, *, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a weights file without copying it into memory where the format allows it.

    safetensors are memory-mapped; pickled files go through ``torch.load(mmap=True, weights_only=True)``.

    Args:
        path: a .safetensors file or a torch pickle (.pth/.pt/.bin/.ckpt).
        trust_pickle: allow arbitrary Python objects in a pickle (official training checkpoints store a yacs
            config object); only for files you trust.

    Returns:
        (state_dict, our metadata or {}, other top-level entries of a pickle container such as ``config``).
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.name.endswith(("model_states.pt", "optim_states.pt")):
        raise ConversionError(f"{path}: {layout_hint('deepspeed-model-states')}")
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            names = list(handle.keys())  # safe_open has keys() but no __iter__
            tensors = {k: handle.get_tensor(k) for k in names}
        meta = json.loads(header[META_KEY]) if META_KEY in header else {}
        return tensors, meta, {}
    obj = _torch_load(path, trust_pickle=trust_pickle)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors or a checkpoint dict")
    meta = dict(obj.get(META_KEY) or {})
    for container in ("model", "state_dict", "module"):
        inner = obj.get(container)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            if container == "module" and ("buffer_names" in obj or "ds_version" in obj):
                raise ConversionError(f"{path}: {layout_hint('deepspeed-model-states')}")
            extra = {k: v for k, v in obj.items() if k not in (container, META_KEY)}
            return dict(inner), meta, extra
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConversionError(f"{path}: no tensors found (top-level keys: {_short_list(sorted(map(str, obj)))})")
    return tensors, meta, {}


def _torch_load(path: Path, *, trust_pickle: bool) -> Any:
    mmap = zipfile.is_zipfile(path)  # the legacy (pre-1.6) format cannot be memory-mapped
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=not trust_pickle)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError depending on the content
        if not trust_pickle and "weights_only" in str(err):
            raise ConversionError(
                f"{path}: the pickle holds Python objects besides tensors (official training checkpoints keep a "
                f"config object); rerun with --trust-pickle if you trust where the file comes from"
            ) from err
        raise ConversionError(f"{path}: cannot be read as a torch checkpoint: {err}") from err


@contextmanager
def write_atomically(output: Path, *, force: bool, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``output``; rename it onto ``output`` only when the body succeeds.

    Args:
        output: final file or directory.
        force: replace an existing output; without it an existing output raises before any work.
        directory: the temporary path is a fresh directory (HF exports, universal checkpoints).
    """
    output = Path(output)
    if output.exists() and not force:
        raise ConversionError(f"{output} exists; pass --force to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    target = tmp if directory else tmp / output.name
    try:
        yield target
        _replace(target, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(new: Path, output: Path) -> None:
    """Put ``new`` at ``output``, never leaving a moment where a crash loses both.

    A file over a file is one atomic os.replace. A directory (or anything over one) cannot be swapped in one step:
    the old output is renamed aside first, the new one renamed into place, and only then is the old one deleted. A
    crash in between leaves the old output whole under ``.<name>.*.old/``.
    """
    if not (output.exists() or output.is_symlink()) or (not new.is_dir() and not output.is_dir()):
        os.replace(new, output)
        return
    aside_dir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
    aside = aside_dir / output.name
    os.replace(output, aside)
    try:
        os.replace(new, output)
    except BaseException:
        os.replace(aside, output)  # put the old output back
        shutil.rmtree(aside_dir, ignore_errors=True)
        raise
    shutil.rmtree(aside_dir, ignore_errors=True)  # removes a symlink inside, never what it points to


def _saveable(state_dict: Mapping[str, torch.Tensor], cast: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """Contiguous tensors that own their storage (safetensors refuses shared memory), cast as asked."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in state_dict.items():
        value = cast(value.detach()).contiguous()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        if ident in seen or value.untyped_storage().nbytes() != value.numel() * value.element_size():
            value = value.clone()
        seen.add(ident)
        out[key] = value
    return out


def cast_fn(dtype: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Cast floating tensors to fp32/bf16/fp16 (None: keep); integer tensors are never cast."""
    if dtype is None:
        return lambda t: t
    target = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return lambda t: t.to(target) if t.is_floating_point() else t


def save_weights_file(
    path: Path,
    state_dict: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any] | None,
    *,
    dtype: str | None = None,
    pth_wrapper: str | None = "model",
) -> None:
    """Write weights to ``path`` (format from the suffix: .safetensors, or a torch pickle).

    Args:
        path: destination (write through :func:`write_atomically`).
        state_dict: tensors to save.
        meta: our metadata (JSON-able), stored in the safetensors header or next to the weights in the pickle.
        dtype: fp32/bf16/fp16 for floating tensors; None keeps them.
        pth_wrapper: pickles store ``{pth_wrapper: state_dict, META_KEY: meta}`` (official style ``model``), or the
            bare state dict when None.
    """
    tensors = _saveable(state_dict, cast_fn(dtype))
    if Path(path).suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import save_file

        header = {"format": "pt"}
        if meta is not None:
            header[META_KEY] = json.dumps(meta, default=str)
        save_file(tensors, str(path), metadata=header)
    else:
        if pth_wrapper is None:
            torch.save(tensors, path)
        else:
            obj: dict[str, Any] = {pth_wrapper: tensors}
            if meta is not None:
                obj[META_KEY] = json.loads(json.dumps(meta, default=str))
            torch.save(obj, path)
