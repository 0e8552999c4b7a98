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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import (
    MARKER,
    CheckpointError,
    find_latest_complete,
    has_zero_shards,
    is_complete,
    read_marker,
    save_checkpoint,
    set_aside_later,
    universal_dir,
)
from .config import PretrainConfig, to_dict, to_yaml
from .data import build_pretrain_loader, steps_per_epoch
from .distributed import LaunchEnv, init_process_group, leave_process_group
from .engine import (
    backend_for,
    build_engine,
    compute_dtype,
    loss_scale,
    overflow_skipped_steps,
    resolve_device,
)
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


def _choose_checkpoint(cfg: PretrainConfig, ckpt_dir: Path) -> Path | None:
    """The checkpoint named by checkpoint.resume (auto: the newest complete one), or None to start fresh."""
    choice = cfg.checkpoint.resume
    if choice == "none":
        return None
    if choice == "auto":
        return find_latest_complete(ckpt_dir)
    target = Path(choice)
    if not target.is_dir():
        raise CheckpointError(
            f"checkpoint.resume={choice!r}: no such directory; accepted: auto, none, or a checkpoint directory "
            f"checkpoints/step-<N> that holds a {MARKER} marker"
        )
    if not is_complete(target):
        newest = find_latest_complete(target.parent)
        hint = f" (the newest complete one next to it is {newest})" if newest is not None else ""
        raise CheckpointError(
            f"checkpoint.resume={choice!r}: {target} has no {MARKER} marker, so it is not a complete checkpoint "
            f"(its save was cut short, or it is not a step-<N> directory written by this trainer); accepted: a "
            f"step-<N> directory with the marker{hint}"
        )
    return target


def _needs_universal(target: Path, meta: dict[str, Any], world_size: int) -> bool:
    """True when DeepSpeed cannot reload ``target`` as it is at ``world_size`` processes.

    ZeRO stages 1-3 partition the optimizer state by rank, and DeepSpeed 0.19 refuses to reload partitioned state at
    another world size for every stage ("Automatic adjustment of ZeRO's optimizer state partitioning with a new world
    size is not currently supported", raised by ``_load_zero_checkpoint``; tried with ZeRO-2 and 3). Its universal
    format is world-size free. Stage 0 keeps the whole optimizer state in one file and reloads anywhere, unless the
    folder holds per-rank ``*optim_states.pt`` shards (DeepSpeed's BF16_Optimizer writes them when enabled through
    distributed.deepspeed).
    """
    if int(meta["world_size"]) == world_size:
        return False
    return int(meta["zero_stage"]) >= 1 or has_zero_shards(target)


def _plan_resume(
    cfg: PretrainConfig, ckpt_dir: Path, world_size: int, say: Callable[[str], None]
) -> tuple[Path | None, bool]:
    """Rank 0's choice: (checkpoint to resume from or None, whether it is in universal format); converts if needed."""
    target = _choose_checkpoint(cfg, ckpt_dir)
    if target is None:
        return None, False
    meta = read_marker(target)
    if cfg.checkpoint.resume != "auto":
        dest, moved = set_aside_later(ckpt_dir, int(meta["step"]))
        if dest is not None:
            say(
                f"checkpoint.resume={cfg.checkpoint.resume}: moved the later complete checkpoints {', '.join(moved)} "
                f"(of the run that went on from there) to {dest}, so that auto-resume after a preemption or crash "
                f"continues this run, not that one"
            )
    if (target / "UNIVERSAL").is_file():  # checkpoint.resume pointed at a universal copy
        return target, True
    if not _needs_universal(target, meta, world_size):
        return target, False
    universal = universal_dir(target)
    saved = (
        f"{target} was saved by ZeRO-{meta['zero_stage']} at world size {meta['world_size']}, this run has {world_size}"
    )
    if is_complete(universal) and (universal / "UNIVERSAL").is_file():
        say(f"{saved}: resuming from its universal-format copy {universal}")
        return universal, True
    say(
        f"{saved}: DeepSpeed cannot reload partitioned optimizer state at another world size, so rank 0 converts it "
        f"to DeepSpeed's universal format now (`python -m pretrain.convert universal {target}`, writing "
        f"{universal.name}); the other ranks wait for it, up to distributed.timeout_minutes="
        f"{cfg.distributed.timeout_minutes:g}. For a model too large to convert within that, run the command "
        f"beforehand"
    )
    from .convert import to_universal

    start = time.perf_counter()
    try:
        # force: a universal folder without its markers is a leftover of an interrupted conversion.
        to_universal(target, force=True)
    except Exception as exc:
        raise CheckpointError(
            f"{saved}, and its automatic conversion to DeepSpeed's universal format failed: {exc}. Convert it with "
            f"`python -m pretrain.convert universal {target}`, or resume with {meta['world_size']} processes"
        ) from exc
    say(f"converted {target} to {universal} in {time.perf_counter() - start:.1f} s")
    return universal, True


