"""Stage and window geometry of SwinV2: the one place for these rules.

The model, the trainer's config checks and the checkpoint tools all ask here: how a value given once or per stage
expands, what resolution each stage runs at, which window (and shift) a stage really uses after the official clamp
rule (a window never exceeds the stage's side), and which image sizes would work when one does not.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "check_geometry",
    "divisors",
    "effective_windows",
    "per_stage",
    "stage_resolutions",
    "to_2tuple",
    "valid_image_sizes",
    "window_and_shift",
]


def to_2tuple(value: int | Sequence[int]) -> tuple[int, int]:
    """``7`` -> ``(7, 7)``; a pair stays a pair (ValueError for anything else)."""
    if isinstance(value, int):
        return (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {pair}")
    return pair  # type: ignore[return-value]


def per_stage(value: int | Sequence[int], num_stages: int, name: str) -> list[int]:
    """Expand ``value`` (one int, a one-element list, or one entry per stage) to one int per stage.

    Raises:
        ValueError: naming ``name`` when a list has another length.
    """
    if isinstance(value, int):
        return [value] * num_stages
    values = [int(v) for v in value]
    if len(values) == 1:
        return values * num_stages
    if len(values) != num_stages:
        raise ValueError(f"{name}={values} needs one entry per stage ({num_stages}) or a single int")
    return values


def stage_resolutions(grid: tuple[int, int], num_stages: int, patch_size: int) -> list[tuple[int, int]]:
    """Token grid of every stage for a patch grid (each patch merging halves it).

    Raises:
        ValueError: a stage before the last has an odd side, which patch merging cannot halve.
    """
    resolutions = []
    h, w = grid
    for i in range(num_stages):
        resolutions.append((h, w))
        if i < num_stages - 1:
            if h % 2 or w % 2:
                step = patch_size * 2 ** (i + 1)
                raise ValueError(
                    f"stage {i} resolution {h}x{w} is odd, patch merging needs it even; use an image size that "
                    f"is a multiple of {step * 2 ** (num_stages - 2 - i)} (e.g. "
                    f"{[k * patch_size * 2 ** (num_stages - 1) for k in (6, 7, 8)]})"
                )
            h, w = h // 2, w // 2
    return resolutions


def divisors(n: int) -> list[int]:
    """Every divisor of ``n``, ascending (for messages that name the values that would work)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def window_and_shift(
    resolution: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The window and shift a stage runs with, after the official clamp rule; checks that the windows tile it.

    Official rule: when the stage's smaller side is at most the window, the window becomes that side and there is no
    shift.

    Raises:
        ValueError: the window does not tile the stage (naming the windows that would) or the shift is out of range.
    """
    if min(resolution) <= max(window):
        side = min(resolution)
        window, shift = (side, side), (0, 0)
    for axis, (r, w) in enumerate(zip(resolution, window, strict=True)):
        if r % w:
            valid = [d for d in divisors(r) if d > 1]
            raise ValueError(
                f"stage resolution {resolution[0]}x{resolution[1]} is not a multiple of window size {w} "
                f"(axis {axis}); windows that divide {r}: {valid}, or choose an image size whose stage "
                f"resolutions are multiples of the window"
            )
    if not all(0 <= s < w for s, w in zip(shift, window, strict=True)):
        raise ValueError(f"shift size {shift} must lie in [0, window size {window})")
    return window, shift


def effective_windows(img_size: int, window_size: int | Sequence[int], patch_size: int, num_stages: int) -> list[int]:
    """Per stage, the window a square model of side ``img_size`` really runs with (e.g. [12, 12, 12, 6] for 192/w12
    with patch 4 and four stages)."""
    windows = per_stage(window_size, num_stages, "window_size")
    side = img_size // patch_size
    return [min(side // 2**i, windows[i]) for i in range(num_stages)]


def _fits(grid: tuple[int, int], windows: Sequence[int], patch_size: int, shifted: bool) -> list[tuple[int, int]]:
    resolutions = stage_resolutions(grid, len(windows), patch_size)
    for resolution, window in zip(resolutions, windows, strict=True):
        pair = to_2tuple(window)
        window_and_shift(resolution, pair, (pair[0] // 2, pair[1] // 2) if shifted else (0, 0))
    return resolutions


def valid_image_sizes(near: int, patch_size: int, windows: Sequence[int], count: int = 4) -> list[int]:
    """The ``count`` square image sides closest to ``near`` whose every stage fits ``windows`` (one per stage)."""
    found = []
    for side in sorted(range(patch_size, 4 * near + 1, patch_size), key=lambda s: (abs(s - near), s)):
        try:
            _fits((side // patch_size, side // patch_size), windows, patch_size, shifted=False)
        except ValueError:
            continue
        found.append(side)
        if len(found) == count:
            break
    return sorted(found)


def check_geometry(
    img_size: int | Sequence[int], patch_size: int, window_size: int | Sequence[int], num_stages: int
) -> list[tuple[int, int]]:
    """Stage resolutions of an image size, after checking every step of the geometry.

    Checks that the image is a whole number of patches, that every stage before the last can be halved, and that
    every stage's (clamped) window tiles it. A failure names what is wrong and suggests nearby image sizes that work
    with the requested windows (the usual fix is the image size, not the window).

    Raises:
        ValueError: with the reason and the suggestions.
    """
    height, width = to_2tuple(img_size)
    windows = per_stage(window_size, num_stages, "window_size")
    if patch_size <= 0 or height <= 0 or width <= 0 or any(w <= 0 for w in windows):
        raise ValueError(
            f"img_size={img_size}, patch_size={patch_size}, window_size={window_size}; accepted: positive integers"
        )
    if height % patch_size or width % patch_size:
        valid = [patch_size * k for k in range(max(1, height // patch_size - 2), height // patch_size + 3)]
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch_size}; e.g. {valid}")
    try:
        return _fits((height // patch_size, width // patch_size), windows, patch_size, shifted=True)
    except ValueError as err:
        raise ValueError(
            f"{err}. Image sizes near {height} that work with window_size={windows}: "
            f"{valid_image_sizes(height, patch_size, windows)}"
        ) from None
