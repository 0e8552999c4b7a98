"""Image files and decoding: which files are images, and one conversion of every PIL mode to 8-bit RGB.

PIL's own ``convert("RGB")`` clips 16-bit and 32-bit integer images to 255 (a 16-bit photo turns white) and drops
alpha onto black. :func:`to_rgb` scales instead and composites transparency onto :data:`ALPHA_BACKGROUND`; the folder
loader, the shard loader and the shard writer all use it, so an image looks the same whichever path it takes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["ALPHA_BACKGROUND", "IMAGE_EXTENSIONS", "SHARD_IMAGE_KEYS", "decode_image", "open_image", "to_rgb"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Entries of a shard sample that hold the image, in order of preference.
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# Transparent pixels are composited on white: scanned documents, logos and product photos with alpha are drawn on
# white where they are meant to be seen, and white is what most viewers show.
ALPHA_BACKGROUND = (255, 255, 255)

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    rgb = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, mode="L").convert("RGB")


def _scale_wide(values: np.ndarray, full_scale: float) -> np.ndarray:
    """Values of a 16-bit, 32-bit or float image on 0..255: by ``full_scale`` when they lie in [0, full_scale], else
    stretched from their minimum to their maximum (signed or out-of-range data has no fixed white)."""
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= full_scale:
        return values * (255.0 / full_scale)
    if high == low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))


def _numeric_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        # Floats in [0, 1] are normalised intensities; floats in [0, 255] already 8-bit values.
        low, high = float(values.min()), float(values.max())
        if low >= 0 and high <= 1:
            return _gray_to_rgb(values * 255.0)
        return _gray_to_rgb(_scale_wide(values, 255.0))
    # "I" (32-bit) most often holds 16-bit data (PIL opens some 16-bit PNGs and TIFFs so): 65535 is white.
    return _gray_to_rgb(_scale_wide(values, 65535.0))


def _composite(image: Image.Image) -> Image.Image:
    rgba = np.asarray(image.convert("RGBA")).astype(np.uint32)
    alpha = rgba[..., 3:4]
    background = np.asarray(ALPHA_BACKGROUND, dtype=np.uint32)
    mixed = (rgba[..., :3] * alpha + background * (255 - alpha) + 127) // 255
    return Image.fromarray(mixed.astype(np.uint8), mode="RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: 16-bit, 32-bit and float images scaled (not clipped), palette and CMYK converted,
    transparency composited on :data:`ALPHA_BACKGROUND`.

    Args:
        image: a loaded PIL image of any mode.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT:
        return _gray_to_rgb(np.asarray(image).astype(np.float64) * (255.0 / 65535.0))
    if mode in ("I", "F"):
        return _numeric_to_rgb(image)
    if mode in _ALPHA or "transparency" in image.info:
        return _composite(image)
    return image.convert("RGB")


def _decoded(image: Image.Image) -> Image.Image:
    try:
        image.load()
        rgb = to_rgb(image)
    except BaseException:
        image.close()
        raise
    if rgb is not image:  # the RGB image is a new one: the source can go (an RGB source is returned as it is)
        image.close()
    return rgb


def decode_image(data: bytes) -> Image.Image:
    """Fully decode encoded image bytes to RGB (raises on anything PIL cannot decode)."""
    return _decoded(Image.open(io.BytesIO(data)))


def open_image(path: str | Path) -> Image.Image:
    """Fully decode the image file at ``path`` to RGB (raises on anything PIL cannot decode)."""
    return _decoded(Image.open(path))
