"""The trainer end to end: real DeepSpeed engines in 1 and 2 processes (gloo on CPU), real files."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.launch import (
    REPO,
    free_port,
    log_text,
    losses,
    rank_env,
    read_records,
    run_ranks,
    start_ranks,
    tiny_overrides,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(image_folder) -> Path:
    return image_folder(48)


@pytest.fixture(scope="module")
def images_with_corrupt(image_folder) -> Path:
    """48 images and 4 unreadable files: batches report skipped samples (52 files = 6 steps of 8 per epoch)."""
    return image_folder(48, corrupt=4)


def _records(run_dir: Path) -> list[dict]:
    """The training-step records of metrics.jsonl (not the evaluations or the memory calibration)."""
    return [r for r in read_records(run_dir) if "loss" in r]


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars as the TensorBoard reader sees them (purged steps of a restarted run removed)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]} | {
        "__images__": reader.Tags()["images"]
    }


def _run_module(module: str, args: list[str], world: int, timeout: float = 600) -> list[str]:
    """``python -m MODULE ARGS`` as ranks 0..world-1 of one gloo job; returns their outputs (all must exit 0)."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env=rank_env(rank, world, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * world, "\n".join(o[-3000:] for o in outputs)
    return outputs


def _run(tmp: Path, name: str, images: Path, world: int, **overrides: object) -> dict[int, float]:
    run_dir, logs = tmp / name, tmp / f"{name}-logs"
    codes = run_ranks(tiny_overrides(run_dir, images, **overrides), world, logs)
    assert codes == [0] * world, log_text(logs)
    return losses(run_dir)


def _assert_close(reference: dict[int, float], other: dict[int, float], rel: float = 1e-5, name: str = "") -> None:
    assert sorted(other) == sorted(reference)
    for step, value in reference.items():
        assert other[step] == pytest.approx(value, rel=rel), f"{name} step {step}: {other[step]} vs {value}"


def test_zero_stages_reproduce_single_process(tmp_path: Path, images: Path) -> None:
    """ZeRO 1, 2, 3 (and 3 with activation checkpointing) in 2 processes == 1 process, same global batch of 8; so
    does ZeRO-2 with compiled blocks (model.compile) under activation checkpointing, to float32 reordering."""
    reference = _run(tmp_path, "single", images, 1, **{"data.batch_size": 8, "training.max_steps": 5})
    assert len(reference) == 5
    variants = {
        "zero1": {"distributed.zero_stage": 1},
        "zero2": {"distributed.zero_stage": 2},
        "zero3": {"distributed.zero_stage": 3},
        "zero3-ckpt": {"distributed.zero_stage": 3, "model.activation_checkpointing": "all"},
        "zero2-compile-ckpt": {
            "distributed.zero_stage": 2,
            "model.compile": "true",
            "model.activation_checkpointing": "all",
        },
    }
    for name, extra in variants.items():
        result = _run(tmp_path, name, images, 2, **{"data.batch_size": 4, "training.max_steps": 5, **extra})
        # Compiled kernels sum in another order than eager ones: equal to float32 rounding, not bit for bit.
        _assert_close(reference, result, rel=1e-4 if "compile" in name else 1e-5, name=name)
    assert "compile: true" in (tmp_path / "zero2-compile-ckpt" / "config.yaml").read_text()
    # Every run calibrates the planner: rank 0's measured peak of step 2 against the prediction, within 10%.
    for name in ("zero1", "zero2", "zero3", "zero3-ckpt"):
        (memory,) = [r for r in read_records(tmp_path / name) if "memory/measured_over_predicted" in r]
        assert 0.9 <= memory["memory/measured_over_predicted"] <= 1.1, (name, memory)
    # 4 stages of one block each: 4 block kinds, every one compiled, nothing left eager behind a graph break.
    assert (
        "model.compile: 4 compiled graphs after the first step, 0 graph breaks"
        in (tmp_path / "zero2-compile-ckpt" / "train.log").read_text()
    )


