"""Key and shape checks of a state dict against the model its spec describes (built on the meta device)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from swinv2 import strip_derived_buffers

from .common import ConversionError, short_list
from .spec import ModelSpec

__all__ = ["check_weights"]


def check_weights(state_dict: Mapping[str, torch.Tensor], spec: ModelSpec, what: str, *, simmim: bool = False) -> None:
    """Check keys and shapes against our SwinV2 (or SimMIM) for ``spec``, built on the meta device (no memory).

    Neither keys nor shapes depend on the image or window size, apart from the derived buffers (ignored here) and
    the absolute position embedding, so when the sizes are unknown a placeholder geometry is built and only that
    embedding's shape goes unchecked.

    Args:
        state_dict: ours layout (backbone/classifier) or, with ``simmim``, the SimMIM layout.
        spec: the architecture; ``img_size``/``window_size`` may be None.
        what: start of the error message (which file, which step).
        simmim: expect ``encoder.*`` + ``encoder.mask_token`` + ``decoder.0.*``.

    Raises:
        ConversionError: listing missing, unexpected and shape-mismatched keys by name.
    """
    probe = ModelSpec.from_dict(spec.to_dict())
    placeholder = probe.img_size is None or probe.window_size is None
    if placeholder:
        # Stage sides 2^(n-1) ... 1 with windows at least as large: every window is clamped, nothing is shifted.
        side = 2 ** (len(probe.depths) - 1)
        probe.img_size, probe.window_size = probe.patch_size * side, [side] * len(probe.depths)
        probe.pretrained_window_sizes = [0] * len(probe.depths)
    model = probe.build("meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if simmim:
        expected = {"encoder." + k: shape for k, shape in expected.items()}
        # The decoder is a 1x1 conv to stride^2 * in_chans channels, stride = the encoder's total downsampling.
        out = (probe.patch_size * 2 ** (len(probe.depths) - 1)) ** 2 * probe.in_chans
        expected["encoder.mask_token"] = (1, 1, probe.embed_dim)
        expected["decoder.0.weight"] = (out, model.num_features, 1, 1)
        expected["decoder.0.bias"] = (out,)
    ignore = {k for k in expected if k.endswith("absolute_pos_embed")} if placeholder else set()
    _compare_shapes(strip_derived_buffers(state_dict), expected, what, ignore_shapes=ignore)


def _compare_shapes(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    what: str,
    ignore_shapes: set[str] | frozenset[str] = frozenset(),
) -> None:
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(state_dict))
        if k not in ignore_shapes and tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {short_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {short_list(mismatched)}")
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))
