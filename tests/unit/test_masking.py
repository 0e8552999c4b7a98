"""SimMIM mask generator: exact counts, upsampling to the token grid, reproducibility, argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pretrain.masking import MaskGenerator


def test_official_geometry_and_exact_count() -> None:
    gen = MaskGenerator(input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    assert (gen.cells_per_side, gen.scale, gen.mask_count, gen.token_grid) == (6, 8, 22, 48)
    for seed in range(20):
        mask = gen(np.random.default_rng(seed))
        assert mask.shape == (48, 48)
        assert set(np.unique(mask).tolist()) == {0, 1}
        # 22 masked cells of 8 x 8 tokens each, every draw (not on average).
        assert int(mask.sum()) == 22 * 64
        cells = mask.reshape(6, 8, 6, 8)
        # Every 8 x 8 block is constant: the mask is a cell mask upsampled by repetition.
        assert (cells == cells[:, :1, :, :1]).all()
        assert int(cells[:, 0, :, 0].sum()) == 22


@pytest.mark.parametrize(("size", "cell", "patch", "ratio"), [(96, 16, 4, 0.6), (64, 32, 4, 0.5), (224, 32, 4, 0.75)])
def test_other_geometries(size: int, cell: int, patch: int, ratio: float) -> None:
    gen = MaskGenerator(size, cell, patch, ratio)
    cells = (size // cell) ** 2
    mask = gen(np.random.default_rng(0))
    assert mask.shape == (size // patch, size // patch)
    assert int(mask.sum()) == math.ceil(cells * ratio) * (cell // patch) ** 2


def test_reproducible_and_seed_dependent() -> None:
    gen = MaskGenerator()
    a = gen(np.random.default_rng([1, 2, 3]))
    b = gen(np.random.default_rng([1, 2, 3]))
    c = gen(np.random.default_rng([1, 2, 4]))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_every_cell_equally_likely() -> None:
    gen = MaskGenerator()
    rng = np.random.default_rng(0)
    freq = np.mean([gen(rng)[::8, ::8] for _ in range(3000)], axis=0)
    # Each cell is masked with probability 22/36; 3000 draws give a standard error of about 0.009.
    assert np.abs(freq - 22 / 36).max() < 0.05


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((200, 32, 4, 0.6), "input_size 200"),
        ((192, 30, 4, 0.6), "mask_patch_size 30"),
        ((192, 32, 4, 1.0), "mask_ratio"),
    ],
)
def test_bad_arguments(args: tuple, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        MaskGenerator(*args)
