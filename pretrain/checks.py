"""The configuration error and the small checks that every config section uses for its own keys.

Each component owns its config section (a dataclass in its own module) and a ``check()`` method on it that raises
:class:`ConfigError` naming the key, the value and what is accepted. :mod:`pretrain.config` assembles the sections,
runs every section's ``check()`` and then the few rules that span sections.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["ConfigError", "finite_numbers", "one_of", "per_stage_list", "require"]


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or impossible; the message names key and accepted values."""


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def one_of(key: str, value: Any, accepted: Sequence[Any]) -> None:
    """``value`` must be one of ``accepted``."""
    if value not in accepted:
        raise ConfigError(f"{key}={value!r} is not accepted; accepted: {', '.join(map(str, accepted))}")


def per_stage_list(key: str, values: Sequence[int], stages: int, what: str) -> None:
    """``values`` has one entry per stage."""
    require(len(values) == stages, f"{key}={list(values)} needs one entry per stage ({stages}); accepted: {what}")


def finite_numbers(section: Any, prefix: str) -> None:
    """Every float of a config dataclass (nested dataclasses, lists and dicts included) is finite.

    One rule for the whole tree: an infinite learning rate, timeout or ratio is never meant, and ``inf`` or ``nan``
    would otherwise travel into the schedule, the collectives or the model before anything fails.
    """
    for field in dataclasses.fields(section):
        _finite(f"{prefix}.{field.name}", getattr(section, field.name))


def _finite(key: str, value: Any) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        finite_numbers(value, key)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value}; accepted: a finite number")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _finite(f"{key}[{index}]", item)
    elif isinstance(value, dict):
        for name, item in value.items():
            _finite(f"{key}.{name}", item)
