"""Checkpoint layouts of SwinV2 weights and the mappings between them (spec §2.3).

Layouts (names used in messages and on the command line):

- ``ours``: the official Microsoft key names without prefix (backbone or classifier; ``head.*``). Our own files carry
  a metadata record; official files carry the derived buffers as persistent entries.
- ``simmim``: the official SimMIM layout, ``encoder.*`` + ``encoder.mask_token`` + ``decoder.0.*`` (our SimMIM model
  has the same keys).
- ``timm``: timm's ``SwinTransformerV2`` (downsample at the start of the next stage, ``head.fc.*``).
- ``hf``: HF transformers ``Swinv2Model`` (no prefix) or ``Swinv2For*`` (``swinv2.`` prefix, ``classifier.*`` or
  ``decoder.0.*``), separate query/key/value projections.

The official <-> timm key shift lives in :mod:`swinv2.checkpoint_keys` and stage geometry in :mod:`swinv2.geometry`.
This package adds, one concern per module:

- :mod:`.spec`: :class:`ModelSpec`, the architecture read from tensor shapes, a training config or an HF config;
- :mod:`.tables`: what stored ``relative_coords_table`` buffers say about the pretrained windows;
- :mod:`.layouts`: layout detection and the SimMIM -> backbone mapping;
- :mod:`.hf`: the HF key map and ``config.json``;
- :mod:`.checks`: key and shape checks against the model;
- :mod:`.files`: safe reading (one-line errors for damaged files) and atomic writing.
"""

from swinv2 import official_to_timm, strip_derived_buffers, timm_to_official
from swinv2.geometry import effective_windows

from .checks import check_weights
from .common import LAYOUTS, META_KEY, PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, ConversionError, short_list
from .files import cast_fn, load_weights_file, save_weights_file, torch_file_kind, write_atomically
from .hf import hf_config, hf_to_official, official_to_hf
from .layouts import backbone_from_simmim, detect_layout, layout_hint, rename_legacy
from .spec import ModelSpec, infer_spec, spec_from_config, spec_from_hf_config
from .tables import (
    coords_table_matches,
    official_buffers,
    pretrained_window_from_table,
    pretrained_windows_from_tables,
)

__all__ = [
    "LAYOUTS",
    "META_KEY",
    "PICKLE_SUFFIXES",
    "SAFETENSORS_SUFFIXES",
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
    "short_list",
    "spec_from_config",
    "spec_from_hf_config",
    "strip_derived_buffers",
    "timm_to_official",
    "torch_file_kind",
    "write_atomically",
]
