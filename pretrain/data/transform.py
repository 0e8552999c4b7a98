"""The SimMIM pretraining transform: RandomResizedCrop -> horizontal flip -> tensor -> normalise, plus a mask."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from ..masking import MaskGenerator
from .images import to_rgb

if TYPE_CHECKING:
    from ..config import PretrainConfig

__all__ = ["SimMIMTransform"]


class SimMIMTransform:
    """RandomResizedCrop -> horizontal flip -> tensor -> normalise, plus a SimMIM mask; all randomness from ``rng``.

    torchvision's transforms draw from the global torch generator, which makes samples depend on worker scheduling;
    the crop parameters are drawn here with the same algorithm from an explicit numpy generator instead.

    Args:
        cfg: the configuration (model.img_size, data crop/flip/normalisation, simmim mask settings).
    """

    def __init__(self, cfg: PretrainConfig) -> None:
        self.size = cfg.model.img_size
        self.scale = tuple(cfg.data.crop_scale)
        self.ratio = tuple(cfg.data.crop_ratio)
        self.hflip = cfg.data.hflip
        # torchvision's RandomResizedCrop default, which the official SimMIM pretraining uses (spec 3.1); the
        # fine-tuning transforms use bicubic instead, so the choice is spelled out here.
        self.interpolation = TF.InterpolationMode.BILINEAR
        self.mean = list(cfg.data.mean)
        self.std = list(cfg.data.std)
        self.mask_generator = MaskGenerator(
            cfg.model.img_size, cfg.simmim.mask_patch_size, cfg.model.patch_size, cfg.simmim.mask_ratio
        )

    def crop_params(self, rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a random crop covering ``scale`` of the area with aspect in ``ratio``."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        # Fallback (as torchvision): the largest centred crop with the aspect ratio clamped into range.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised image tensor, mask) of one decoded image, every random draw from ``rng``."""
        image = to_rgb(image)
        top, left, h, w = self.crop_params(rng, *image.size)
        image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], self.interpolation, antialias=True)
        if rng.random() < self.hflip:
            image = TF.hflip(image)
        tensor = TF.normalize(TF.to_tensor(image), self.mean, self.std)
        return tensor, torch.from_numpy(self.mask_generator(rng))