def test_gradient_accumulation_with_clipping_and_offload_matches_large_batch(tmp_path: Path, images: Path) -> None:
    """2 processes at ZeRO-2 with optimizer CPU offload, 2 micro-batches of 2 each accumulated == 1 process with a
    batch of 8, with a clip threshold that is active (DeepSpeed clips and steps only at the accumulation boundary)."""
    large = _run(tmp_path, "b8", images, 1, **{"data.batch_size": 8, "training.max_steps": 4})
    clipped_large = _run(
        tmp_path, "b8c", images, 1, **{"data.batch_size": 8, "training.max_steps": 4, "optimizer.clip_grad": 0.05}
    )
    accumulated = _run(
        tmp_path,
        "2x2x2",
        images,
        2,
        **{
            "data.batch_size": 2,
            "training.grad_accum_steps": 2,
            "training.max_steps": 4,
            "optimizer.clip_grad": 0.05,
            "distributed.zero_stage": 2,
            "distributed.offload_optimizer": "true",
        },
    )
    _assert_close(clipped_large, accumulated)
    assert large != clipped_large  # the clip threshold is active, so the comparison covers clipping
    assert "offload" in (tmp_path / "2x2x2" / "config.yaml").read_text()


def test_resume_after_kill_equals_uninterrupted(tmp_path: Path, images_with_corrupt: Path) -> None:
    """6 straight steps == 3 steps, kill -9 of the whole job, 3 resumed steps: losses, skipped-sample totals, and
    metrics.jsonl / TensorBoard without the killed run's entries past step 3. An unmarked checkpoint is skipped."""
    data = images_with_corrupt
    common = {"distributed.zero_stage": 1, "training.max_steps": 6, "checkpoint.every_steps": 3}
    straight_dir = tmp_path / "straight"
    assert run_ranks(tiny_overrides(straight_dir, data, **common), 2, tmp_path / "straight-logs") == [0, 0]
    straight = {r["step"]: r for r in _records(straight_dir)}
    # The broken files fall in the first 3 steps: a total that restarted from 0 after resume would differ.
    assert straight[3]["skipped_samples"] > 0

    run_dir = tmp_path / "killed"
    killed = {**common, "training.max_steps": 1000, "logging.tensorboard": "true"}
    procs = start_ranks(tiny_overrides(run_dir, data, **killed), 2, tmp_path / "killed-logs-1")
    marker = run_dir / "checkpoints" / "step-3" / "COMPLETE"
    deadline = time.time() + 300

    def logged_past_3() -> bool:
        jsonl = run_dir / "metrics.jsonl"
        return marker.exists() and jsonl.exists() and '"step": 4,' in jsonl.read_text()

    while not logged_past_3() and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert logged_past_3(), log_text(tmp_path / "killed-logs-1")
    # The kill may land after a later save: resume from step 3 in any case.
    for later in (run_dir / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > 3:
            shutil.rmtree(later)

    codes = run_ranks(tiny_overrides(run_dir, data, **common, **{"logging.tensorboard": "true"}), 2, tmp_path / "l2")
    assert codes == [0, 0], log_text(tmp_path / "l2")
    text = log_text(tmp_path / "l2")
    assert "resumed from" in text and "at step=3" in text
    assert "metrics.jsonl: dropped" in text
    records = _records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # the killed run's records past step 3 are gone
    for step in (4, 5, 6):
        assert records[step - 1]["loss"] == straight[step]["loss"], f"step {step}"
    assert records[-1]["skipped_samples"] == straight[6]["skipped_samples"]
    assert records[-1]["images_seen"] == straight[6]["images_seen"]
    losses_tb = _scalars(run_dir / "tb")["loss_metrics/global_avg_loss"]
    assert [step for step, _ in losses_tb] == [1, 2, 3, 4, 5, 6]
    assert losses_tb[-1][1] == pytest.approx(straight[6]["loss"], rel=1e-6)
    # train.log keeps both starts (appended), with the resume.
    log = (run_dir / "train.log").read_text()
    assert log.count(" start (pid ") == 2 and "resumed from" in log and "step=6/6" in log

    # Remove the newest checkpoint's marker: a resume must take step-3, not the half-written step-6.
    (run_dir / "checkpoints" / "step-6" / "COMPLETE").unlink()
    codes = run_ranks(tiny_overrides(run_dir, data, **common), 2, tmp_path / "killed-logs-3")
    assert codes == [0, 0]
    assert "at step=3" in log_text(tmp_path / "killed-logs-3")


def test_killed_rank_does_not_hang_the_others(tmp_path: Path, images: Path) -> None:
    run_dir = tmp_path / "orphan"
    args = tiny_overrides(
        run_dir,
        images,
        **{"training.max_steps": 100000, "distributed.zero_stage": 2, "distributed.timeout_minutes": 1.0},
    )
    procs = start_ranks(args, 2, tmp_path / "orphan-logs")
    deadline = time.time() + 300
    while "step=2/" not in log_text(tmp_path / "orphan-logs") and time.time() < deadline:
        assert procs[0].poll() is None, log_text(tmp_path / "orphan-logs")
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    # Bounded by distributed.timeout_minutes (1 min here; a generous start-up wait on a loaded CI machine).
    try:
        code = procs[0].wait(timeout=180)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("rank 0 hung after rank 1 was killed")
    assert code != 0
    assert time.time() - killed_at < 180


def test_preemption_signal_saves_and_exits_75(tmp_path: Path, images: Path) -> None:
    run_dir = tmp_path / "preempt"
    args = tiny_overrides(run_dir, images, **{"training.max_steps": 100000, "distributed.zero_stage": 2})
    procs = start_ranks(args, 2, tmp_path / "preempt-logs")
    deadline = time.time() + 300
    while "step=2/" not in log_text(tmp_path / "preempt-logs") and time.time() < deadline:
        assert all(p.poll() is None for p in procs), log_text(tmp_path / "preempt-logs")
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGUSR1)  # one rank is enough: the flag is shared at the next step boundary
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [75, 75], log_text(tmp_path / "preempt-logs")
    text = log_text(tmp_path / "preempt-logs")
    assert "preempted" in text and "exiting with code 75" in text
    saved = sorted((run_dir / "checkpoints").glob("step-*/COMPLETE"))
    assert saved, text


