"""timm's data pieces for fine-tuning: the training and evaluation transforms, Mixup/CutMix and the matching loss.

timm is imported here only (the ``finetune`` extra): they are the field's standard implementations of RandAugment,
random erasing, Mixup/CutMix and the soft-target losses, and the official SwinV2/SimMIM fine-tuning uses them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image, ImageOps
from torch import nn

from .config import AugmentConfig

__all__ = ["build_criterion", "build_mixup", "eval_transform", "require_timm", "train_transform"]


def require_timm() -> Any:
    """The timm module, or an ImportError that says how to install it."""
    try:
        import timm.data
        import timm.loss
    except ImportError as exc:
        raise ImportError(
            f"fine-tuning needs timm (its transforms, Mixup and losses): pip install 'swinv2-pretrain[finetune]' "
            f"({exc})"
        ) from None
    return timm


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, except that keeping 0 bits gives the black image Pillow gave before version 13 (which
    raises "bits must be between or equal to 1 and 8"): RandAugment's ``PosterizeIncreasing`` asks for 0 bits at
    magnitude 10, which ``rand-m9-mstd0.5`` reaches for about 0.15% of the images."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def train_transform(aug: AugmentConfig, img_size: int) -> Callable[[Any], torch.Tensor]:
    """RandomResizedCrop, flip, RandAugment (or colour jitter), normalisation and random erasing (spec §3.7)."""
    timm = require_timm()
    transform = timm.data.create_transform(
        input_size=img_size,
        is_training=True,
        scale=tuple(aug.crop_scale),
        ratio=tuple(aug.crop_ratio),
        hflip=aug.hflip,
        color_jitter=aug.color_jitter if aug.color_jitter > 0 else None,
        auto_augment=aug.auto_augment or None,
        interpolation=aug.interpolation,
        mean=tuple(aug.mean),
        std=tuple(aug.std),
        re_prob=aug.reprob,
        re_mode=aug.remode,
        re_count=aug.recount,
    )
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):  # RandAugment's operations
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def eval_transform(aug: AugmentConfig, img_size: int) -> Callable[[Any], torch.Tensor]:
    """Resize to img_size / eval_crop_pct, centre crop img_size, normalise (official TEST.CROP)."""
    timm = require_timm()
    return timm.data.create_transform(
        input_size=img_size,
        is_training=False,
        interpolation=aug.interpolation,
        mean=tuple(aug.mean),
        std=tuple(aug.std),
        crop_pct=aug.eval_crop_pct,
    )


def build_mixup(aug: AugmentConfig, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], Any] | None:
    """timm's Mixup/CutMix with label smoothing folded into its soft targets, or None when mixing is off."""
    if not aug.mixes:
        return None
    timm = require_timm()
    return timm.data.Mixup(
        mixup_alpha=aug.mixup,
        cutmix_alpha=aug.cutmix,
        cutmix_minmax=tuple(aug.cutmix_minmax) if aug.cutmix_minmax is not None else None,
        prob=aug.mixup_prob,
        switch_prob=aug.mixup_switch_prob,
        mode=aug.mixup_mode,
        label_smoothing=aug.label_smoothing,
        num_classes=num_classes,
    )


def build_criterion(aug: AugmentConfig, mixing: bool) -> nn.Module:
    """Soft-target cross-entropy with Mixup (whose targets carry the smoothing), else label-smoothing or plain
    cross-entropy (the official ``main_simmim_ft.py`` choice)."""
    timm = require_timm()
    if mixing:
        return timm.loss.SoftTargetCrossEntropy()
    if aug.label_smoothing > 0:
        return timm.loss.LabelSmoothingCrossEntropy(smoothing=aug.label_smoothing)
    return nn.CrossEntropyLoss()
