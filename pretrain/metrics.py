"""Rank-0 metrics: progress bar, console lines, TensorBoard scalars, a JSONL file and reconstruction grids.

Scalar names follow torchtitan's where one exists. MFU = achieved training FLOP/s / peak FLOP/s of the device, with
training FLOPs = 3 x forward FLOPs (recomputation by activation checkpointing not counted); the peak is a table of
dense bf16 figures for known GPUs and, on CPU, a measured float32 matmul rate.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["GPU_PEAK_TFLOPS", "MetricsLogger", "count_forward_flops", "peak_flops"]

log = logging.getLogger("pretrain")

# Dense bf16/fp16 tensor-core peaks, TFLOP/s (vendor data sheets).
GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "V100": 125.0,
}


def peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for ``device``; measured once on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"table ({key})"
        return float("nan"), f"unknown GPU {name!r}"
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        torch.mm(a, b)
    elapsed = time.perf_counter() - start
    return 2 * n**3 * reps / elapsed, "measured fp32 matmul"


def count_forward_flops(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor) -> float:
    """FLOPs of one forward per image (counted with torch's FlopCounterMode on a real batch)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images, mask)
    return counter.get_total_flops() / images.shape[0]


class MetricsLogger:
    """Writes metrics on rank 0 only (other ranks get a no-op logger).

    Args:
        run_dir: run directory (tb/, metrics.jsonl and images/ go under it).
        cfg: the logging section.
        rank: this process's rank.
        total_steps: optimizer steps of the run (progress bar and ETA).
        start_step: first step of this process (after resume).
    """

    def __init__(self, run_dir: Path, cfg: Any, rank: int, total_steps: int, start_step: int) -> None:
        self.enabled = rank == 0
        self.cfg = cfg
        self.total_steps = total_steps
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        if cfg.jsonl:
            self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()
        self.images_dir = run_dir / "images"
        if cfg.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

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
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss={scalars['loss']:.4f} img/s={scalars['throughput_total']:.1f}")
            self.bar.write(line)
        else:
            print(line, flush=True)
        if self.tb is not None:
            for key, value in scalars.items():
                if value is not None and math.isfinite(value):
                    self.tb.add_scalar(_TB_NAMES.get(key, key), value, step)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")

    def log_images(
        self,
        step: int,
        images: torch.Tensor,
        mask: torch.Tensor,
        reconstruction: torch.Tensor,
        mean: list[float],
        std: list[float],
        patch_size: int,
    ) -> Path | None:
        """Grid of (input, masked input, reconstruction) rows for up to 4 images, to TensorBoard and a PNG."""
        if not self.enabled:
            return None
        from torchvision.utils import make_grid, save_image

        n = min(4, images.shape[0])
        mean_t = torch.tensor(mean).view(1, -1, 1, 1)
        std_t = torch.tensor(std).view(1, -1, 1, 1)
        images = images[:n].float().cpu() * std_t + mean_t
        pixel_mask = mask[:n].float().cpu().repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
        masked = images * (1 - pixel_mask.unsqueeze(1))
        rec = reconstruction[:n].float().cpu()
        # The reconstruction lives in target space (locally standardised with norm_target): rescale per image.
        lo = rec.amin(dim=(1, 2, 3), keepdim=True)
        hi = rec.amax(dim=(1, 2, 3), keepdim=True)
        rec = (rec - lo) / (hi - lo + 1e-6)
        grid = make_grid(torch.cat([images, masked, rec]).clamp(0, 1), nrow=n)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        path = self.images_dir / f"step-{step:08d}.png"
        save_image(grid, path)
        if self.tb is not None:
            self.tb.add_image("reconstruction", grid, step)
        return path

    def message(self, text: str) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.write(text)
            else:
                print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


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
}


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