def test_config_error_exits_2_before_heavy_work(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "--config", "configs/demo_cpu.yaml", "model.window_size=5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "model.window_size=5" in proc.stderr and "windows that divide" in proc.stderr


def test_zero3_holds_half_of_parameters_and_optimizer_state_per_rank(tmp_path: Path) -> None:
    args = [
        "model.size=tiny",
        "model.img_size=64",
        "model.window_size=4",
        "simmim.mask_patch_size=16",
        "simmim.norm_target_patch_size=7",
        "data.batch_size=2",
        "training.precision=fp32",
        "training.device=cpu",
        "distributed.zero_stage=3",
    ]
    outputs = _run_module("tests.helpers.zero3_partition", args, 2)
    reports = [
        json.loads(line.split("PARTITION ", 1)[1])
        for out in outputs
        for line in out.splitlines()
        if line.startswith("PARTITION ")
    ]
    assert len(reports) == 2
    full = reports[0]["full"]
    assert full > 27_000_000  # SwinV2-T backbone + SimMIM decoder
    for report in reports:
        # Each rank holds its half of every parameter (padding to the world size adds at most one element each)
        # and the AdamW moments of that half only.
        assert abs(report["params"] - full / 2) / full < 0.01, report
        assert abs(report["state"] - full) / full < 0.02, report  # exp_avg + exp_avg_sq of half the parameters
    assert sum(r["params"] for r in reports) >= full


def test_world_size_change_resumes_through_automatic_universal_conversion(tmp_path: Path, images: Path) -> None:
    """ZeRO-3 saved by 2 ranks resumes on 1, ZeRO-2 saved by 1 rank resumes on 2: rank 0 converts to DeepSpeed's
    universal format by itself, says so, and the data continues from the global sample offset, so with the same
    global batch the resumed steps equal an uninterrupted 1-process run's."""
    reference = _run(tmp_path, "reference", images, 1, **{"data.batch_size": 8, "training.max_steps": 4})
    batch = {1: 8, 2: 4}  # per-rank micro-batch keeping the global batch at 8
    for stage, before, after in ((3, 2, 1), (2, 1, 2)):
        run_dir = tmp_path / f"zero{stage}"
        common = {"distributed.zero_stage": stage}
        first = tiny_overrides(run_dir, images, **common, **{"training.max_steps": 2, "data.batch_size": batch[before]})
        logs = tmp_path / f"zero{stage}-1"
        assert run_ranks(first, before, logs) == [0] * before, log_text(logs)
        second = tiny_overrides(run_dir, images, **common, **{"training.max_steps": 4, "data.batch_size": batch[after]})
        codes = run_ranks(second, after, tmp_path / f"zero{stage}-2")
        text = log_text(tmp_path / f"zero{stage}-2")
        assert codes == [0] * after, text
        universal = run_dir / "checkpoints" / "step-2_universal"
        assert f"saved by ZeRO-{stage} at world size {before}, this run has {after}" in text
        assert "converts it to DeepSpeed's universal format now" in text
        assert f"resumed from {universal} at step=2 (epoch 0, sample 16 of the epoch = batch 2 at 8 images" in text
        assert (universal / "UNIVERSAL").is_file()
        resumed = {step: loss for step, loss in losses(run_dir).items() if step > 2}
        _assert_close({step: reference[step] for step in (3, 4)}, resumed, name=f"zero{stage} {before}->{after}")


def test_zero3_param_groups_resume_decision_and_stale_marker_on_real_engines(tmp_path: Path) -> None:
    """In 2 gloo processes (tests/helpers/engine_checks.py): parameter groups under zero.Init equal stage 0's; the
    resume checkpoint is rank 0's choice even when rank 1 sees another; a save into a step folder that already holds
    a complete checkpoint, cut short, leaves no marker (and no stale universal copy); keep-last pruning."""
    outputs = _run_module(
        "tests.helpers.engine_checks", [str(tmp_path), *tiny_overrides(tmp_path / "run", tmp_path)], 2
    )
    for name in ("zero3_param_groups", "resume_decision_is_rank0s", "overwrite_removes_stale_marker"):
        for rank, output in enumerate(outputs):
            assert f"CHECK {name} ok (rank {rank})" in output, output[-3000:]


def test_bf16_zero2_metrics_images_pruning_and_explicit_resume(tmp_path: Path, images: Path) -> None:
    """The default precision (bf16) on 2 processes at ZeRO-2: finite losses; every metric in TensorBoard and the
    JSONL file; reconstruction PNGs; train.log; keep-last pruning. Then an explicit checkpoint.resume=PATH into the
    middle of the run, which moves the later complete step-3 aside (auto-resume must not pick it over this run's own
    checkpoints) and saves its own step-3; and a PATH without a marker refused clearly."""
    run_dir = tmp_path / "bf16"
    settings = {
        "training.precision": "bf16",
        "distributed.zero_stage": 2,
        "training.max_steps": 3,
        "checkpoint.every_steps": 1,
        "checkpoint.keep_last": 2,
        "logging.image_every": 1,
        "logging.tensorboard": "true",
    }
    assert run_ranks(tiny_overrides(run_dir, images, **settings), 2, tmp_path / "l1") == [0, 0], log_text(
        tmp_path / "l1"
    )
    records = _records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records), records
    expected_keys = {
        "step", "loss", "lr", "grad_norm", "throughput_total", "throughput_per_device", "data_loading_pct", "tflops",
        "mfu_pct", "skipped_samples", "nonfinite_steps", "overflow_skipped_steps", "images_seen", "epoch", "eta_s",
        "memory_max_gib",
    }  # fmt: skip
    assert set(records[-1]) == expected_keys
    assert all(math.isfinite(records[-1][k]) for k in ("grad_norm", "tflops", "mfu_pct", "memory_max_gib"))
    scalars = _scalars(run_dir / "tb")
    for tag in (
        "loss_metrics/global_avg_loss",
        "lr",
        "grad_norm",
        "throughput(img/s per device)",
        "throughput(img/s total)",
        "time_metrics/data_loading(%)",
        "memory/max_active(GiB)",
        "tflops",
        "mfu(%)",
        "data/skipped_samples",
    ):
        assert [step for step, _ in scalars.get(tag, [])] == [1, 2, 3], (tag, sorted(scalars))
    assert "reconstruction" in scalars["__images__"]
    for step in (1, 2, 3):
        with Image.open(run_dir / "images" / f"step-{step:08d}.png") as grid:
            assert grid.format == "PNG" and grid.width > 32 and grid.height > 3 * 32  # 3 rows of 32-px images
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-2", "step-3"]
    assert (run_dir / "config.yaml").is_file()
    log = (run_dir / "train.log").read_text()
    assert "step=3/3" in log and f"saved checkpoint {run_dir / 'checkpoints' / 'step-3'}" in log

    step2 = run_dir / "checkpoints" / "step-2"
    again = tiny_overrides(run_dir, images, **{**settings, "checkpoint.resume": str(step2), "logging.image_every": 0})
    assert run_ranks(again, 2, tmp_path / "l2") == [0, 0], log_text(tmp_path / "l2")
    assert f"resumed from {step2} at step=2" in log_text(tmp_path / "l2")
    rerun = _records(run_dir)
    assert [r["step"] for r in rerun] == [1, 2, 3]
    assert rerun[2]["loss"] == pytest.approx(records[2]["loss"], rel=1e-6)
    (abandoned,) = (run_dir / "checkpoints" / "abandoned").iterdir()
    assert abandoned.name.startswith("resumed-at-step-2-")
    assert sorted(p.name for p in abandoned.iterdir()) == ["step-3"]
    assert (abandoned / "step-3" / "COMPLETE").is_file() and any(abandoned.glob("step-3/*model_states.pt"))
    assert f"checkpoint.resume={step2}: moved the later complete checkpoints step-3 " in log_text(tmp_path / "l2")
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-2", "step-3"]
    assert (run_dir / "checkpoints" / "step-3" / "COMPLETE").is_file()

    unmarked = run_dir / "checkpoints" / "step-9"
    unmarked.mkdir()
    bad = tiny_overrides(run_dir, images, **{**settings, "checkpoint.resume": str(unmarked)})
    assert run_ranks(bad, 1, tmp_path / "l3") == [2]
    message = log_text(tmp_path / "l3")
    assert f"checkpoint.resume={str(unmarked)!r}: {unmarked} has no COMPLETE marker" in message
    assert f"the newest complete one next to it is {run_dir / 'checkpoints' / 'step-3'}" in message


