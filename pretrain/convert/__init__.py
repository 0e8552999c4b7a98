"""Checkpoint conversion: ``python -m pretrain.convert SUBCOMMAND ...`` (console script ``swinv2-convert``).

Subcommands:
  consolidate  DeepSpeed checkpoint (any ZeRO stage / world size) -> one weights file with metadata
  backbone     SimMIM checkpoint (ours or official) -> backbone weights ready for fine-tuning
  import       official / timm / HF weights -> ours
  export       ours -> timm / HF directory / official layout
  universal    DeepSpeed checkpoint -> DeepSpeed universal checkpoint (resume at another world size)
  inspect      show what a checkpoint file or directory holds

Every output is written under a temporary name and renamed; an existing output needs --force. Bad inputs end with
one line ``error: ...`` naming what was found and what is accepted (exit code 2).

Modules: :mod:`.cli` (the dispatch table), :mod:`.consolidate` (with :mod:`.masters` for stage-0 fp32 masters),
:mod:`.backbone`, :mod:`.imports` and :mod:`.export` (one function per source or target format), :mod:`.sizes`
(image, window and pretrained-window sizes), :mod:`.inspect`. Universal conversion lives with the checkpoints
(:func:`pretrain.checkpoint.to_universal`), since the trainer uses it too.
"""

from ..checkpoint import read_client_state, resolve_checkpoint, to_universal
from .backbone import make_backbone
from .cli import main
from .consolidate import consolidate, name_master_weights
from .export import export
from .imports import import_weights
from .inspect import inspect_path

__all__ = [
    "consolidate",
    "export",
    "import_weights",
    "inspect_path",
    "main",
    "make_backbone",
    "name_master_weights",
    "read_client_state",
    "resolve_checkpoint",
    "to_universal",
]
