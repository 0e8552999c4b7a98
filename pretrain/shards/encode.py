"""The per-image work of the shard writer (run in worker processes): read, check by decoding, keep or re-encode.

Rules: JPEG, PNG and WebP files are stored byte for byte; other formats (BMP, TIFF, GIF...) are converted with the
loaders' own :func:`pretrain.data.to_rgb` (16-bit and float images scaled, transparency composited on white) and
stored as PNG. With ``max_side``, an image whose longer side exceeds it is converted the same way, resized (bicubic,
antialiased) to that longer side and stored as JPEG at ``jpeg_quality``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..data import to_rgb
from ..data.urls import filesystem, url_kind

__all__ = ["EncodeOptions", "Encoded", "encode_file", "read_source"]

_STORED_AS_IS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


@dataclass(frozen=True)
class EncodeOptions:
    max_side: int | None = None
    jpeg_quality: int = 90
    storage_options: dict[str, Any] | None = None


@dataclass(frozen=True)
class Encoded:
    """One source file's result: the stored entry (``key``, ``data``) or the ``error`` that made it unreadable."""

    index: int
    key: str = ""
    data: bytes = b""
    bytes_in: int = 0
    reencoded: bool = False
    error: str = ""


def read_source(location: str, storage_options: dict[str, Any] | None) -> bytes:
    """The bytes of a source image (a local path or an fsspec URL)."""
    if url_kind(location) == "local":
        return Path(location).read_bytes()
    return filesystem(location, storage_options).cat_file(location)


def _resized_jpeg(image: Image.Image, max_side: int, quality: int) -> bytes:
    width, height = image.size
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if image.format == "JPEG":
        image.draft(None, size)  # decode at a reduced DCT scale that is still at least the target size
    image.load()
    rgb = to_rgb(image).resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def encode_bytes(data: bytes, suffix: str, options: EncodeOptions) -> tuple[str, bytes, bool]:
    """(extension key, stored bytes, re-encoded?) of one image; raises on anything PIL cannot fully decode."""
    with Image.open(io.BytesIO(data)) as image:
        if options.max_side and max(image.size) > options.max_side:
            return "jpg", _resized_jpeg(image, options.max_side, options.jpeg_quality), True
        image.load()
        key = _STORED_AS_IS.get(suffix.lower())
        if key is not None and (image.format or "").lower() in ("jpeg", "png", "webp"):
            return key, data, False
        buffer = io.BytesIO()
        to_rgb(image).save(buffer, format="PNG")
        return "png", buffer.getvalue(), False


def encode_file(task: tuple[int, str, EncodeOptions]) -> Encoded:
    """The worker function: ``(index, location, options)`` -> :class:`Encoded` (errors are results, not raised)."""
    index, location, options = task
    try:
        data = read_source(location, options.storage_options)
        key, stored, reencoded = encode_bytes(data, Path(location.split("?", 1)[0]).suffix, options)
    except Exception as exc:
        return Encoded(index, error=f"{type(exc).__name__}: {exc}")
    return Encoded(index, key, stored, len(data), reencoded)
