"""SimMIM: a SwinV2 encoder with a mask token, a one-layer pixel decoder and an L1 loss on masked pixels (spec §3).

State-dict keys equal the official SimMIM ones (``encoder.*``, ``encoder.mask_token``, ``decoder.0.*``), so
official SimMIM checkpoints and ours convert with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from swinv2 import SwinTransformerV2, param_groups

from .backbone import backbone_kwargs
from .checks import require

if TYPE_CHECKING:
    from .config import PretrainConfig

__all__ = [
    "SimMIM",
    "SimMIMConfig",
    "SwinTransformerV2ForSimMIM",
    "build_simmim",
    "normalized_target",
    "pixel_mask",
    "reconstruction_in_input_space",
    "simmim_param_groups",
]


@dataclass
class SimMIMConfig:
    mask_patch_size: int = 32
    mask_ratio: float = 0.6
    norm_target: bool = True
    norm_target_patch_size: int = 47
    # The official SimMIM code weight-decays cpb_mlp weights and logit_scale through a name-prefix bug
    # (spec 3.6). False (default) excludes them as the backbone's own no-decay lists intend; True reproduces
    # the official training dynamics.
    decay_position_bias: bool = False

    def check(self, patch_size: int, img_size: int) -> None:
        """The section's own ranges, and the mask geometry against the model's patch and image size."""
        require(
            self.mask_patch_size > 0 and self.mask_patch_size % patch_size == 0,
            f"simmim.mask_patch_size={self.mask_patch_size} must be a positive multiple of "
            f"model.patch_size={patch_size}",
        )
        require(
            img_size % self.mask_patch_size == 0,
            f"simmim.mask_patch_size={self.mask_patch_size} must divide model.img_size={img_size}",
        )
        require(0.0 < self.mask_ratio < 1.0, f"simmim.mask_ratio={self.mask_ratio}; accepted: 0 < mask_ratio < 1")
        require(
            self.norm_target_patch_size > 0 and self.norm_target_patch_size % 2 == 1,
            f"simmim.norm_target_patch_size={self.norm_target_patch_size}; accepted: a positive odd integer",
        )


class SwinTransformerV2ForSimMIM(SwinTransformerV2):
    """SwinV2 backbone whose masked patch tokens are replaced by a learnable mask token after the patch-embed norm.

    Takes the ``SwinTransformerV2`` arguments (``num_classes`` is forced to 0: no head).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs["num_classes"] = 0
        super().__init__(**kwargs)
        # Initialised here, in the __init__ that owns it, so DeepSpeed zero.Init partitions an initialised tensor.
        self.mask_token = nn.Parameter(torch.empty(1, 1, self.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-2.0, b=2.0)

    def init_weights(self) -> None:
        super().init_weights()
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-2.0, b=2.0)

    @property
    def encoder_stride(self) -> int:
        """Pixels per final-stage token (32 for 4-pixel patches and four stages)."""
        return self.patch_size * 2 ** (self.num_layers - 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Images (B, C, H, W) and token mask (B, H/patch, W/patch), 1 = masked -> feature map (B, C_last, h, w)."""
        tokens = self.embed(x)
        b, length, _ = tokens.shape
        if mask.shape[0] != b or mask[0].numel() != length:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not match {length} patch tokens per image "
                f"(expected (B, {self.patch_embed.patches_resolution[0]}, {self.patch_embed.patches_resolution[1]}))"
            )
        w = mask.flatten(1).unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1.0 - w) + self.mask_token.to(tokens.dtype) * w
        z = self.forward_tokens(tokens)
        h = self.img_size[0] // self.encoder_stride
        return z.transpose(1, 2).reshape(b, -1, h, self.img_size[1] // self.encoder_stride)


def _window_sums(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Sum of x over the in-bounds part of a centred ``patch_size`` square window, for every pixel (zero padding).

    Separable box filter through cumulative sums (a few operations per pixel, against k^2 = 2209 for a direct
    47 x 47 pool, which costs seconds per batch on a CPU). Callers pass float64 so that differences of running sums
    lose nothing.
    """
    pad = patch_size // 2
    for dim in (-2, -1):
        n = x.shape[dim]
        padding = (0, 0, pad + 1, pad) if dim == -2 else (pad + 1, pad)
        running = F.pad(x, padding).cumsum(dim)
        x = running.narrow(dim, patch_size, n) - running.narrow(dim, 0, n)
    return x


def _local_moments(x64: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, sqrt(var + 1e-6)) of float64 ``x64`` over each pixel's ``patch_size`` window (see normalized_target)."""
    if patch_size % 2 == 0:
        raise ValueError(f"norm target patch size {patch_size} must be odd (the window is centred on each pixel)")
    count = _window_sums(torch.ones_like(x64[:1, :1]), patch_size)  # in-bounds pixels of each window
    mean = _window_sums(x64, patch_size) / count
    mean_sq = _window_sums(x64 * x64, patch_size) / count
    var = ((mean_sq - mean * mean) * count / (count - 1)).clamp(min=0.0)
    return mean, (var + 1e-6).sqrt()


def normalized_target(x: torch.Tensor, patch_size: int = 47) -> torch.Tensor:
    """Per-channel local standardisation of the image over a ``patch_size`` window (the official NORM_TARGET).

    Same definition as the official code: mean and mean of squares over the in-bounds pixels of the window (padding
    not counted), unbiased variance (n / (n - 1)), clamped at 0, target = (x - mean) / sqrt(var + 1e-6). Statistics
    are accumulated in float64 and the result returned in x's dtype.
    """
    x64 = x.double()
    mean, scale = _local_moments(x64, patch_size)
    return ((x64 - mean) / scale).to(x.dtype)


def pixel_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Token mask (B, h, w) -> pixel mask (B, 1, h * patch_size, w * patch_size), 1 = masked."""
    return mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)


def reconstruction_in_input_space(
    reconstruction: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_target_patch_size: int | None,
) -> torch.Tensor:
    """A reconstruction as an image in the input's space (normalised pixels), as SimMIM's paper figures show it.

    With norm_target the model predicts the locally standardised image; the prediction is mapped back through the
    local mean and sqrt(var + 1e-6) of the input itself (the statistics the target was made with). Visible patches are
    then pasted from the input, so only the masked patches show the prediction. A perfect prediction gives the input.

    Args:
        reconstruction: the decoder's output (B, C, H, W) in target space.
        images: the model's input (B, C, H, W); mask: the token mask (B, H/patch, W/patch), 1 = masked.
        patch_size: pixels per token side; norm_target_patch_size: the standardisation window, None = norm_target off.
    """
    x64 = images.double()
    prediction = reconstruction.double()
    if norm_target_patch_size is not None:
        mean, scale = _local_moments(x64, norm_target_patch_size)
        prediction = prediction * scale + mean
    masked = pixel_mask(mask, patch_size).to(torch.bool)
    return torch.where(masked, prediction, x64).to(images.dtype)


class SimMIM(nn.Module):
    """Encoder + decoder (1x1 conv to stride^2 * 3 channels, PixelShuffle(stride)) + masked L1 loss.

    Args:
        encoder: the masked SwinV2 encoder.
        norm_target: regress the locally standardised image instead of the image (official SwinV2 recipe).
        norm_target_patch_size: window of the local standardisation.
    """

    def __init__(
        self, encoder: SwinTransformerV2ForSimMIM, norm_target: bool = True, norm_target_patch_size: int = 47
    ) -> None:
        super().__init__()
        self.encoder = encoder
        stride = encoder.encoder_stride
        self.in_chans = encoder.patch_embed.proj.in_channels
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, stride**2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(stride),
        )
        self.norm_target = norm_target
        self.norm_target_patch_size = norm_target_patch_size

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and the reconstruction (B, C, H, W) (in target space: standardised when norm_target is on)."""
        reconstruction = self.decoder(self.encoder(images, mask))
        # The loss is computed in float32 whatever the module dtype (DeepSpeed bf16/fp16 cast the whole module).
        target = self.target(images.float())
        weights = pixel_mask(mask, self.encoder.patch_size).to(torch.float32)
        error = F.l1_loss(reconstruction.float(), target, reduction="none")
        loss = (error * weights).sum() / (weights.sum() + 1e-5) / self.in_chans
        return loss, reconstruction

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder regresses for ``images``: the locally standardised image with norm_target, else the
        image (no graph: the target is data, and no gradient goes through the 47 x 47 statistics)."""
        with torch.no_grad():
            return normalized_target(images, self.norm_target_patch_size) if self.norm_target else images

    def to_input_space(self, reconstruction: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """:func:`reconstruction_in_input_space` with this model's patch size and norm_target setting."""
        window = self.norm_target_patch_size if self.norm_target else None
        return reconstruction_in_input_space(reconstruction, images, mask, self.encoder.patch_size, window)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked-pixel L1 loss (scalar)."""
        return self.reconstruct(images, mask)[0]

    def no_weight_decay(self) -> set[str]:
        return {"encoder." + n for n in self.encoder.no_weight_decay()} | {"encoder.mask_token"}

    def no_weight_decay_keywords(self) -> set[str]:
        # Unprefixed on purpose: the official wrapper prefixes them with "encoder.", so they never match (spec §3.6).
        return set(self.encoder.no_weight_decay_keywords())


def build_simmim(cfg: PretrainConfig) -> SimMIM:
    """The SimMIM model described by ``cfg.model`` and ``cfg.simmim`` (on the current default device / zero.Init)."""
    encoder = SwinTransformerV2ForSimMIM(**backbone_kwargs(cfg.model))
    return SimMIM(encoder, norm_target=cfg.simmim.norm_target, norm_target_patch_size=cfg.simmim.norm_target_patch_size)


def simmim_param_groups(model: SimMIM, cfg: PretrainConfig) -> list[dict]:
    """AdamW parameter groups for SimMIM pretraining.

    Never decayed: biases, 1-D parameters (norms, q/v biases), the mask token, the absolute position embedding.
    The continuous position-bias MLP weights and the logit scales are excluded from decay too (what the backbone's
    ``no_weight_decay_keywords`` intend), unless ``cfg.simmim.decay_position_bias`` is set: then they are decayed, as
    the official SimMIM code does through its name-prefix bug (spec §3.6), for identical training dynamics.
    """
    keywords = () if cfg.simmim.decay_position_bias else tuple(sorted(model.no_weight_decay_keywords()))
    return param_groups(
        model,
        weight_decay=cfg.optimizer.weight_decay,
        layer_decay=cfg.optimizer.layer_decay,
        no_decay_names=tuple(sorted(model.no_weight_decay())),
        no_decay_keywords=keywords,
    )
