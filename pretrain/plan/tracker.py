"""Measured peak memory of a region of code: every tensor allocation and free counted (CPU), or CUDA's allocator
statistics.

CPU, ``method="allocator"`` (default): PyTorch keeps no CPU allocation statistics, but its CPU allocator reports every
allocation and free (size and time) to the profiler when memory profiling is on. :func:`track_peak` runs
``torch.profiler`` with ``profile_memory=True`` over the region and replays those events in time order. That counts
what any kernel allocates (workspace included, as CUDA's ``max_memory_allocated`` would), not only the tensors
Python sees, around anything in the region: a forward and backward, ``deepspeed.initialize``, an optimizer step.
Only threads that carry the profiler's state (the calling thread and the autograd engine's) are followed: a
data-loader thread's allocations do not disturb the figure, but neither is a free seen that another thread does
(gloo's communication threads release the tensors of asynchronous collectives, which ZeRO-2/3 on several ranks use:
there the figure is too high, by what those threads free).

CPU, ``method="tensors"``: a ``TorchDispatchMode`` counts every storage an operation creates (an output storage that
is none of its inputs') and a finalizer on the storage object counts its free, on whichever thread it happens; exact
across threads, blind to workspace a kernel allocates and frees within itself.

Both measure the highest number of bytes allocated inside the region and still alive, at any moment
(``peak_bytes``), and those still alive at its end (``net_bytes``); ``mark(label)`` records the level at a moment
and ``peak_since(label)`` the highest point after it. A tensor that existed before the region is not counted, nor is
its free: build what should be measured inside the region.

CUDA: the allocator's statistics (``reset_peak_memory_stats`` at entry, ``max_memory_allocated`` at exit), relative
to ``memory_allocated`` at entry (``baseline_bytes``); no marks (measure separate regions).

The profiler cannot be nested: inside another torch.profiler window (``training.profile``) the allocator method
refuses.
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["METHODS", "PeakTracker", "peak_of_events", "profiler_active", "track_peak"]

_MEMORY_EVENT = "[memory]"
_MARK = "track_peak::"


@dataclass
class PeakTracker:
    """Filled in when the ``track_peak`` region exits.

    Attributes:
        device: the device measured.
        peak_bytes: highest live bytes allocated inside the region (CUDA: above the level at entry).
        net_bytes: bytes allocated inside the region and still alive at its end (CUDA: end level minus entry level).
        baseline_bytes: bytes allocated on the device at entry (CUDA only; None on CPU, where PyTorch keeps no total).
        events: allocator events replayed (CPU; 0 on CUDA).
    """

    device: torch.device
    peak_bytes: int | None = None
    net_bytes: int | None = None
    baseline_bytes: int | None = None
    events: int = 0
    marks: dict[str, int] = field(default_factory=dict)
    _peaks_since: dict[str, int] = field(default_factory=dict, repr=False)
    _pending: list[str] = field(default_factory=list, repr=False)

    def mark(self, label: str) -> None:
        """Mark a moment of the region (CPU only): after exit, ``marks[label]`` is the live bytes (allocated inside
        the region) at that moment and ``peak_since(label)`` the highest point from there to the end."""
        if self.device.type != "cpu":
            raise ValueError(f"PeakTracker.mark is CPU only (device {self.device}); on CUDA measure separate regions")
        if label in self._pending:
            raise ValueError(f"mark {label!r} is already set in this region; accepted: a new label")
        self._pending.append(label)
        counter = getattr(self, "_counter", None)
        if counter is not None:
            gc.collect()  # storages held only by reference cycles are garbage already
            with counter.lock:
                counter.marks.append((label, counter.live))
                counter.peaks_since.append(counter.live)
            return
        with torch.profiler.record_function(_MARK + label):
            pass

    def peak_since(self, label: str) -> int:
        """Highest live bytes from ``mark(label)`` to the end of the region."""
        if label not in self._peaks_since:
            raise KeyError(f"no mark {label!r} in this region; marks: {sorted(self._peaks_since)}")
        return self._peaks_since[label]


def peak_of_events(sizes: list[int]) -> tuple[int, int]:
    """(peak, final) running sum of signed allocation sizes in time order (frees negative), starting from 0."""
    live = peak = 0
    for size in sizes:
        live += size
        peak = max(peak, live)
    return peak, live


def profiler_active() -> bool:
    """Whether a torch.profiler window records in this process (the CPU tracker's allocator method needs its own)."""
    return bool(torch.autograd.profiler._is_profiler_enabled)


@contextmanager
def _track_cpu(tracker: PeakTracker) -> Iterator[PeakTracker]:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if profiler_active():
        raise RuntimeError(
            "track_peak(cpu) needs torch.profiler, and another profiler window is active (training.profile?); "
            "measure outside the profiled steps"
        )
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield tracker
    everything = list(prof.profiler.kineto_results.events())
    events = [e for e in everything if e.name() == _MEMORY_EVENT and e.device_type() == DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())  # stable: same-time events keep the allocator's order
    tracker.peak_bytes, tracker.net_bytes = peak_of_events([int(e.nbytes()) for e in events])
    tracker.events = len(events)
    marks = sorted((e.start_ns(), e.name()[len(_MARK) :]) for e in everything if e.name().startswith(_MARK))
    for time_ns, label in marks:
        before = [int(e.nbytes()) for e in events if e.start_ns() < time_ns]
        after = [int(e.nbytes()) for e in events if e.start_ns() >= time_ns]
        live = sum(before)
        tracker.marks[label] = live
        tracker._peaks_since[label] = live + peak_of_events(after)[0]


class _StorageCounter(TorchDispatchMode):
    """Counts the storages that operations create (an output whose storage is none of the inputs'), and their frees
    through a finalizer on the storage object, whichever thread drops the last reference."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self.events = 0
        self.sizes: dict[int, int] = {}
        self.lock = threading.Lock()
        self.marks: list[tuple[str, int]] = []  # (label, live at the mark); peaks since each mark below
        self.peaks_since: list[int] = []

    def _free(self, key: int) -> None:
        with self.lock:
            self.live -= self.sizes.pop(key, 0)
            self.events += 1

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage()._cdata
            for t in torch.utils._pytree.tree_leaves((args, kwargs or {}))
            if isinstance(t, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self.sizes or storage.nbytes() == 0:
                continue  # a view or in-place result, or already counted
            with self.lock:
                self.sizes[key] = storage.nbytes()
                self.live += storage.nbytes()
                self.events += 1
                self.peak = max(self.peak, self.live)
                self.peaks_since = [max(p, self.live) for p in self.peaks_since]
            weakref.finalize(storage, self._free, key)
        return out


@contextmanager
def _track_tensors(tracker: PeakTracker) -> Iterator[PeakTracker]:
    counter = _StorageCounter()
    tracker._counter = counter
    with counter:
        yield tracker
    gc.collect()  # storages in reference cycles are freed now, not at some later collection
    tracker.peak_bytes, tracker.net_bytes, tracker.events = counter.peak, counter.live, counter.events
    for (label, live), peak in zip(counter.marks, counter.peaks_since, strict=True):
        tracker.marks[label] = live
        tracker._peaks_since[label] = peak


@contextmanager
def _track_cuda(tracker: PeakTracker) -> Iterator[PeakTracker]:
    device = tracker.device
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield tracker
    torch.cuda.synchronize(device)
    tracker.baseline_bytes = baseline
    tracker.peak_bytes = torch.cuda.max_memory_allocated(device) - baseline
    tracker.net_bytes = torch.cuda.memory_allocated(device) - baseline


METHODS = ("allocator", "tensors")


@contextmanager
def track_peak(device: torch.device | str = "cpu", method: str = "allocator") -> Iterator[PeakTracker]:
    """Measure the peak memory of the ``with`` block on ``device``.

    Args:
        device: "cpu" or a CUDA device (allocator statistics; ``method`` is ignored there).
        method: on CPU, "allocator" (every allocation and free of the CPU allocator, replayed from the profiler:
            kernel workspace included, but a free done by a thread the profiler does not follow, such as gloo's
            communication threads releasing the tensors of async collectives under ZeRO-2/3, is missed) or
            "tensors" (every storage an operation creates, freed when its storage object dies on any thread: exact
            across threads, blind to memory a kernel allocates and frees inside itself).

    Yields:
        A :class:`PeakTracker` whose fields are set when the block exits (normally; not after an exception).

    Example::

        with track_peak("cpu") as peak:
            loss = model(images, mask)
            loss.backward()
        print(peak.peak_bytes)
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    tracker = PeakTracker(device=device)
    if method not in METHODS:
        raise ValueError(f"track_peak: method={method!r}; accepted: {', '.join(METHODS)}")
    if device.type == "cpu":
        context = _track_cpu(tracker) if method == "allocator" else _track_tensors(tracker)
    elif device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"track_peak({str(device)!r}): no CUDA device is visible; accepted here: cpu")
        context = _track_cuda(tracker)
    else:
        raise ValueError(f"track_peak: device {str(device)!r} is not supported; accepted: cpu, cuda[:N]")
    with context:
        yield tracker
