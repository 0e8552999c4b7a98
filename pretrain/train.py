"""The training loop: data -> DeepSpeed engine -> metrics, with checkpoints, resume and preemption.

Exit codes: 0 done; 2 configuration or data error (before any heavy work); 75 preempted after saving a complete
checkpoint (the SLURM script requeues on it); 1 anything else (including too many non-finite losses in a row).
"""

from __future__ import annotations

import os
import platform
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import CheckpointError, find_latest_complete, read_marker, save_checkpoint
from .config import PretrainConfig, to_dict, to_yaml
from .data import build_pretrain_loader, steps_per_epoch
from .distributed import LaunchEnv, init_process_group
from .engine import backend_for, build_engine, compute_dtype, resolve_device
from .metrics import MetricsLogger, count_forward_flops, peak_flops

__all__ = ["EXIT_PREEMPTED", "NonFiniteLossError", "run"]

EXIT_PREEMPTED = 75


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses."""


class _StopFlag:
    """Set by SIGUSR1/SIGTERM; the handler only records the signal, the loop acts at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum


def _versions() -> dict[str, str]:
    import deepspeed

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": platform.python_version()}


def _grad_norm(engine: Any) -> float | None:
    """Global gradient norm before clipping, for ZeRO stage 0 (DeepSpeed reports it itself for the ZeRO optimizers)."""
    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


def _engine_grad_norm(engine: Any) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _resume_target(cfg: PretrainConfig, ckpt_dir: Path, world_size: int) -> tuple[Path | None, bool]:
    """(checkpoint to resume from or None, whether it is a universal checkpoint)."""
    choice = cfg.checkpoint.resume
    if choice == "none":
        return None, False
    if choice == "auto":
        target = find_latest_complete(ckpt_dir)
        if target is None:
            return None, False
    else:
        target = Path(choice)
        if not target.is_dir():
            raise CheckpointError(f"checkpoint.resume={choice!r} is not a checkpoint directory")
    universal = target.with_name(target.name + "_universal")
    meta = read_marker(target)
    # ZeRO stages 1-3 partition the optimizer state by rank: DeepSpeed 0.19 reloads them only at the world size
    # they were saved with (checked: it raises for ZeRO-2 as for ZeRO-3). The universal format is world-size free.
    if meta["world_size"] != world_size and meta["zero_stage"] >= 1:
        if universal.is_dir():
            return universal, True
        raise CheckpointError(
            f"{target} was saved by ZeRO-{meta['zero_stage']} at world size {meta['world_size']}, this run has "
            f"{world_size}: partitioned optimizer state cannot be reloaded at another world size. Convert it first "
            f"with `python -m pretrain.convert universal {target}` (writes {universal.name}, used automatically), "
            f"or resume with {meta['world_size']} processes"
        )
    return target, False