def test_non_finite_losses_are_skipped_then_stop(tmp_path: Path, images: Path) -> None:
    # An absurd learning rate drives the weights to inf after the first step, so every later loss is non-finite.
    run_dir = tmp_path / "nan"
    args = tiny_overrides(
        run_dir,
        images,
        **{
            "training.max_steps": 50,
            "optimizer.base_lr": 1e30,
            "optimizer.clip_grad": 0,
            "training.max_nonfinite_steps": 3,
        },
    )
    assert run_ranks(args, 1, tmp_path / "nan-logs") == [1]
    text = log_text(tmp_path / "nan-logs")
    assert "non-finite loss at step=" in text and "(1 in a row, 1 in total)" in text
    assert "3 non-finite losses in a row (training.max_nonfinite_steps=3); stopping" in text


def test_set_aside_later_moves_later_complete_checkpoints_and_their_universal_copies(tmp_path: Path) -> None:
    from pretrain.checkpoint import list_complete, set_aside_later

    ckpt = tmp_path / "checkpoints"
    for step in (1, 2, 3, 10):
        (ckpt / f"step-{step}").mkdir(parents=True)
        (ckpt / f"step-{step}" / "COMPLETE").write_text(json.dumps({"step": step}))
    (ckpt / "step-10_universal").mkdir()
    (ckpt / "step-11").mkdir()  # cut short (no marker): not a resume candidate, left for the overwriting save
    assert set_aside_later(ckpt, 10) == (None, [])
    dest, moved = set_aside_later(ckpt, 2)
    assert moved == ["step-3", "step-10"] and dest.parent == ckpt / "abandoned"
    assert sorted(p.name for p in dest.iterdir()) == ["step-10", "step-10_universal", "step-3"]
    assert [p.name for p in list_complete(ckpt)] == ["step-1", "step-2"]
    assert (ckpt / "step-11").is_dir()
    # A second resume within the same second gets its own folder.
    (ckpt / "step-5").mkdir()
    (ckpt / "step-5" / "COMPLETE").write_text("{}")
    again, moved = set_aside_later(ckpt, 2)
    assert moved == ["step-5"] and again != dest and (again / "step-5" / "COMPLETE").is_file()


