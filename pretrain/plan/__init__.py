"""Run planner: predict per-rank memory and time for a pretraining config before launching it.

``python -m pretrain.plan --config C --gpus N --gpu NAME`` resolves the config exactly as ``python -m pretrain`` does,
then reports memory per rank (:mod:`pretrain.plan.memory`), FLOPs per image, step time and the recipe's wall-clock
(:mod:`pretrain.plan.throughput`), and with ``--search`` the largest fitting micro-batch for every ZeRO stage x
checkpointing x offload choice (:mod:`pretrain.plan.search`). Devices: :mod:`pretrain.plan.devices`.
"""

from __future__ import annotations

from .devices import DEFAULT_MARGIN, GPU_MEMORY_GIB, Device, device_from_memory, known_devices, lookup_device
from .memory import MemoryEstimate, estimate_memory
from .search import CHECKPOINTING_CHOICES, Candidate, largest_fitting, search, with_choice
from .throughput import (
    DEFAULT_MFU,
    FlopProfile,
    MeasuredMfu,
    TimeEstimate,
    best_measured_mfu,
    count_images,
    estimate_time,
    flop_profile,
)

__all__ = [
    "CHECKPOINTING_CHOICES",
    "DEFAULT_MARGIN",
    "DEFAULT_MFU",
    "GPU_MEMORY_GIB",
    "Candidate",
    "Device",
    "FlopProfile",
    "MeasuredMfu",
    "MemoryEstimate",
    "TimeEstimate",
    "best_measured_mfu",
    "count_images",
    "device_from_memory",
    "estimate_memory",
    "estimate_time",
    "flop_profile",
    "known_devices",
    "largest_fitting",
    "lookup_device",
    "search",
    "with_choice",
]
