"""Rank-0 metrics: progress bar, console lines, TensorBoard scalars, a JSONL file, reconstruction grids, and the
optional W&B and MLflow trackers (:mod:`pretrain.tracking`).

Scalar names follow torchtitan's where one exists. MFU = achieved training FLOP/s / peak FLOP/s of the device, with
training FLOPs = 3 x forward FLOPs (recomputation by activation checkpointing not counted); the peak is
``logging.peak_tflops`` when set, else a table of dense 16-bit figures for known GPUs and, on CPU, a matmul rate
measured in the compute dtype.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .checks import require
from .tracking import MlflowConfig, Tracker, WandbConfig, open_trackers

__all__ = [
    "GPU_PEAK_TFLOPS",
    "LoggingConfig",
    "MetricsLogger",
    "count_forward_flops",
    "gpu_peak_tflops",
    "peak_flops",
    "trim_jsonl",
]

log = logging.getLogger("pretrain")


@dataclass
class LoggingConfig:
    log_every: int = 10
    progress_bar: bool = True
    tensorboard: bool = True
    jsonl: bool = True
    # Reconstruction grids (TensorBoard, PNG and the trackers) every N steps; 0 disables.
    image_every: int = 1000
    # Dense 16-bit peak of one device in TFLOP/s, the denominator of MFU. null = the table below for GPUs (an unknown
    # GPU gives one warning and no MFU) and a measured matmul rate on CPUs; set it for a GPU the table lacks or a
    # power-capped part.
    peak_tflops: float | None = None
    # Optional trackers (extras [wandb] and [mlflow]); see pretrain/tracking.py.
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def check(self) -> None:
        require(self.log_every >= 1, f"logging.log_every={self.log_every}; accepted: 1 or more")
        require(self.image_every >= 0, f"logging.image_every={self.image_every}; accepted: 0 (off) or more")
        require(
            self.peak_tflops is None or self.peak_tflops > 0,
            f"logging.peak_tflops={self.peak_tflops}; accepted: null (table or measured) or a positive TFLOP/s figure",
        )
        self.wandb.check()
        self.mlflow.check()


# Dense bf16/fp16 tensor-core peaks per device as torch sees it, TFLOP/s, from the vendors' data sheets (the figures
# without 2:4 sparsity, i.e. half of the starred ones). Keys are matched as whole words of
# torch.cuda.get_device_name() (which also names ROCm devices), longest first: "A10" does not match an "A10G" (a
# different chip at about half the A10's rate), "H100" does not match "H100 PCIe", "B200" does not match "GB200".
GPU_PEAK_TFLOPS = {
    # NVIDIA Blackwell. HGX B200 and HGX B300 data sheets: FP16/BF16 36 PFLOPS (sparse) for 8 GPUs. GB200 NVL72 and
    # GB300 NVL72 data sheets: FP16/BF16 360 PFLOPS (sparse) for 72 GPUs.
    "B200": 2250.0,
    "B300": 2250.0,
    "GB200": 2500.0,
    "GB300": 2500.0,
    # NVIDIA Hopper. H100 data sheet: BF16 1,979 (SXM), 1,513 (PCIe), 1,671 (NVL) sparse; H200 data sheet: 1,979
    # (SXM), 1,671 (NVL); GH200 data sheet: 1,979; H20 product brief: 148 dense. H800 is the SXM part's export variant.
    # Some drivers name an H200 NVL just "NVIDIA H200": set logging.peak_tflops=835 there.
    "H100": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,
    "H200 NVL": 835.0,
    "GH200": 989.0,
    "H800": 989.0,
    "H20": 148.0,
    # NVIDIA Ampere and Ada. A100 data sheet: BF16 312 (SXM and PCIe); A800 is its export variant. L40S data sheet:
    # 733 sparse; L40: 362 sparse; L4: 242 sparse; A10: 125 dense; A10G (AWS): 70 dense. V100: 125 fp16 (no bf16).
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "V100": 125.0,
    # AMD Instinct. MI300X and MI325X data sheets: BF16 1,307.4 dense. MI250X (383.0) and MI250 (362.1) data sheets
    # give the package of two dies, which ROCm shows as two devices: half of it each. ROCm names both kinds "AMD
    # Instinct MI250X/MI250", which takes the MI250X figure (5% above an MI250's).
    "MI300X": 1307.4,
    "MI325X": 1307.4,
    "MI250X": 191.5,
    "MI250": 181.05,
}


def gpu_peak_tflops(name: str) -> tuple[float, str] | None:
    """(dense 16-bit peak in TFLOP/s, table key) for a CUDA device name, or None for a GPU not in the table."""
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return GPU_PEAK_TFLOPS[key], key
    return None


@functools.cache
def _measured_cpu_peak(dtype: torch.dtype) -> float:
    """FLOP/s of a 1024^3 matmul in ``dtype`` on this CPU (all of torch's threads): the best of 5 windows of about
    60 ms, since other processes sharing the CPU slow some windows down and a peak should not include that."""
    n = 1024
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pool, kernel selection
    best = 0.0
    for _ in range(5):
        reps, start = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            reps += 1
            elapsed = time.perf_counter() - start
            if elapsed > 0.06:
                break
        best = max(best, 2 * n**3 * reps / elapsed)
    return best


def peak_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, peak_tflops: float | None = None
) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for ``device`` computing in ``dtype``.

    Args:
        device: the training device.
        dtype: the compute dtype (the CPU rate is measured in it).
        peak_tflops: ``logging.peak_tflops``; when set it is the answer for any device.

    GPUs: the dense 16-bit tensor-core figure of :data:`GPU_PEAK_TFLOPS` (also for fp32 runs, as torchtitan does, so
    MFU compares against what the hardware offers); an unknown GPU gives one warning and NaN. CPU: measured once per
    dtype with a matmul in the compute dtype, since bf16 and fp32 matmuls run at different rates on CPUs.
    """
    if peak_tflops is not None:
        return peak_tflops * 1e12, "logging.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        hit = gpu_peak_tflops(name)
        if hit is None:
            _warn_unknown_gpu(name)
            return float("nan"), f"unknown GPU {name!r}: MFU not computed; set logging.peak_tflops"
        return hit[0] * 1e12, f"table ({hit[1]}, dense 16-bit)"
    return _measured_cpu_peak(dtype), f"measured {str(dtype).replace('torch.', '')} matmul"


@functools.cache
def _warn_unknown_gpu(name: str) -> None:
    """One warning per GPU name and process."""
    warnings.warn(
        f"GPU {name!r} is not in pretrain.metrics.GPU_PEAK_TFLOPS: MFU is not computed. Set logging.peak_tflops to its "
        f"dense 16-bit (bf16/fp16, without sparsity) peak in TFLOP/s from the vendor's data sheet",
        RuntimeWarning,
        stacklevel=3,
    )


def count_forward_flops(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor) -> float:
    """FLOPs of one forward per image (counted with torch's FlopCounterMode on a real batch)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images, mask)
    return counter.get_total_flops() / images.shape[0]


def trim_jsonl(path: Path, last_step: int) -> int:
    """Drop the records of ``path`` past ``last_step`` (and a torn last line), atomically; returns how many went.

    A resumed run repeats the steps after its checkpoint: the killed run's records for them would otherwise stay in
    the file next to the new ones. The file is rewritten under a temporary name and renamed, so a crash leaves
    either the old or the trimmed file.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            dropped += 1  # a line cut short by a kill mid-write
            continue
        if step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


class MetricsLogger:
    """Writes metrics on rank 0 only (other ranks get a no-op logger).

    Console lines (messages and one line per log step) also go to ``run_dir/train.log`` (appended, never trimmed, so
    it keeps the history of every start of the run). TensorBoard, the JSONL file, the trackers (W&B, MLflow; see
    :mod:`pretrain.tracking`) and the progress bar open in :meth:`begin`, once the step the run (re)starts from is
    known.

    Args:
        run_dir: run directory (train.log, tb/, metrics.jsonl and images/ go under it).
        cfg: the logging section.
        rank: this process's rank.
        total_steps: optimizer steps of the run (progress bar and ETA).
        run_config: the resolved configuration as plain containers (:func:`pretrain.config.to_dict`), stored by the
            trackers with the run; None stores none.
    """

    def __init__(
        self, run_dir: Path, cfg: Any, rank: int, total_steps: int, run_config: dict[str, Any] | None = None
    ) -> None:
        self.enabled = rank == 0
        self.run_dir = run_dir
        self.cfg = cfg
        self.total_steps = total_steps
        self.run_config = run_config
        self.bar = None
        self.tb = None
        self.jsonl = None
        self.text = None
        self.trackers: list[Tracker] = []
        self.images_dir = run_dir / "images"
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.text = open(run_dir / "train.log", "a", buffering=1)  # noqa: SIM115 - closed in close()
        self.text.write(f"---- {time.strftime('%Y-%m-%d %H:%M:%S')} start (pid {os.getpid()})\n")

    def begin(self, start_step: int) -> None:
        """Open TensorBoard, the JSONL file and the progress bar for a run that continues after ``start_step``.

        Entries of an earlier, killed run past ``start_step`` are dropped: TensorBoard through ``purge_step``, the
        JSONL file by rewriting it without them (see :func:`trim_jsonl`).
        """
        if not self.enabled:
            return
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)
        if self.cfg.jsonl:
            path = self.run_dir / "metrics.jsonl"
            dropped = trim_jsonl(path, start_step)
            if dropped:
                self.message(
                    f"metrics.jsonl: dropped {dropped} records past step={start_step}, where this run continues "
                    f"(left by an earlier run that went further)"
                )
            self.jsonl = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self.trackers = open_trackers(self.cfg, self.run_dir, self.run_config, start_step)
        for tracker in self.trackers:
            how = "continues" if tracker.resumed else "started"
            self.message(f"{tracker.name}: {how} run {tracker.run_id} (id kept in {self.run_dir / 'tracking'})")
        if self.cfg.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """One log step: console line, TensorBoard scalars, JSONL record, progress bar."""
        if not self.enabled:
            return
        eta = scalars.get("eta_s", float("nan"))
        line = (
            f"step={step}/{self.total_steps} loss={scalars['loss']:.5f} lr={scalars['lr']:.3e} "
            f"grad_norm={scalars.get('grad_norm', float('nan')):.3f} img/s={scalars['throughput_total']:.1f} "
            f"mfu={scalars.get('mfu_pct', float('nan')):.2f}% data={scalars['data_loading_pct']:.0f}% "
            f"skipped={int(scalars.get('skipped_samples', 0))} eta={_hms(eta)}"
        )
        if "loss_scale" in scalars:
            line += (
                f" loss_scale={scalars['loss_scale']:g} overflow_skips={int(scalars.get('overflow_skipped_steps', 0))}"
            )
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss={scalars['loss']:.4f} img/s={scalars['throughput_total']:.1f}")
        self.message(line)
        self.write_scalars(step, scalars)

    def log_eval(self, step: int, epoch: int, scalars: dict[str, float]) -> None:
        """An evaluation (``eval/...`` scalars): one console line, then as :meth:`write_scalars`."""
        if not self.enabled:
            return
        self.message(f"step={step} epoch={epoch} " + " ".join(f"{k}={v:.4f}" for k, v in scalars.items()))
        self.write_scalars(step, scalars)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """``scalars`` of ``step`` to TensorBoard (finite values), metrics.jsonl (as they are) and the trackers."""
        if not self.enabled:
            return
        if self.tb is not None:
            for key, value in scalars.items():
                if value is not None and math.isfinite(value):
                    self.tb.add_scalar(_TB_NAMES.get(key, key), value, step)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        if self.trackers:
            finite = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(v)}
            self._to_trackers(step, lambda tracker: tracker.log_scalars(step, finite))

    def log_images(
        self,
        step: int,
        images: torch.Tensor,
        mask: torch.Tensor,
        reconstruction: torch.Tensor,
        mean: list[float],
        std: list[float],
        patch_size: int,
        *,
        prefix: str = "",
        count: int = 4,
    ) -> Path | None:
        """Grid of (input, masked input, reconstruction) rows for up to ``count`` images, to TensorBoard
        (``{prefix}reconstruction``) and a PNG (``images/{prefix}step-N.png``, "/" written "-").

        ``reconstruction`` is in the input's normalised pixel space (see
        :func:`pretrain.simmim.reconstruction_in_input_space`), so all three rows are drawn alike.
        """
        if not self.enabled:
            return None
        from torchvision.utils import make_grid, save_image

        n = min(count, images.shape[0])
        mean_t = torch.tensor(mean).view(1, -1, 1, 1)
        std_t = torch.tensor(std).view(1, -1, 1, 1)
        images = images[:n].float().cpu() * std_t + mean_t
        pixels = mask[:n].float().cpu().repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
        masked = images * (1 - pixels.unsqueeze(1))
        rec = reconstruction[:n].float().cpu() * std_t + mean_t
        grid = make_grid(torch.cat([images, masked, rec]).clamp(0, 1), nrow=n)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        path = self.images_dir / f"{prefix.replace('/', '-')}step-{step:08d}.png"
        save_image(grid, path)
        if self.tb is not None:
            self.tb.add_image(f"{prefix}reconstruction", grid, step)
        self._to_trackers(step, lambda tracker: tracker.log_image(step, path))
        return path

    def _to_trackers(self, step: int, call: Callable[[Tracker], None]) -> None:
        """``call`` on each tracker. A tracker that fails (its server went away mid-run) is dropped with a message:
        the run goes on, and metrics.jsonl and TensorBoard still hold everything."""
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:
                self.trackers.remove(tracker)
                self.message(
                    f"{tracker.name}: logging failed at step={step} ({type(exc).__name__}: {exc}); no more "
                    f"{tracker.name} logging in this start of the run (metrics.jsonl and TensorBoard go on)"
                )
                with contextlib.suppress(Exception):
                    tracker.close(1)

    def message(self, text: str) -> None:
        """A console line on rank 0 (above the progress bar when there is one), also appended to train.log."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)
        self.record(text)

    def record(self, text: str) -> None:
        """A line for train.log only (e.g. the error that ends the run, which the entry point prints itself)."""
        if self.text is not None:
            self.text.write(text + "\n")

    def close(self, exit_code: int = 0) -> None:
        """Close every output; ``exit_code`` (the trainer's) tells the trackers how this start of the run ended."""
        trackers, self.trackers = self.trackers, []
        try:
            for tracker in trackers:
                tracker.close(exit_code)
        finally:
            for handle in (self.bar, self.tb, self.jsonl, self.text):
                if handle is not None:
                    handle.close()
            self.bar = self.tb = self.jsonl = self.text = None


_TB_NAMES = {
    "loss": "loss_metrics/global_avg_loss",
    "lr": "lr",
    "grad_norm": "grad_norm",
    "loss_scale": "loss_scale",
    "throughput_per_device": "throughput(img/s per device)",
    "throughput_total": "throughput(img/s total)",
    "data_loading_pct": "time_metrics/data_loading(%)",
    "memory_max_gib": "memory/max_active(GiB)",
    "tflops": "tflops",
    "mfu_pct": "mfu(%)",
    "skipped_samples": "data/skipped_samples",
    "nonfinite_steps": "loss_metrics/nonfinite_steps",
    "overflow_skipped_steps": "loss_metrics/overflow_skipped_steps",
}


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