def _start_in_own_group(args: list[str], log: Path) -> subprocess.Popen:
    """``python -m pretrain ARGS`` as one rank in a new process group (as a shell job or a SLURM step is)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "w")  # noqa: SIM115 - owned by the process
    return subprocess.Popen(
        [sys.executable, "-m", "pretrain", *args],
        cwd=REPO,
        env=rank_env(0, 1, free_port()),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    assert text in log.read_text(), log.read_text()[-3000:]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_signal_to_the_whole_process_group_saves_with_data_workers(
    tmp_path: Path, images: Path, signum: int, code: int
) -> None:
    """SLURM's preemption, scancel and node drain, and Ctrl-C in a terminal, signal every process of the job, data
    workers included: the workers ignore it, the trainer saves at the step boundary and exits 75 (130 for SIGINT).
    A second run in the same directory meanwhile is refused with exit code 2, naming the holder."""
    run_dir, log = tmp_path / "run", tmp_path / "logs" / "rank0.log"
    # Long enough (1000 epochs) that the run is still going when the second one starts and the signal arrives.
    args = tiny_overrides(run_dir, images, **{"schedule.epochs": 1000, "data.num_workers": 2, "logging.log_every": 1})
    proc = _start_in_own_group(args, log)
    try:
        _wait_for(log, "step=2/", proc)
        if signum == signal.SIGTERM:
            second = subprocess.run(
                [sys.executable, "-m", "pretrain", *args],
                cwd=REPO,
                env=rank_env(0, 1, free_port()),
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert second.returncode == 2, second.stderr[-3000:]
            assert "is in use by another run" in second.stderr and f"pid {proc.pid}" in second.stderr
        os.killpg(proc.pid, signum)
        assert proc.wait(timeout=120) == code, log.read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "is killed by signal" not in text and "Traceback" not in text, text[-3000:]
    assert f"exiting with code {code}" in text
    saved = sorted((run_dir / "checkpoints").glob("step-*/COMPLETE"))
    assert saved, text
    assert not (run_dir / "run.lock").exists()  # released on the way out


def test_a_rank_failing_its_start_up_checks_stops_every_rank_within_seconds(tmp_path: Path, images: Path) -> None:
    """Rank 0 alone prepares the run directory; here it is a file. Rank 1 learns it through the start-up agreement
    instead of waiting for the collective timeout, and exits with rank 0's code."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file")
    start = time.time()
    codes = run_ranks(tiny_overrides(blocker, images), 2, tmp_path / "logs", timeout=300)
    assert codes == [2, 2], log_text(tmp_path / "logs", 1)
    assert f"training.output_dir={str(blocker)!r} is a file" in log_text(tmp_path / "logs", 0)
    assert "rank 0 failed its start-up checks (exit code 2)" in log_text(tmp_path / "logs", 1)
    assert time.time() - start < 120  # the collective timeout is 2 minutes in tiny_overrides


