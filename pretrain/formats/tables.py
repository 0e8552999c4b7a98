"""Position-table forensics: what the derived buffers stored in official files say about the model.

Official checkpoints keep every block's ``relative_coords_table``. Its values depend on the block's window and on
the pretrained window the position-bias MLP normalises its coordinates by (spec §1.3), so the table tells which
pretrained window a stage was built with. The tables are rebuilt with the model's own code and compared.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from swinv2 import SwinTransformerV2
from swinv2.swin_transformer_v2 import relative_coords_table

from .common import ConversionError

__all__ = [
    "coords_table_matches",
    "official_buffers",
    "pretrained_window_from_table",
    "pretrained_windows_from_tables",
]


def _table_tolerance(table: torch.Tensor) -> float:
    # Official tables are float32 and rebuilt bit for bit; a table saved in half precision is only close.
    return 1e-5 if table.dtype in (torch.float32, torch.float64) else 2e-2


def _table_window(table: torch.Tensor, what: str) -> int:
    shape = tuple(table.shape)
    if len(shape) != 4 or shape[0] != 1 or shape[3] != 2 or shape[1] != shape[2] or shape[1] % 2 == 0:
        raise ConversionError(f"{what}: shape {shape}; a relative_coords_table is (1, 2W-1, 2W-1, 2)")
    return (shape[1] + 1) // 2


def _table_distance(table: torch.Tensor, pretrained: int, what: str) -> float:
    window = _table_window(table, what)
    rebuilt = relative_coords_table((window, window), (pretrained, pretrained))
    return float((rebuilt - table.detach().float()).abs().max())


def coords_table_matches(table: torch.Tensor, pretrained: int, what: str = "relative_coords_table") -> bool:
    """Whether ``table`` is the one a block of its window builds with pretrained window ``pretrained`` (0 = its own).

    The table is rebuilt with the same code as the model and compared, so equivalent values (P equal to the window,
    or 0) match each other.
    """
    return _table_distance(table, pretrained, what) <= _table_tolerance(table)


def pretrained_window_from_table(table: torch.Tensor, what: str = "relative_coords_table") -> int:
    """The pretrained window P a stored relative_coords_table was built with; 0 when it is the block's own window.

    The largest offset W-1 maps to log2(8 (W-1)/(P-1) + 1) / 3 (spec §1.3): that gives a candidate P, confirmed by
    rebuilding the whole table for it and its neighbours.

    Raises:
        ConversionError: the table matches no pretrained window (damaged, or not built by the SwinV2 rule).
    """
    window = _table_window(table, what)
    if window == 1:
        return 0  # a 1x1 window has the single offset 0: every P gives the same all-zero table
    top = float(table[0, -1, window - 1, 0])
    scaled = 2.0 ** (3.0 * top) - 1.0
    guess = round(8.0 * (window - 1) / scaled) + 1 if scaled > 0 else window
    # P = 1 is not a window the official code can build (it divides by P - 1); ours treats it as 2.
    candidates = sorted({window, *(p for p in (guess - 1, guess, guess + 1) if p >= 2)})
    # The closest one: in a half-precision table neighbouring large windows can both lie within the tolerance.
    distance, best = min((_table_distance(table, p, what), p) for p in candidates)
    if distance <= _table_tolerance(table):
        return 0 if best == window else best
    raise ConversionError(
        f"{what}: not the relative_coords_table of a {window}x{window} window for any pretrained window (tried "
        f"{sorted({window, guess})}); the file's buffers are damaged or were not built by the SwinV2 rule"
    )


def pretrained_windows_from_tables(state_dict: Mapping[str, torch.Tensor], depths: list[int]) -> list[int] | None:
    """Per stage, the pretrained window read from the stored relative_coords_table buffers (official files).

    Returns:
        One value per stage (0 = the stage's own window), or None when a stage has no stored table.

    Raises:
        ConversionError: blocks of one stage were built with different pretrained windows.
    """
    out = []
    for i, depth in enumerate(depths):
        found: dict[int, list[int]] = {}
        for j in range(depth):
            key = f"layers.{i}.blocks.{j}.attn.relative_coords_table"
            if key in state_dict:
                found.setdefault(pretrained_window_from_table(state_dict[key], key), []).append(j)
        if not found:
            return None
        if len(found) > 1:
            detail = ", ".join(f"blocks {blocks}: {p}" for p, blocks in sorted(found.items()))
            raise ConversionError(
                f"stage {i}: its relative_coords_table buffers disagree on the pretrained window ({detail}; 0 = the "
                f"block's own window); every block of a stage is built with the same one"
            )
        out.append(next(iter(found)))
    return out


def official_buffers(model: SwinTransformerV2) -> dict[str, torch.Tensor]:
    """The derived buffers the official code keeps in its state dict, taken from a built model (same values).

    relative_coords_table and relative_position_index on every block's attention, attn_mask on shifted blocks only
    (the official code registers None on the others, which state_dict() skips).
    """
    out = {}
    for name, buf in model.named_buffers():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("relative_coords_table", "relative_position_index", "attn_mask"):
            out[name] = buf.detach().clone()
    return out
