"""The trainer end to end: real DeepSpeed engines in 1 and 2 processes (gloo on CPU), real files."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.launch import (
    REPO,
    free_port,
    log_text,
    losses,
    make_image_folder,
    rank_env,
    run_ranks,
    start_ranks,
    tiny_overrides,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), 48)


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
    """ZeRO 1, 2, 3 (and 3 with activation checkpointing) in 2 processes == 1 process, same global batch of 8."""
    reference = _run(tmp_path, "single", images, 1, **{"data.batch_size": 8, "training.max_steps": 5})
    assert len(reference) == 5
    variants = {
        "zero1": {"distributed.zero_stage": 1},
        "zero2": {"distributed.zero_stage": 2},
        "zero3": {"distributed.zero_stage": 3},
        "zero3-ckpt": {"distributed.zero_stage": 3, "model.activation_checkpointing": "all"},
    }
    for name, extra in variants.items():
        result = _run(tmp_path, name, images, 2, **{"data.batch_size": 4, "training.max_steps": 5, **extra})
        _assert_close(reference, result, name=name)


def test_gradient_accumulation_matches_large_batch(tmp_path: Path, images: Path) -> None:
    """2 micro-batches of 4 accumulated == 1 batch of 8 (clipping and stepping only at the boundary)."""
    large = _run(tmp_path, "b8", images, 1, **{"data.batch_size": 8, "training.max_steps": 4})
    accumulated = _run(
        tmp_path,
        "b4x2",
        images,
        1,
        **{"data.batch_size": 4, "training.grad_accum_steps": 2, "training.max_steps": 4, "optimizer.clip_grad": 0.05},
    )
    clipped_large = _run(
        tmp_path, "b8c", images, 1, **{"data.batch_size": 8, "training.max_steps": 4, "optimizer.clip_grad": 0.05}
    )
    _assert_close(clipped_large, accumulated)
    assert large != clipped_large  # the clip threshold is active, so the comparison covers clipping


def test_resume_after_kill_equals_uninterrupted(tmp_path: Path, images: Path) -> None:
    """6 straight steps == 3 steps, kill -9 of the whole job, 3 resumed steps; an unmarked checkpoint is skipped."""
    common = {"distributed.zero_stage": 1, "training.max_steps": 6, "checkpoint.every_steps": 3}
    straight = _run(tmp_path, "straight", images, 2, **common)

    run_dir = tmp_path / "killed"
    args = tiny_overrides(run_dir, images, **{**common, "training.max_steps": 1000})
    procs = start_ranks(args, 2, tmp_path / "killed-logs-1")
    marker = run_dir / "checkpoints" / "step-3" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert marker.exists(), log_text(tmp_path / "killed-logs-1")

    codes = run_ranks(tiny_overrides(run_dir, images, **common), 2, tmp_path / "killed-logs-2")
    assert codes == [0, 0], log_text(tmp_path / "killed-logs-2")
    assert "resumed from" in log_text(tmp_path / "killed-logs-2") and "at step=3" in log_text(
        tmp_path / "killed-logs-2"
    )
    resumed = losses(run_dir)
    for step in (4, 5, 6):
        assert resumed[step] == straight[step], f"step {step}: {resumed[step]} vs {straight[step]}"

    # Remove the newest checkpoint's marker: a resume must take step-3, not the half-written step-6.
    (run_dir / "checkpoints" / "step-6" / "COMPLETE").unlink()
    codes = run_ranks(tiny_overrides(run_dir, images, **common), 2, tmp_path / "killed-logs-3")
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
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.zero3_partition", *args],
            cwd=REPO,
            env=rank_env(rank, 2, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:]
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


def test_zero2_resume_at_another_world_size_goes_through_universal(tmp_path: Path, images: Path) -> None:
    run_dir = tmp_path / "elastic"
    saved = run_ranks(
        tiny_overrides(run_dir, images, **{"training.max_steps": 2, "distributed.zero_stage": 2}), 2, tmp_path / "l1"
    )
    assert saved == [0, 0]
    single = tiny_overrides(
        run_dir, images, **{"training.max_steps": 4, "distributed.zero_stage": 2, "data.batch_size": 8}
    )
    assert run_ranks(single, 1, tmp_path / "l2") == [2]
    message = log_text(tmp_path / "l2")
    assert "saved by ZeRO-2 at world size 2, this run has 1" in message
    assert f"python -m pretrain.convert universal {run_dir / 'checkpoints' / 'step-2'}" in message
    convert = subprocess.run(
        [sys.executable, "-m", "pretrain.convert", "universal", str(run_dir / "checkpoints" / "step-2")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert convert.returncode == 0, convert.stderr[-2000:]
    assert run_ranks(single, 1, tmp_path / "l3") == [0], log_text(tmp_path / "l3")
    assert f"resumed from {run_dir / 'checkpoints' / 'step-2_universal'} at step=2" in log_text(tmp_path / "l3")
    assert sorted(losses(run_dir))[-2:] == [3, 4]


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