def test_output_dir_on_a_read_only_filesystem_is_one_line_naming_it(tmp_path: Path, images: Path) -> None:
    readonly = tmp_path / "ro"
    readonly.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here (root needed): {mounted.stderr.decode().strip()}")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pretrain", *tiny_overrides(readonly / "run", images)],
            cwd=REPO,
            env=rank_env(0, 1, free_port()),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        subprocess.run(["umount", str(readonly)], check=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"training.output_dir={str(readonly / 'run')!r} cannot be written: Read-only file system" in last, last


def test_two_ranks_train_on_http_shards(tmp_path: Path, images: Path) -> None:
    """Shards served by a real HTTP server: the size index is read from beside them, both ranks stream them."""
    from pretrain.shards import write_shards
    from tests.helpers.shard_server import ShardServer

    write_shards(images, tmp_path / "shards", maxcount=12, progress=False)  # 4 shards of 12 and sizes.json
    run_dir = tmp_path / "run"
    with ShardServer(tmp_path / "shards") as server:
        args = tiny_overrides(
            run_dir,
            images,
            **{
                "data.source": "webdataset",
                "data.path": server.url("shard-{000000..000003}.tar"),
                "data.shuffle_buffer": 8,
                "training.max_steps": 3,
                "logging.log_every": 1,
            },
        )
        codes = run_ranks(args, 2, tmp_path / "logs", timeout=300)
    assert codes == [0, 0], log_text(tmp_path / "logs")
    assert sorted(losses(run_dir)) == [1, 2, 3]
    assert "6 per epoch" in log_text(tmp_path / "logs")  # 48 samples from the remote sizes.json, 2 ranks x 4
