"""The training loop shared by every task (SimMIM pretraining, fine-tuning); its ``training`` config section is
:mod:`pretrain.train_config`.

How a run ends (exit codes, stop signals) is :mod:`pretrain.stopping`; what it carries from step to step is
:mod:`pretrain.train_state`.

One optimizer step (:meth:`Trainer.train_step`) runs its micro-batches without reading any device value on the host;
at the accumulation boundary one small all-reduce carries, from every rank, the step's loss, whether its loss or
gradients (or the weights after the previous step) were non-finite, its skipped-sample count and whether a stop
signal arrived. The host reads that reduction once per step. The loss stays on the device until a log step.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from swinv2 import compile_counts

from .checkpoint import CheckpointError, mark_best, read_best, resume_target, save_checkpoint
from .checks import ConfigError
from .config import to_dict, to_yaml
from .distributed import LaunchEnv, init_process_group, leave_process_group
from .engine import (
    build_engine,
    compute_dtype,
    configure_matmul_precision,
    loss_scale,
    overflow_skipped_steps,
    resolve_device,
)
from .metrics import MetricsLogger, peak_flops
from .optim import all_finite
from .plan.calibration import MemoryCalibration, calibration_for_run
from .profiling import ProfileWindow
from .runlock import RunLock, acquire_run_lock
from .stopping import EXIT_INTERRUPTED, EXIT_PREEMPTED, NonFiniteError, PeerFailure, StopFlag, exit_code_for
from .tasks import Batch, Task
from .train_state import LogWindow, StepStats, TrainState

__all__ = ["Trainer", "run"]


def _versions() -> dict[str, str]:
    import deepspeed

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": platform.python_version()}


class Trainer:
    """Trains ``task`` in this process, one rank of ``launch``.

    Construction joins the process group, runs the start-up checks on every rank and agrees on their outcome (a rank
    that fails makes every rank stop within seconds with its exit code), writes the run's config, chooses the
    checkpoint to resume from, builds the engine and restores the :class:`TrainState`. :meth:`train` then runs the
    steps; :meth:`close` releases what construction opened.

    Args:
        cfg: the task's resolved configuration.
        launch: this process's place in the job.
        task: what is trained (see :mod:`pretrain.tasks`).
    """

    def __init__(self, cfg: Any, launch: LaunchEnv, task: Task) -> None:
        self.cfg, self.launch, self.task = cfg, launch, task
        self.rank, self.world = launch.rank, launch.world_size
        self.run_dir = Path(cfg.training.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.accum = cfg.training.grad_accum_steps
        self.micro_batch = cfg.data.batch_size * self.world  # samples of one micro-step over all ranks
        self.state = TrainState()
        self.stop = StopFlag()
        self.metrics: MetricsLogger | None = None
        self.lock: RunLock | None = None
        self.profiler: ProfileWindow | None = None
        self.memory: MemoryCalibration | None = None
        self._early_messages: list[str] = []  # said before train.log is open (a stale run lock taken over)
        init_process_group(self._backend(), cfg.distributed.timeout_minutes)
        try:
            self._agree_on_startup()
            self.metrics = MetricsLogger(self.run_dir, cfg.logging, self.rank, self.total_steps, to_dict(cfg))
            for text in self._early_messages:
                self.metrics.message(text)
            self._build()
        except BaseException as exc:
            self.record_error(exc)
            self.close(exit_code_for(exc))
            raise

    def _build(self) -> None:
        """After the start-up checks: resume choice, engine, restored state, metrics and signal handlers."""
        cfg = self.cfg
        self._say_where()
        resume_from, universal = resume_target(cfg, self.ckpt_dir, self.world, self.metrics.message)
        # Only rank 0 logs MFU; measuring the CPU peak on every rank at once would make them share the cores and
        # understate it. Measured before the memory is, whose peak its matrices would raise.
        dtype = compute_dtype(cfg)
        self.peak, source = peak_flops(self.device, dtype) if self.rank == 0 else (float("nan"), "rank 0 only")
        self.memory, prediction = calibration_for_run(cfg, self.task, self.rank, self.world, self.device, resume_from)
        self.metrics.message(prediction)
        self.memory.begin()
        self.engine, self.schedule = build_engine(
            cfg, self.world, self.steps_per_epoch, self.task, load_universal=universal
        )
        self.optimizer = self.schedule.optimizer  # the optimizer beneath DeepSpeed's wrappers (its skip switch)
        for note in getattr(self.task, "notes", ()):  # what the task found out while building (weights loaded, ...)
            self.metrics.message(note)
        if resume_from is not None:
            self._restore(resume_from)
        self.started_at = self.state.step  # the step this start resumed at (its second step is measured)
        self.dtype = dtype
        self.flops_per_sample: float | None = None
        self.nonfinite_in_row = 0
        self.last_batch: Batch | None = None
        self._grad_norm: torch.Tensor | None = None
        self._weights_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self.evaluated_at: int | None = None  # the step of the last evaluation (none twice at one step)
        # A task with ``eval_every_steps`` (pretraining) evaluates every N steps (0: never) instead of at epoch ends.
        self.eval_every: int | None = getattr(self.task, "eval_every_steps", None)
        self.saved_at: int | None = None  # the step of this start's last save
        self.best = self._read_best()
        self.window = LogWindow(self.device)
        self.metrics.begin(self.state.step)
        self.profiler = ProfileWindow(cfg.training.profile, self.run_dir, self.rank, self.state.step)
        if cfg.training.profile.enabled:
            self.metrics.message(self.profiler.note)
        self.metrics.message(
            f"peak {self.peak / 1e12:.2f} TFLOP/s per device ({source}); {self.total_steps} steps, "
            f"{self.steps_per_epoch} per epoch, global batch {self.micro_batch * self.accum}"
        )
        self.stop.install()

    def record_error(self, exc: BaseException) -> None:
        """The error that ends the run, into train.log (the entry point prints it on the console)."""
        if self.metrics is not None:
            self.metrics.record(f"error: {type(exc).__name__}: {exc}")

    def close(self, exit_code: int = 0) -> None:
        """Release what construction opened: the profiler (writing a window cut short), the metrics and trackers
        (told how the run ended) and the run lock. Safe to call twice."""
        profiler, metrics, lock, memory = self.profiler, self.metrics, self.lock, self.memory
        self.profiler = self.metrics = self.lock = self.memory = None
        self.stop.uninstall()
        try:
            if memory is not None:
                memory.close()
            if profiler is not None:
                profiler.close()
            if metrics is not None:
                metrics.close(exit_code)
        finally:
            if lock is not None:
                lock.release()

    # ------------------------------------------------------------------------------------------------- start-up
    def _backend(self) -> str:
        """The process-group backend, known before the device is checked (the group must exist to agree on
        checks)."""
        if self.cfg.distributed.backend != "auto":
            return self.cfg.distributed.backend
        return "nccl" if self.cfg.training.device != "cpu" and torch.cuda.is_available() else "gloo"

    def _startup_checks(self) -> None:
        """What can fail on one rank and not another (devices, data, the output directory)."""
        self.device = resolve_device(self.cfg, self.launch.local_rank)
        configure_matmul_precision(self.cfg.training.tf32, self.device)
        batches = self.task.resolve_data(self.world)
        self.steps_per_epoch = batches // self.accum
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"an epoch has {batches} batches per rank, fewer than training.grad_accum_steps={self.accum}"
            )
        self.total_steps = self.cfg.schedule.epochs * self.steps_per_epoch
        if self.cfg.training.max_steps is not None:
            self.total_steps = min(self.total_steps, self.cfg.training.max_steps)
        if self.rank == 0:
            self._prepare_run_dir()

    def _prepare_run_dir(self) -> None:
        """Rank 0: create the run directory, take its run lock (a second run in it stops here) and write the
        config."""
        from .atomic import write_text_atomic

        where = f"training.output_dir={str(self.run_dir)!r}"
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"{where} is a file, not a directory; accepted: a directory (created when missing)")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock = acquire_run_lock(
                self.run_dir, self.cfg.checkpoint.lock_stale_hours * 3600, self._early_messages.append
            )
            write_text_atomic(self.run_dir / "config.yaml", to_yaml(self.cfg))
        except OSError as exc:
            raise ConfigError(
                f"{where} cannot be written: {exc.strerror or exc} ({exc.filename or self.run_dir})"
            ) from None

    def _agree_on_startup(self) -> None:
        """Run the start-up checks on every rank and share the outcome: a rank that fails raises its own error, the
        others a :class:`PeerFailure` with its exit code, instead of waiting for it until the collective timeout."""
        failure: BaseException | None = None
        try:
            self._startup_checks()
        except Exception as exc:
            failure = exc
        outcome = None if failure is None else (exit_code_for(failure), str(failure))
        outcomes: list[Any] = [None] * self.world
        dist.all_gather_object(outcomes, outcome)
        if failure is not None:
            raise failure
        for rank, result in enumerate(outcomes):
            if result is not None:
                raise PeerFailure(rank, *result)

    def _say_where(self) -> None:
        launch = self.launch
        where = (
            f"rank={self.rank} local_rank={launch.local_rank} world_size={self.world} nodes={launch.num_nodes} "
            f"host={os.environ.get('SLURMD_NODENAME', platform.node())} device={self.device} "
            f"launcher={launch.launcher} task={self.task.name}"
        )
        if self.rank == 0:
            self.metrics.message(where)
        else:
            print(where, flush=True)

    def _restore(self, resume_from: Path) -> None:
        _, client = self.engine.load_checkpoint(str(resume_from.parent), tag=resume_from.name)
        if client is None:
            raise CheckpointError(f"DeepSpeed could not load {resume_from}")
        self.state.load_state_dict(client)
        load_task_state = getattr(self.task, "load_state_dict", None)
        if load_task_state is not None and client.get("task_state") is not None:
            load_task_state(client["task_state"])
        s, say = self.state, self.metrics.message
        batch = s.epoch_samples // self.micro_batch
        say(
            f"resumed from {resume_from} at step={s.step} (epoch {s.epoch}, sample {s.epoch_samples} of the epoch = "
            f"batch {batch} at {self.micro_batch} images per micro-step over {self.world} ranks)"
        )
        repeated = s.epoch_samples - batch * self.micro_batch
        if repeated:
            say(
                f"the saved sample offset {s.epoch_samples} is not a multiple of this run's {self.micro_batch} "
                f"images per micro-step: the last {repeated} samples before it are seen again"
            )
        s.epoch_samples = batch * self.micro_batch
        saved = client.get("config", {})
        saved_batch = (
            int(saved.get("data", {}).get("batch_size", self.cfg.data.batch_size))
            * int(client.get("world_size", self.world))
            * int(saved.get("training", {}).get("grad_accum_steps", self.accum))
        )
        if saved_batch != self.micro_batch * self.accum:
            say(
                f"the global batch changes from {saved_batch} to {self.micro_batch * self.accum} images per step: the "
                f"schedule continues at step {s.step} with this run's steps per epoch and scaled learning rate; keep "
                f"data.batch_size x world size x training.grad_accum_steps equal to continue the same run"
            )

    # ----------------------------------------------------------------------------------------------------- loop
    def train(self) -> int:
        """Run until the schedule's end, ``training.max_steps`` or a stop signal; returns the exit code."""
        s = self.state
        while s.step < self.total_steps:
            start = s.epoch_samples // self.micro_batch
            batches = iter(self.task.batches(rank=self.rank, world_size=self.world, epoch=s.epoch, start_step=start))
            while s.step < self.total_steps and s.epoch_samples // self.micro_batch + self.accum <= (
                self.steps_per_epoch * self.accum
            ):
                code = self.finish_step(self.train_step(batches))
                if code is not None:
                    return code
            del batches  # stops this epoch's data workers before the next epoch starts its own
            epoch_done = s.epoch_samples // self.micro_batch + self.accum > self.steps_per_epoch * self.accum
            if epoch_done and self.eval_every is None:
                self.evaluate(final=s.step >= self.total_steps)  # the epoch is complete (not cut by max_steps)
            s.epoch, s.epoch_samples = s.epoch + 1, 0
        self.evaluate(final=True)
        self.metrics.message(
            f"training finished at step={s.step}: {s.images_seen} images seen, run directory {self.run_dir}"
        )
        return 0

    def train_step(self, batches: Iterator[Batch]) -> StepStats:
        """One optimizer step over ``grad_accum_steps`` micro-batches from ``batches``.

        No device value is read on the host before the boundary; there, one all-reduce (see :meth:`_reduce`) decides
        on every rank alike whether the update is applied.
        """
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        loss_finite = torch.ones((), dtype=torch.bool, device=self.device)
        skipped = samples = 0
        sources: dict[str, int] = {}  # samples per source of a mixture (plain ints from the loader)
        data_seconds = 0.0
        seed = self.cfg.training.seed * 1_000_003 + self.rank * 7_919 + self.state.step * self.accum
        for micro in range(self.accum):
            start = time.perf_counter()
            batch = next(batches)
            data_seconds += time.perf_counter() - start
            skipped += int(batch["skipped"])
            for name, count in batch.get("sources", {}).items():
                sources[name] = sources.get(name, 0) + count
            samples += self.task.samples(batch)
            if self.flops_per_sample is None:
                self.flops_per_sample = self.task.forward_flops(self.engine, batch, self.device, self.dtype)
            torch.manual_seed(seed + micro)  # stochastic depth reproducible across resume
            loss = self.task.loss(self.engine, batch, self.device, self.dtype)
            detached = loss.detach().float()
            loss_sum += detached
            loss_finite &= torch.isfinite(detached)
            self.engine.backward(loss)
            if micro < self.accum - 1:
                self.engine.step()  # DeepSpeed counts micro-steps in step(); it updates only at the boundary
            self.last_batch = batch
        flags = self._reduce(loss_sum, loss_finite, self._local_grads_finite(), skipped, list(sources.values()))
        loss_bad, grads_bad, weights_bad, skipped_total, terminate, interrupt = flags[1:7]
        self.optimizer.skip_next_step = bool(loss_bad or grads_bad)
        self.schedule.set_step(self.state.step)
        overflow_before = overflow_skipped_steps(self.engine)
        self.engine.step()
        self.optimizer.skip_next_step = False
        # DeepSpeed's ZeRO and bf16 optimizers skip a step with a non-finite gradient norm themselves (on every rank
        # alike); under fp16 that is the loss scaler's normal overflow, counted separately.
        engine_skipped = overflow_skipped_steps(self.engine) > overflow_before
        grads_bad = bool(grads_bad) or (engine_skipped and self.cfg.training.precision != "fp16")
        self._weights_finite = all_finite([getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()])
        return StepStats(
            loss=flags[0],
            applied=not (loss_bad or grads_bad or engine_skipped),
            nonfinite_loss=bool(loss_bad),
            nonfinite_grads=grads_bad,
            weights_nonfinite=bool(weights_bad),
            skipped_samples=int(skipped_total),
            source_samples=dict(zip(sources, flags[7:], strict=True)),
            samples=samples * self.world,
            stop_signals=(bool(terminate), bool(interrupt)),
            data_seconds=data_seconds,
        )

    def _local_grads_finite(self) -> torch.Tensor:
        """Whether the gradients this rank holds are finite (a device bool). At ZeRO-0 in fp32 they are the whole,
        averaged gradients and DeepSpeed runs the plain optimizer: this check is then the only one, and its norm is
        the logged grad_norm. Under ZeRO and the 16-bit optimizers DeepSpeed checks the global norm as well."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if self.engine.zero_optimization_stage() == 0 and self.cfg.training.precision == "fp32" and grads:
            self._grad_norm = torch.nn.utils.get_total_norm(grads)
            return torch.isfinite(self._grad_norm)
        return all_finite(grads).to(self.device)

    def _reduce(
        self,
        loss_sum: torch.Tensor,
        loss_finite: torch.Tensor,
        grads_finite: torch.Tensor,
        skipped: int,
        source_counts: list[int],
    ) -> tuple[Any, ...]:
        """The step's one collective and its one host read: (mean loss as a device tensor, then as host numbers
        over all ranks: ranks with a non-finite loss, with non-finite gradients, with non-finite weights after the
        previous step, skipped samples, ranks with SIGTERM/SIGUSR1, ranks with SIGINT, then the samples of each
        source of a mixture, in the loader's order, which every rank shares)."""
        device_part = torch.stack(
            [
                loss_sum.double(),
                (~loss_finite).double(),
                (~grads_finite).double(),
                (~self._weights_finite).double(),
            ]
        )
        host_part = torch.tensor(
            [skipped, self.stop.terminate, self.stop.interrupt, *source_counts], dtype=torch.float64
        )
        stats = torch.cat([device_part, host_part.to(self.device, non_blocking=True)])
        dist.all_reduce(stats)
        mean_loss = stats[0] / (self.world * self.accum)
        return (mean_loss, *(int(v) for v in stats[1:].tolist()))

    # ----------------------------------------------------------------------------------------- after each step
    def finish_step(self, stats: StepStats) -> int | None:
        """Counters, the non-finite guard, logs, pictures and saving; the exit code when the run stops
        here, else None."""
        s = self.state
        if stats.weights_nonfinite:
            raise NonFiniteError(
                f"the weights became non-finite in the update of step={s.step}; no checkpoint is written with them, "
                f"so auto-resume continues from the last complete one. Lower the lr, use bf16 instead of fp16, or "
                f"resume from an earlier checkpoint"
            )
        s.step += 1
        self.profiler.step(s.step)
        s.epoch_samples += self.micro_batch * self.accum  # the data position: every sample drawn, read or not
        s.skipped_samples += stats.skipped_samples
        if stats.applied:
            s.images_seen += stats.samples
            self.nonfinite_in_row = 0
            after_step = getattr(self.task, "after_step", None)
            if after_step is not None:
                after_step(self.engine)  # e.g. fine-tuning's EMA of the weights
        elif stats.nonfinite_loss or stats.nonfinite_grads:
            self._count_nonfinite(stats)
        self.window.add(stats)
        if s.step == 1 and self.cfg.model.compile:
            graphs, breaks = compile_counts()
            self.metrics.message(f"model.compile: {graphs} compiled graphs after the first step, {breaks} graph breaks")
        self._log()
        measured = self.memory.after_step(s.step - self.started_at)
        if measured is not None:  # rank 0, step 2 of this start: measured against predicted peak memory
            self.metrics.message(measured[0])
            if measured[1]:
                self.metrics.write_scalars(s.step, measured[1])
        self.task.log_images(self.engine, self.last_batch, s.step, self.metrics)
        if stats.stop or s.step % self.cfg.checkpoint.every_steps == 0 or s.step == self.total_steps:
            self.save()
        if not stats.stop and self.eval_every and s.step % self.eval_every == 0:
            self.evaluate(final=s.step >= self.total_steps)
        if not stats.stop:
            return None
        terminate, _ = stats.stop_signals
        code = EXIT_PREEMPTED if terminate else EXIT_INTERRUPTED
        what = ", ".join(self.stop.received) or "a signal on another rank"
        self.metrics.message(
            f"{'preempted' if code == EXIT_PREEMPTED else 'interrupted'} ({what}): complete checkpoint saved at "
            f"step={s.step}; exiting with code {code}"
            + (" so the job can be requeued and resume from it" if code == EXIT_PREEMPTED else "")
        )
        return code

    def _count_nonfinite(self, stats: StepStats) -> None:
        s = self.state
        self.nonfinite_in_row += 1
        s.nonfinite_steps += 1
        what = "loss" if stats.nonfinite_loss else "gradients"
        self.metrics.message(
            f"non-finite {what} at step={s.step}: update skipped on every rank "
            f"({self.nonfinite_in_row} in a row, {s.nonfinite_steps} in total)"
        )
        limit = self.cfg.training.max_nonfinite_steps
        if self.nonfinite_in_row >= limit:
            raise NonFiniteError(
                f"{self.nonfinite_in_row} non-finite {'losses' if stats.nonfinite_loss else 'gradients'} in a row "
                f"(training.max_nonfinite_steps={limit}); stopping. Lower the lr, use bf16 instead of fp16, or resume "
                f"from an earlier checkpoint"
            )

    def _log(self) -> None:
        """On log steps: the window's scalars to the console, TensorBoard and metrics.jsonl (the only place the loss
        is read on the host)."""
        s, cfg = self.state, self.cfg
        if s.step % cfg.logging.log_every and s.step != self.total_steps:
            return
        window = self.window
        elapsed = window.elapsed()
        throughput = window.samples / elapsed
        achieved = 3 * (self.flops_per_sample or 0.0) * throughput / self.world
        if self._grad_norm is not None:
            grad_norm = float(self._grad_norm)
        else:
            norm = self.engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
        scalars = {
            "loss": window.mean_loss(),
            "lr": self.engine.get_lr()[0],
            "grad_norm": grad_norm,
            "throughput_total": throughput,
            "throughput_per_device": throughput / self.world,
            "data_loading_pct": 100.0 * window.data_seconds / elapsed,
            "tflops": achieved / 1e12,
            "mfu_pct": 100.0 * achieved / self.peak,
            "skipped_samples": s.skipped_samples,
            # A mixture's samples per source over the log window (every rank's, in the plan's proportions).
            **{f"source_samples/{name}": count for name, count in window.sources.items()},
            "nonfinite_steps": s.nonfinite_steps,
            # Steps DeepSpeed itself skipped on an fp16 gradient overflow (the loss scale then drops).
            "overflow_skipped_steps": overflow_skipped_steps(self.engine),
            "images_seen": s.images_seen,
            "epoch": s.epoch,
            "eta_s": (self.total_steps - s.step) * elapsed / max(1, window.steps),
        }
        if cfg.training.precision == "fp16":
            scalars["loss_scale"] = loss_scale(self.engine)
        if self.device.type == "cuda":
            scalars["memory_max_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:  # peak resident memory of this process (ru_maxrss is in KiB on Linux)
            scalars["memory_max_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.metrics.log(s.step, scalars)
        self.window = LogWindow(self.device)

    # ------------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, final: bool = False) -> dict[str, float] | None:
        """Collective: the task's evaluation at this step (tasks without an ``evaluate`` hook have none), logged as
        ``eval/...``; a new best of the task's ``best_metric`` keeps this step's checkpoint (saved now if needed)."""
        hook = getattr(self.task, "evaluate", None)
        s = self.state
        if hook is None or self.evaluated_at == s.step:
            return None
        start = time.perf_counter()
        scalars = hook(self.engine, rank=self.rank, world_size=self.world, epoch=s.epoch, final=final)
        if scalars is None:
            return None
        self.evaluated_at = s.step
        seconds = time.perf_counter() - start
        self.window.exclude(seconds)
        self.metrics.log_eval(s.step, s.epoch, {**scalars, "eval/seconds": seconds})
        metric = getattr(self.task, "best_metric", None)
        if metric in scalars and (self.best is None or scalars[metric] > self.best["value"]):
            self._keep_best(metric, float(scalars[metric]))
        return scalars

    def _read_best(self) -> dict[str, Any] | None:
        """Rank 0's best-checkpoint record of this run (a resumed run goes on comparing with it), on every rank."""
        box: list[Any] = [read_best(self.ckpt_dir) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _keep_best(self, metric: str, value: float) -> None:
        """Collective: this step's checkpoint becomes the best one (pruning keeps it besides the last k)."""
        if self.saved_at != self.state.step:
            self.save()
        if self.rank == 0:
            mark_best(self.ckpt_dir, self.state.step, metric, value, self.cfg.checkpoint.keep_last)
        dist.barrier()
        self.best = {"step": self.state.step, "metric": metric, "value": value}
        self.metrics.message(f"new best {metric}={value:.4f} at step={self.state.step}: checkpoint kept")

    # ------------------------------------------------------------------------------------------------- checkpoint
    def client_state(self) -> dict[str, Any]:
        """What is saved with the engine's state: the TrainState and what tools read (config, world size, stage)."""
        return {
            **self.state.state_dict(),
            "data_position": self.state.epoch_samples // self.micro_batch,  # per-rank batches, for tools
            "seed": self.cfg.training.seed,
            "task": self.task.name,
            "config": to_dict(self.cfg),
            "world_size": self.world,
            "zero_stage": self.cfg.distributed.zero_stage,
            "versions": _versions(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
            "task_state": self.task.state_dict() if hasattr(self.task, "state_dict") else None,
        }

    def save(self) -> Path:
        """Collective: save a complete checkpoint of this step, after every rank checked its weights are finite."""
        finite = self._weights_finite.to(torch.float64)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite.item()):
            raise NonFiniteError(
                f"the weights are non-finite at step={self.state.step}: no checkpoint is written with them; lower the "
                f"lr or resume from the last complete checkpoint"
            )
        tag_dir = save_checkpoint(
            self.engine, self.ckpt_dir, self.state.step, self.client_state(), self.cfg.checkpoint.keep_last
        )
        self.saved_at = self.state.step
        self.metrics.message(f"saved checkpoint {tag_dir} at step={self.state.step}")
        return tag_dir


def run(cfg: Any, launch: LaunchEnv, task: Task) -> int:
    """Train ``task`` in this process (one rank of ``launch``); returns the exit code."""
    trainer = Trainer(cfg, launch, task)
    code = 1
    try:
        code = trainer.train()
    except KeyboardInterrupt as exc:
        trainer.record_error(exc)
        code = EXIT_INTERRUPTED
        raise
    except BaseException as exc:
        trainer.record_error(exc)
        code = exit_code_for(exc)
        raise
    finally:
        trainer.close(code)
    leave_process_group()  # the entry point then ends the process through finish_process (see there why)
    return code
