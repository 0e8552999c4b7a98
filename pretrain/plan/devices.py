"""Accelerators the planner knows: memory per device (this module) and dense 16-bit peak (reused from
:data:`pretrain.metrics.GPU_PEAK_TFLOPS`, the table the trainer's MFU uses).

Memory figures are the vendors' data-sheet capacities, taken as GiB. A process sees somewhat less
(``torch.cuda.get_device_properties().total_memory`` excludes what the driver reserves, on the order of 1-2% on
80 GB parts); the planner's margin (default 10%) covers that, the CUDA context (0.5-1 GiB), NCCL's buffers and the
caching allocator's fragmentation, which no per-tensor count sees. Not checked on a GPU in this task (none was lent).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..metrics import GPU_PEAK_TFLOPS

__all__ = ["DEFAULT_MARGIN", "GPU_MEMORY_GIB", "Device", "device_from_memory", "known_devices", "lookup_device"]

GIB = 1 << 30

# Fraction of the device memory the plan keeps free: the CUDA context, NCCL buffers and allocator fragmentation.
DEFAULT_MARGIN = 0.10

# name -> (memory in GiB per device as the data sheet states it, key of GPU_PEAK_TFLOPS or None). A part sold with
# two capacities gets one entry per capacity; the peak is the chip's, from pretrain/metrics.py.
GPU_MEMORY_GIB: dict[str, tuple[float, str | None]] = {
    # NVIDIA Blackwell. HGX B200 data sheet: 1,440 GB HBM3e for 8 GPUs (180 each). GB200 NVL72 data sheet: up to
    # 13.4 TB HBM3e for 72 GPUs (186 each). HGX B300 and GB300 NVL72 data sheets: 288 GB HBM3e per GPU.
    "B200": (180.0, "B200"),
    "B300": (288.0, "B300"),
    "GB200": (186.0, "GB200"),
    "GB300": (288.0, "GB300"),
    # NVIDIA Hopper. H100 data sheet: 80 GB (SXM and PCIe), 94 GB (NVL). H200 data sheet: 141 GB (SXM and NVL).
    # GH200 data sheet: 96 GB HBM3 or 144 GB HBM3e. H800: 80 GB (the SXM part's export variant). H20: 96 GB.
    "H100": (80.0, "H100"),
    "H100 PCIe": (80.0, "H100 PCIe"),
    "H100 NVL": (94.0, "H100 NVL"),
    "H200": (141.0, "H200"),
    "H200 NVL": (141.0, "H200 NVL"),
    "GH200 96GB": (96.0, "GH200"),
    "GH200 144GB": (144.0, "GH200"),
    "H800": (80.0, "H800"),
    "H20": (96.0, "H20"),
    # NVIDIA Ampere, Ada, Volta. A100 data sheet: 40 GB or 80 GB; A800 the same. L40S, L40: 48 GB; L4: 24 GB;
    # A10 and A10G: 24 GB; V100: 16 or 32 GB. GeForce RTX 4090: 24 GB (no peak figure in the metrics table: set
    # logging.peak_tflops for times).
    "A100 40GB": (40.0, "A100"),
    "A100 80GB": (80.0, "A100"),
    "A800 40GB": (40.0, "A800"),
    "A800 80GB": (80.0, "A800"),
    "L40S": (48.0, "L40S"),
    "L40": (48.0, "L40"),
    "L4": (24.0, "L4"),
    "A10G": (24.0, "A10G"),
    "A10": (24.0, "A10"),
    "V100 16GB": (16.0, "V100"),
    "V100 32GB": (32.0, "V100"),
    "RTX 4090": (24.0, None),
    # AMD Instinct. MI300X data sheet: 192 GB HBM3; MI325X: 256 GB HBM3E. MI250X and MI250: 128 GB per package of
    # two dies, which ROCm shows as two devices of 64 GB (the peak table halves the package too).
    "MI300X": (192.0, "MI300X"),
    "MI325X": (256.0, "MI325X"),
    "MI250X": (64.0, "MI250X"),
    "MI250": (64.0, "MI250"),
}


@dataclass(frozen=True)
class Device:
    """One accelerator as the plan sees it.

    Attributes:
        name: the table key, or "<GiB> GiB device" for ``--gpu-memory``.
        memory_bytes: nominal memory per device in bytes.
        peak_tflops: dense 16-bit peak in TFLOP/s, None when unknown (times then need ``logging.peak_tflops``).
        peak_source: where the peak comes from.
    """

    name: str
    memory_bytes: int
    peak_tflops: float | None
    peak_source: str

    def with_peak(self, peak_tflops: float | None) -> Device:
        """This device with ``logging.peak_tflops`` taking precedence over the table, as in the trainer."""
        if peak_tflops is None:
            return self
        return Device(self.name, self.memory_bytes, float(peak_tflops), "logging.peak_tflops")


def _normal(name: str) -> str:
    """Case, spaces, hyphens and underscores do not matter: "h100-pcie" finds "H100 PCIe"."""
    return re.sub(r"[\s_\-]+", "", name).lower()


def known_devices() -> list[str]:
    """The accepted ``--gpu`` names, in table order."""
    return list(GPU_MEMORY_GIB)


def lookup_device(name: str) -> Device:
    """The :class:`Device` for a ``--gpu`` name.

    Args:
        name: a table key, matched ignoring case, spaces, hyphens and underscores ("h100", "A100-80GB").

    Raises:
        ValueError: an unknown name (the message lists the known ones; a part sold in two capacities asks for one).
    """
    wanted = _normal(name)
    for key, (gib, peak_key) in GPU_MEMORY_GIB.items():
        if _normal(key) == wanted:
            if peak_key is None:
                return Device(key, int(gib * GIB), None, "no table figure: set logging.peak_tflops")
            return Device(key, int(gib * GIB), GPU_PEAK_TFLOPS[peak_key], f"table ({peak_key}, dense 16-bit)")
    variants = [key for key in GPU_MEMORY_GIB if _normal(key).startswith(wanted) and wanted]
    hint = f" (sold in several capacities: {', '.join(variants)})" if len(variants) > 1 else ""
    raise ValueError(
        f"--gpu {name!r} is not a known device{hint}; accepted: {', '.join(known_devices())}, or --gpu-memory GiB "
        f"for any other device"
    )


def device_from_memory(gib: float) -> Device:
    """A device known only by its memory (``--gpu-memory``): no peak figure unless ``logging.peak_tflops`` is set.

    Raises:
        ValueError: ``gib`` is not a positive number.
    """
    if not gib > 0:
        raise ValueError(f"--gpu-memory {gib}; accepted: the device memory in GiB, a positive number")
    return Device(f"{gib:g} GiB device", int(gib * GIB), None, "no table figure: set logging.peak_tflops")
