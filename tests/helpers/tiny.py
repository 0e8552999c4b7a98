"""The smallest SwinV2 that still has four stages: the model overrides the in-process tests share."""

from __future__ import annotations

# The architecture: one block per stage, heads 1-2-2-4 over 16-32-64-128 channels.
TINY_BACKBONE = [
    "model.size=tiny",
    "model.embed_dim=16",
    "model.depths=[1,1,1,1]",
    "model.num_heads=[1,2,2,4]",
]
# For SimMIM: 64-px images, window 4 (stage resolutions 16, 8, 4, 2), mask patches of 16 px.
TINY_MODEL = [*TINY_BACKBONE, "model.img_size=64", "model.window_size=4", "simmim.mask_patch_size=16"]