def _resume_target(
    cfg: PretrainConfig, ckpt_dir: Path, world_size: int, say: Callable[[str], None] = print
) -> tuple[Path | None, bool]:
    """Collective: (checkpoint to resume from or None, whether it is in universal format), decided by rank 0.

    Each rank listing the checkpoints itself can disagree on a shared filesystem (metadata caching, a marker written
    a moment ago), and ranks loading different checkpoints would silently diverge. Rank 0 decides, converts to the
    universal format if the world size changed, and broadcasts the result; an error on rank 0 reaches every rank, so
    none waits for a collective that never comes.
    """
    box: list[Any] = [None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            path, universal = _plan_resume(cfg, ckpt_dir, world_size, say)
            box[0] = (None if path is None else str(path), universal, None)
        except Exception as exc:
            failure = exc
            box[0] = (None, False, str(exc))
    dist.broadcast_object_list(box, src=0)
    path, universal, error = box[0]
    if failure is not None:
        raise failure
    if error is not None:
        raise CheckpointError(f"rank 0 could not choose the checkpoint to resume from: {error}")
    return (None if path is None else Path(path)), bool(universal)


def _epoch_samples(client: dict[str, Any]) -> int:
    """Samples of the current epoch consumed over all ranks when the checkpoint was saved."""
    if "epoch_samples" in client:
        return int(client["epoch_samples"])
    # Checkpoints written before the sample offset was stored: per-rank batches x the saving run's global batch.
    batch = int(client["config"]["data"]["batch_size"])
    return int(client["data_position"]) * batch * int(client["world_size"])


def _compile_report() -> str:
    """After the first step of a run with model.compile: what dynamo compiled (a graph break or a block left eager
    would show here, not only as a slower run)."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    return f"model.compile: {graphs} compiled graphs after the first step, {breaks} graph breaks"


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
    metrics = MetricsLogger(run_dir, cfg.logging, rank, total_steps)
    try:
        exit_code = _train(cfg, launch, device, metrics, run_dir, ckpt_dir, total_steps, opt_steps_per_epoch)
    except BaseException as exc:
        # The entry point prints the error on the console; train.log gets it too, next to the run's history.
        metrics.record(f"error: {type(exc).__name__}: {exc}")
        raise
    finally:
        metrics.close()
    leave_process_group()  # the entry point then ends the process through finish_process (see there why)
    return exit_code


def _train(
    cfg: PretrainConfig,
    launch: LaunchEnv,
    device: torch.device,
    metrics: MetricsLogger,
    run_dir: Path,
    ckpt_dir: Path,
    total_steps: int,
    opt_steps_per_epoch: int,
) -> int:
    rank, world = launch.rank, launch.world_size
    accum = cfg.training.grad_accum_steps
    global_batch = cfg.data.batch_size * world
    if rank == 0:
        tmp = run_dir / "config.yaml.partial"
        tmp.write_text(to_yaml(cfg))
        os.replace(tmp, run_dir / "config.yaml")
    where = (
        f"rank={rank} local_rank={launch.local_rank} world_size={world} nodes={launch.num_nodes} "
        f"host={os.environ.get('SLURMD_NODENAME', platform.node())} device={device} launcher={launch.launcher}"
    )
    if rank == 0:
        metrics.message(where)
    else:
        print(where, flush=True)
    resume_from, universal = _resume_target(cfg, ckpt_dir, world, metrics.message)

    engine = build_engine(cfg, world, opt_steps_per_epoch, load_universal=universal)
    step, epoch, data_position, images_seen = 0, 0, 0, 0
    nonfinite_total = skipped_total = 0
    if resume_from is not None:
        load_dir, tag = (resume_from.parent, resume_from.name)
        _, client = engine.load_checkpoint(str(load_dir), tag=tag)
        if client is None:
            raise CheckpointError(f"DeepSpeed could not load {resume_from}")
        step, epoch, images_seen = int(client["step"]), int(client["epoch"]), int(client["images_seen"])
        skipped_total = int(client.get("skipped_samples", 0))
        nonfinite_total = int(client.get("nonfinite_steps", 0))
        # The data position is stored as a sample offset within the epoch (global, over all ranks): it converts to
        # this run's batches whatever the world size or micro-batch (with the folder source, the epoch order and each
        # position's augmentation do not depend on either, so the data continues exactly when the offset divides).
        samples = _epoch_samples(client)
        data_position = samples // global_batch
        metrics.message(
            f"resumed from {resume_from} at step={step} (epoch {epoch}, sample {samples} of the epoch = batch "
            f"{data_position} at {global_batch} images per step over {world} ranks)"
        )
        repeated = samples - data_position * global_batch
        if repeated:
            metrics.message(
                f"the saved sample offset {samples} is not a multiple of this run's global batch {global_batch}: "
                f"the last {repeated} samples before it are seen again"
            )
        saved_cfg = client.get("config", {})
        saved_batch = (
            int(saved_cfg.get("data", {}).get("batch_size", cfg.data.batch_size))
            * int(client.get("world_size", world))
            * int(saved_cfg.get("training", {}).get("grad_accum_steps", accum))
        )
        if saved_batch != global_batch * accum:
            metrics.message(
                f"the global batch changes from {saved_batch} to {global_batch * accum} images per step: the schedule "
                f"continues at step {step} with this run's steps per epoch and scaled learning rate; keep "
                f"data.batch_size x world size x training.grad_accum_steps equal to continue the same run"
            )

    metrics.begin(step)
    stop = _StopFlag()
    stop.install()
    dtype = compute_dtype(cfg)
    flops_per_image: float | None = None
    # Only rank 0 logs MFU; measuring the CPU peak on every rank at once would make them share the cores and
    # understate it.
    peak, peak_source = peak_flops(device, dtype) if rank == 0 else (float("nan"), "not measured off rank 0")
    metrics.message(
        f"peak {peak / 1e12:.2f} TFLOP/s per device ({peak_source}); {total_steps} steps, "
        f"{opt_steps_per_epoch} per epoch, global batch {global_batch * accum}"
    )

    def client_state() -> dict[str, Any]:
        return {
            "step": step,
            "epoch": epoch,
            # Per-rank batches of this run (kept for tools) and, what resume uses, the global sample offset.
            "data_position": data_position,
            "epoch_samples": data_position * global_batch,
            "images_seen": images_seen,
            "skipped_samples": skipped_total,
            "nonfinite_steps": nonfinite_total,
            "seed": cfg.training.seed,
            "config": to_dict(cfg),
            "world_size": world,
            "zero_stage": cfg.distributed.zero_stage,
            "versions": _versions(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
        }

    nonfinite_in_row = 0
    compile_reported = not cfg.model.compile
    grad_norm: float | None = None
    window_loss = window_count = 0.0
    window_start = time.perf_counter()
    data_time = 0.0
    window_images = 0
    micro = 0
    exit_code = 0
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
            images_seen += global_batch * accum
            if not compile_reported:
                metrics.message(_compile_report())
                compile_reported = True
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
                    # Steps DeepSpeed itself skipped on an fp16 gradient overflow (the loss scale then drops).
                    "overflow_skipped_steps": overflow_skipped_steps(engine),
                    "images_seen": images_seen,
                    "epoch": epoch,
                    "eta_s": (total_steps - step) * elapsed / max(1.0, window_count / accum),
                }
                if cfg.training.precision == "fp16":
                    scalars["loss_scale"] = loss_scale(engine)
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
                tag_dir = save_checkpoint(engine, ckpt_dir, step, client_state(), cfg.checkpoint.keep_last)
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
    return exit_code
