"""Timing shared by the benchmark scripts: device synchronisation and best-of-rounds seconds per step.

The best round is kept, not the mean: other processes may share the machine, and a slowdown they cause is not a
property of the code measured. Variants compared with each other are timed in interleaved rounds, so that a slow
moment hits every variant alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(
    step: Callable[[], None], steps: int, device: torch.device, *, warmup: int = 2, repeats: int = 1
) -> float:
    """Best seconds per call of ``step`` over ``repeats`` rounds of ``steps`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def interleaved_seconds_per_step(
    variants: dict[str, Callable[[], None]], steps: int, repeats: int, device: torch.device
) -> tuple[dict[str, float], dict[str, float]]:
    """(best seconds per step, seconds of the first call) of each variant, timed in interleaved rounds.

    Every variant is called twice before timing (allocator, optimizer state, oneDNN caches, compilation); the first
    call's duration is returned so a caller can report compilation time.
    """
    first: dict[str, float] = {}
    for name, step in variants.items():
        start = time.perf_counter()
        step()
        sync(device)
        first[name] = time.perf_counter() - start
        step()
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats):
        for name, step in variants.items():
            best[name] = min(best[name], seconds_per_step(step, steps, device, warmup=0))
    return best, first


def rows_against_timm(
    variants: dict[str, Callable[[], None]],
    *,
    batch: int,
    steps: int,
    repeats: int,
    device: torch.device,
    precision: str,
) -> list[dict]:
    """One row per variant other than ``timm`` (img/s, timm's img/s in the same rounds), timed by
    :func:`interleaved_seconds_per_step`; the first step of ``ours-compiled`` (its compilation) is printed."""
    best, first = interleaved_seconds_per_step(variants, steps, repeats, device)
    if "ours-compiled" in first:
        print(f"torch.compile of ours ({precision}): first step {first['ours-compiled']:.0f} s", flush=True)
    ips = {name: batch / seconds for name, seconds in best.items()}
    return [
        {"precision": precision, "model": name, "img_s": ips[name], "timm_img_s": ips["timm"]}
        for name in ips
        if name != "timm"
    ]