def run(cfg: PretrainConfig, launch: LaunchEnv) -> int:
    """Train according to ``cfg`` in this process (one rank of ``launch``); returns the exit code."""
    rank, world = launch.rank, launch.world_size
    run_dir = Path(cfg.training.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    device = resolve_device(cfg, launch.local_rank)
    # Data problems are found before the process group and the model exist.
    loader_steps = steps_per_epoch(cfg, world)
    accum = cfg.training.grad_accum_steps
    opt_steps_per_epoch = loader_steps // accum
    if opt_steps_per_epoch == 0:
        print(
            f"config error: an epoch has {loader_steps} batches, fewer than training.grad_accum_steps={accum}",
            file=sys.stderr,
        )
        return 2
    total_steps = cfg.schedule.epochs * opt_steps_per_epoch
    if cfg.training.max_steps is not None:
        total_steps = min(total_steps, cfg.training.max_steps)

    init_process_group(backend_for(cfg, device), cfg.distributed.timeout_minutes)
    resume_from, universal = _resume_target(cfg, ckpt_dir, world)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "config.yaml.partial"
        tmp.write_text(to_yaml(cfg))
        os.replace(tmp, run_dir / "config.yaml")
    print(
        f"rank={rank} local_rank={launch.local_rank} world_size={world} nodes={launch.num_nodes} "
        f"host={os.environ.get('SLURMD_NODENAME', platform.node())} device={device} launcher={launch.launcher}",
        flush=True,
    )

    engine = build_engine(cfg, world, opt_steps_per_epoch, load_universal=universal)
    step, epoch, data_position, images_seen = 0, 0, 0, 0
    if resume_from is not None:
        load_dir, tag = (resume_from.parent, resume_from.name)
        _, client = engine.load_checkpoint(str(load_dir), tag=tag)
        if client is None:
            raise CheckpointError(f"DeepSpeed could not load {resume_from}")
        step, epoch = int(client["step"]), int(client["epoch"])
        data_position, images_seen = int(client["data_position"]), int(client["images_seen"])
        if rank == 0:
            print(f"resumed from {resume_from} at step={step} (epoch {epoch}, batch {data_position})", flush=True)

    metrics = MetricsLogger(run_dir, cfg.logging, rank, total_steps, step)
    stop = _StopFlag()
    stop.install()
    dtype = compute_dtype(cfg)
    flops_per_image: float | None = None
    peak, peak_source = peak_flops(device)
    if rank == 0:
        metrics.message(
            f"peak {peak / 1e12:.2f} TFLOP/s per device ({peak_source}); {total_steps} steps, "
            f"{opt_steps_per_epoch} per epoch, global batch {cfg.data.batch_size * world * accum}"
        )

    nonfinite_in_row = nonfinite_total = skipped_total = 0
    grad_norm: float | None = None
    window_loss = window_count = 0.0
    window_start = time.perf_counter()
    data_time = 0.0
    window_images = 0
    micro = 0
    exit_code = 0
    try:
        while step < total_steps and exit_code == 0:
            loader = build_pretrain_loader(cfg, rank=rank, world_size=world, epoch=epoch, start_step=data_position)
            fetch_start = time.perf_counter()
            for batch in loader:
                data_time += time.perf_counter() - fetch_start
                data_position += 1
                images = batch["images"].to(device, dtype=dtype, non_blocking=True)
                mask = batch["mask"].to(device, non_blocking=True)
                if flops_per_image is None:
                    flops_per_image = count_forward_flops(engine, images[:1], mask[:1])
                # Seeded per (seed, rank, micro-step): stochastic depth is reproducible across resume.
                torch.manual_seed(cfg.training.seed * 1_000_003 + rank * 7_919 + step * accum + micro)
                loss = engine(images, mask)
                stats = torch.tensor(
                    [
                        loss.detach().float().item(),
                        float(not torch.isfinite(loss).item()),
                        float(stop.signal is not None),
                        float(batch["skipped"].sum().item()),
                    ],
                    dtype=torch.float64,
                    device=device,
                )
                dist.all_reduce(stats)
                skipped_total += int(stats[3].item())
                if stats[1].item() > 0:
                    # Some rank saw a non-finite loss: every rank skips this micro-batch (no backward, no step).
                    nonfinite_in_row += 1
                    nonfinite_total += 1
                    metrics.message(
                        f"non-finite loss at step={step + 1}: batch skipped "
                        f"({nonfinite_in_row} in a row, {nonfinite_total} in total)"
                    )
                    if nonfinite_in_row >= cfg.training.max_nonfinite_steps:
                        raise NonFiniteLossError(
                            f"{nonfinite_in_row} non-finite losses in a row (training.max_nonfinite_steps="
                            f"{cfg.training.max_nonfinite_steps}); stopping. Lower the lr, use bf16 instead of fp16, "
                            f"or resume from an earlier checkpoint"
                        )
                    fetch_start = time.perf_counter()
                    continue
                nonfinite_in_row = 0
                engine.backward(loss)
                if engine.is_gradient_accumulation_boundary():
                    grad_norm = _grad_norm(engine)
                engine.step()
                window_loss += stats[0].item() / world
                window_count += 1
                window_images += images.shape[0] * world
                micro += 1
                if micro < accum:
                    fetch_start = time.perf_counter()
                    continue
                micro = 0
                step += 1
                images_seen += cfg.data.batch_size * world * accum
                if step % cfg.logging.log_every == 0 or step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    throughput = window_images / elapsed
                    achieved = 3 * (flops_per_image or 0.0) * throughput / world
                    scalars = {
                        "loss": window_loss / window_count,
                        "lr": engine.get_lr()[0],
                        "grad_norm": grad_norm if grad_norm is not None else _engine_grad_norm(engine),
                        "throughput_total": throughput,
                        "throughput_per_device": throughput / world,
                        "data_loading_pct": 100.0 * data_time / elapsed,
                        "tflops": achieved / 1e12,
                        "mfu_pct": 100.0 * achieved / peak,
                        "skipped_samples": skipped_total,
                        "nonfinite_steps": nonfinite_total,
                        "images_seen": images_seen,
                        "epoch": epoch,
                        "eta_s": (total_steps - step) * elapsed / max(1.0, window_count / accum),
                    }
                    if cfg.training.precision == "fp16":
                        scalars["loss_scale"] = float(getattr(engine.optimizer, "cur_scale", float("nan")))
                    if device.type == "cuda":
                        scalars["memory_max_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    else:  # peak resident memory of this process (ru_maxrss is in KiB on Linux)
                        scalars["memory_max_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                    metrics.log(step, scalars)
                    window_loss = window_count = 0.0
                    window_images = 0
                    data_time = 0.0
                    window_start = time.perf_counter()
                if cfg.logging.image_every and step % cfg.logging.image_every == 0:
                    with torch.no_grad():
                        _, reconstruction = engine.module.reconstruct(images, mask)
                    metrics.log_images(
                        step,
                        images,
                        mask,
                        reconstruction,
                        list(cfg.data.mean),
                        list(cfg.data.std),
                        cfg.model.patch_size,
                    )
                preempted = stats[2].item() > 0
                if preempted or step % cfg.checkpoint.every_steps == 0 or step == total_steps:
                    client = {
                        "step": step,
                        "epoch": epoch,
                        "data_position": data_position,
                        "images_seen": images_seen,
                        "seed": cfg.training.seed,
                        "config": to_dict(cfg),
                        "world_size": world,
                        "zero_stage": cfg.distributed.zero_stage,
                        "versions": _versions(),
                        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
                    }
                    tag_dir = save_checkpoint(engine, ckpt_dir, step, client, cfg.checkpoint.keep_last)
                    metrics.message(f"saved checkpoint {tag_dir} at step={step}")
                if preempted:
                    name = signal.Signals(stop.signal).name if stop.signal else "a signal on another rank"
                    metrics.message(
                        f"preempted ({name}): complete checkpoint saved at step={step}; exiting with "
                        f"code {EXIT_PREEMPTED} so the job can be requeued and resume from it"
                    )
                    exit_code = EXIT_PREEMPTED
                    break
                if step >= total_steps:
                    break
                fetch_start = time.perf_counter()
            else:
                epoch += 1
                data_position = 0
                continue
            if step >= total_steps or exit_code:
                break
        if exit_code == 0:
            metrics.message(f"training finished at step={step}: {images_seen} images seen, run directory {run_dir}")
    finally:
        metrics.close()
    dist.barrier()
    return exit_code
