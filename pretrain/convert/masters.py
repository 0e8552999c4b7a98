"""Naming the fp32 master weights of DeepSpeed's stage-0 fp16/bf16 optimizer, which saves them without names."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch

from ..formats import ConversionError

__all__ = ["name_master_weights"]

Key = tuple[tuple[int, ...], bytes]
Item = tuple[int, int]  # (optimizer group, index in the group)


class _Matching:
    """Masters (by group and index) to module parameter indices, built up by :func:`name_master_weights`."""

    def __init__(self, names: list[str], classes: dict[Key, list[int]], keys: dict[Item, Key]) -> None:
        self.names, self.classes, self.keys = names, classes, keys
        self.assigned: dict[Item, int] = {}
        self.taken: set[int] = set()

    def assign(self, item: Item, index: int) -> None:
        self.assigned[item] = index
        self.taken.add(index)

    def by_neighbours(self, groups: Sequence[Sequence[torch.Tensor]]) -> bool:
        """Place masters whose class leaves one free name between the resolved neighbours in their group (group
        order = module order); True when any was placed."""
        changed = False
        for g, group in enumerate(groups):
            for j in range(len(group)):
                if (g, j) in self.assigned:
                    continue
                lower = max((self.assigned[(g, i)] for i in range(j) if (g, i) in self.assigned), default=-1)
                upper = min(
                    (self.assigned[(g, i)] for i in range(j + 1, len(group)) if (g, i) in self.assigned),
                    default=1 << 62,
                )
                options = [i for i in self.classes[self.keys[(g, j)]] if i not in self.taken and lower < i < upper]
                if len(options) == 1:
                    self.assign((g, j), options[0])
                    changed = True
        return changed

    def by_order_in_one_group(self) -> bool:
        """Equal copies all in one group take the free names of their class in order; True when any was placed."""
        pending: dict[Key, list[Item]] = {}
        for item, k in self.keys.items():
            if item not in self.assigned:
                pending.setdefault(k, []).append(item)
        changed = False
        for k, items in pending.items():
            free = [i for i in self.classes[k] if i not in self.taken]
            if len({g for g, _ in items}) == 1 and len(free) == len(items):
                for item, index in zip(sorted(items), free, strict=True):
                    self.assign(item, index)
                changed = True
        return changed


def _digests(
    module: Mapping[str, torch.Tensor], names: list[str], groups: Sequence[Sequence[torch.Tensor]]
) -> tuple[dict[Key, list[int]], dict[Item, Key]]:
    """(module parameter indices per rounded value, the rounded value of every master)."""
    half = (torch.bfloat16, torch.float16)
    low_dtype = next((module[k].dtype for k in names if module[k].dtype in half), torch.bfloat16)

    def key(t: torch.Tensor) -> Key:
        # Bit pattern of the rounded values: a cheap digest of a possibly large tensor.
        bits = t.detach().to(low_dtype).contiguous().view(torch.int16).numpy().tobytes()
        return tuple(t.shape), hashlib.blake2b(bits, digest_size=16).digest()

    classes: dict[Key, list[int]] = {}
    for index, name in enumerate(names):
        classes.setdefault(key(module[name]), []).append(index)
    keys = {(g, j): key(t) for g, group in enumerate(groups) for j, t in enumerate(group)}
    return classes, keys


def _check_counts(names: list[str], classes: dict[Key, list[int]], keys: dict[Item, Key], where: str) -> None:
    for (g, j), k in keys.items():
        if k not in classes:
            raise ConversionError(
                f"{where}: fp32 master #{j} of optimizer group {g} (shape {list(k[0])}) rounds to none of the module "
                f"weights; the optimizer state does not belong to this module"
            )
    counts: dict[Key, int] = {}
    for k in keys.values():
        counts[k] = counts.get(k, 0) + 1
    for k, n in counts.items():
        if n > len(classes[k]):
            raise ConversionError(
                f"{where}: {n} fp32 masters but only {len(classes[k])} module weights round to the same values "
                f"({', '.join(names[i] for i in classes[k])}); the optimizer state does not belong to this module"
            )


def _check_result(match: _Matching, groups: Sequence[Sequence[torch.Tensor]], where: str) -> None:
    unresolved = sorted(item for item in match.keys if item not in match.assigned)
    if unresolved:
        tied = sorted(
            {match.names[i] for item in unresolved for i in match.classes[match.keys[item]] if i not in match.taken}
        )
        raise ConversionError(
            f"{where}: cannot tell which fp32 master belongs to which of {', '.join(tied)} (their bf16/fp16 copies "
            f"are identical and the optimizer groups do not order them); use --dtype bf16 for the training-precision "
            f"weights"
        )
    for g, group in enumerate(groups):
        order = [match.assigned[(g, j)] for j in range(len(group))]
        tied = any(len(match.classes[match.keys[(g, j)]]) > 1 for j in range(len(group)))
        if tied and order != sorted(order):
            # Ties were broken by an order this optimizer does not follow: the choice may be wrong.
            raise ConversionError(
                f"{where}: optimizer group {g} does not list its parameters in module order, so fp32 masters with "
                f"identical bf16/fp16 copies cannot be told apart; use --dtype bf16 for the training-precision weights"
            )


def name_master_weights(
    module: Mapping[str, torch.Tensor],
    groups: Sequence[Sequence[torch.Tensor]],
    buffers: set[str] | frozenset[str] = frozenset(),
    *,
    where: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Name the fp32 master weights of a stage-0 fp16/bf16 DeepSpeed optimizer.

    DeepSpeed saves them per param group, without names. Each master rounds exactly to its parameter's
    low-precision module copy, which names it; parameters whose copies are identical (small tensors such as
    one-head logit scales end up equal after rounding) are told apart by order: param groups list their parameters
    in module order (they are built by walking ``named_parameters``).

    Args:
        module: the low-precision module state dict (names in module order).
        groups: the fp32 masters, one sequence per param group.
        buffers: module entries that are buffers (no master).
        where: names the file in messages.

    Returns:
        name -> fp32 master, for every parameter the optimizer holds.

    Raises:
        ConversionError: a master matches no parameter, or equal copies cannot be told apart.
    """
    names = [k for k, v in module.items() if k not in buffers and v.is_floating_point()]
    classes, keys = _digests(module, names, groups)
    _check_counts(names, classes, keys, where)
    match = _Matching(names, classes, keys)
    for item, k in keys.items():
        if len(classes[k]) == 1:
            match.assign(item, classes[k][0])
    changed = True
    while changed and len(match.assigned) < len(keys):
        changed = match.by_neighbours(groups)
        changed = match.by_order_in_one_group() or changed
    _check_result(match, groups, where)
    return {names[index]: groups[g][j] for (g, j), index in match.assigned.items()}
