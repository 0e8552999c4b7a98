"""What every part of :mod:`pretrain.formats` shares: the error type, our metadata key and the file suffixes."""

from __future__ import annotations

__all__ = ["LAYOUTS", "META_KEY", "PICKLE_SUFFIXES", "SAFETENSORS_SUFFIXES", "ConversionError", "short_list"]

LAYOUTS = ("ours", "simmim", "timm", "hf")
# Key of our metadata record: safetensors header metadata entry, or top-level key of a .pth dict.
META_KEY = "swinv2_pretrain"
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class ConversionError(ValueError):
    """A bad input, option or output for a conversion; the message says what was found and what is accepted."""


def short_list(items: list[str], limit: int = 12) -> str:
    """``items`` joined by commas, the first ``limit`` of them, with a count of the rest."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
