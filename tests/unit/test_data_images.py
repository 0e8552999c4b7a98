"""One conversion to 8-bit RGB for every mode, used by the folder loader, the shard loader and the shard writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain.config import load_config
from pretrain.data import ALPHA_BACKGROUND, build_pretrain_loader, resolve_source, to_rgb
from pretrain.shards import write_shards

MODEL = ["model.img_size=64", "model.window_size=4", "simmim.mask_patch_size=16", "data.num_workers=0"]


def modes() -> dict[str, tuple[Image.Image, tuple[int, int, int]]]:
    """Images of many modes and the RGB a user expects of their pixels."""
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    transparent = palette.copy()
    transparent.info["transparency"] = 1
    return {
        "I;16": (Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)), (156, 156, 156)),
        "I;16B": (Image.fromarray(np.full((8, 8), 40000, dtype=">u2")), (156, 156, 156)),
        "I": (Image.fromarray(np.full((8, 8), 65535, dtype=np.int32)), (255, 255, 255)),
        "I wide": (Image.fromarray(np.array([[0, 200000]] * 4, dtype=np.int32)), (0, 0, 0)),
        "F unit": (Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)), (128, 128, 128)),
        "F bytes": (Image.fromarray(np.full((8, 8), 100.0, dtype=np.float32)), (100, 100, 100)),
        "P": (palette, (10, 200, 30)),
        "P transparent": (transparent, ALPHA_BACKGROUND),
        "LA": (Image.new("LA", (8, 8), (0, 0)), ALPHA_BACKGROUND),
        "RGBA half": (Image.new("RGBA", (8, 8), (0, 0, 0, 128)), (127, 127, 127)),
        "CMYK": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
        "1": (Image.new("1", (8, 8), 1), (255, 255, 255)),
    }


@pytest.mark.parametrize("name", list(modes()))
def test_to_rgb_scales_and_composites(name: str) -> None:
    image, expected = modes()[name]
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == expected
    if name == "I wide":  # stretched from minimum to maximum
        assert rgb.getpixel((1, 0)) == (255, 255, 255)


def test_sixteen_bit_png_is_not_saturated_in_either_loader(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 40), 20000 + 1000 * i, dtype=np.uint16)).save(folder / f"deep{i}.png")
    write_shards(folder, tmp_path / "shards", maxcount=4, progress=False)
    expected = sorted(round((20000 + 1000 * i) * 255 / 65535) for i in range(4))
    for extra in (["data.source=folder", f"data.path={folder}"], [f"data.path={tmp_path}/shards"]):
        cfg = load_config(None, [*MODEL, *extra, "data.batch_size=4", "data.shuffle_buffer=1", "data.hflip=0"])
        (batch,) = list(build_pretrain_loader(cfg, resolve_source(cfg.data, 1), rank=0, world_size=1))
        red = batch["images"][:, 0, 0, 0] * cfg.data.std[0] + cfg.data.mean[0]
        assert sorted(round(float(r) * 255) for r in red) == expected, extra  # PIL alone would give 255 each
