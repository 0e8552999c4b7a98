"""SimMIM random masking with the official semantics (spec §3.2).

The image is split into ``mask_patch_size`` cells; exactly ``ceil(cells * mask_ratio)`` of them are masked, then the
cell mask is upsampled to the model's token grid (one entry per ``model_patch_size`` pixels). Randomness comes from a
``numpy.random.Generator`` passed per call, so the caller decides what a mask depends on (seed, epoch, rank, worker,
sample index) and masks are reproducible.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["MaskGenerator"]


class MaskGenerator:
    """Draws SimMIM masks.

    Args:
        input_size: image side in pixels.
        mask_patch_size: side of a masked cell in pixels (32 in SimMIM); must divide ``input_size``.
        model_patch_size: side of a model token in pixels (the backbone's patch size); must divide ``mask_patch_size``.
        mask_ratio: fraction of cells to mask, in (0, 1); rounded up to a whole number of cells.
    """

    def __init__(
        self, input_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4, mask_ratio: float = 0.6
    ) -> None:
        if input_size % mask_patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of mask_patch_size {mask_patch_size}")
        if mask_patch_size % model_patch_size:
            raise ValueError(
                f"mask_patch_size {mask_patch_size} is not a multiple of model_patch_size {model_patch_size}"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio {mask_ratio}; accepted: 0 < mask_ratio < 1")
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.cells_per_side = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.cell_count = self.cells_per_side**2
        self.mask_count = math.ceil(self.cell_count * mask_ratio)

    @property
    def token_grid(self) -> int:
        """Side of the returned mask (tokens per image side)."""
        return self.cells_per_side * self.scale

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """One mask (token_grid, token_grid) of uint8, 1 = masked token."""
        cells = np.zeros(self.cell_count, dtype=np.uint8)
        cells[rng.permutation(self.cell_count)[: self.mask_count]] = 1
        cells = cells.reshape(self.cells_per_side, self.cells_per_side)
        return cells.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
