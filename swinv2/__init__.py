"""Swin Transformer V2 backbone with official Microsoft key names, sizes T/S/B/L/H/G and training aids."""

from .checkpoint_keys import official_to_timm, strip_derived_buffers, timm_to_official
from .factory import MODEL_SIZES, compile_blocks, compile_counts, create_model, parse_checkpointing
from .param_groups import layer_id, param_groups
from .swin_transformer_v2 import SwinTransformerV2, choose_attn_impl

__all__ = [
    "MODEL_SIZES",
    "SwinTransformerV2",
    "choose_attn_impl",
    "compile_blocks",
    "compile_counts",
    "create_model",
    "layer_id",
    "official_to_timm",
    "param_groups",
    "parse_checkpointing",
    "strip_derived_buffers",
    "timm_to_official",
]
