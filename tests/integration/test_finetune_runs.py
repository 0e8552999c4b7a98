"""Fine-tuning end to end with 2 gloo ranks: SimMIM pretraining under ZeRO-2 (64 px, window 4), fine-tuning from its
DeepSpeed checkpoint at another geometry (96 px, window 6, pretrained windows [4, 4, 4, 2]) under ZeRO-2 with every
backbone key loaded strictly, evaluation over 7 validation images (not divisible by 2) counted once, and
``--eval-only`` on the fine-tuned checkpoint reproducing the last evaluation. And preemption of a one-rank fine-tune
on a class folder: SIGTERM saves and exits 75, and the resumed run continues exactly as an uninterrupted one."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.launch import (
    log_text,
    losses,
    make_image_folder,
    read_records,
    run_ranks,
    start_ranks,
    tiny_finetune_overrides,
    tiny_overrides,
)

pytestmark = pytest.mark.slow


def _run(module: str, args: list[str], log_dir: Path, world: int = 2) -> list[str]:
    """``python -m MODULE ARGS`` as ``world`` ranks; returns each rank's output (asserting exit code 0)."""
    codes = run_ranks(args, world, log_dir, timeout=300, module=module)
    texts = [log_text(log_dir, rank) for rank in range(world)]
    assert codes == [0] * world, texts[0][-3000:]
    return texts


def test_finetune_from_a_zero2_pretraining_checkpoint_with_distributed_evaluation(tmp_path: Path) -> None:
    train = make_image_folder(tmp_path / "train", 16)
    val = make_image_folder(tmp_path / "val", 7, seed=1)
    pre = tmp_path / "pre"
    _run(
        "pretrain",
        tiny_overrides(
            pre,
            train,
            **{"model.img_size": 64, "simmim.mask_patch_size": 16, "data.batch_size": 2, "training.max_steps": 2},
            **{"distributed.zero_stage": 2},
        ),
        tmp_path / "logs",
    )
    ft = tmp_path / "ft"
    common = [
        "model.size=tiny",
        "model.embed_dim=16",
        "model.depths=[1,1,1,1]",
        "model.num_heads=[1,1,2,2]",
        "model.img_size=96",
        "model.window_size=6",
        "model.pretrained_window_sizes=[4,4,4,2]",
        f"data.train_path={train}",
        f"data.val_path={val}",
        "data.batch_size=2",
        "data.num_workers=0",
        "training.device=cpu",
        "training.precision=fp32",
        "distributed.zero_stage=2",
        "distributed.timeout_minutes=2",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
    ]
    texts = _run(
        "pretrain.finetune",
        [
            *common,
            f"finetune.init={pre}",
            f"training.output_dir={ft}",
            "schedule.epochs=1",
            "schedule.warmup_epochs=0",
            "optimizer.lr_reference_batch=0",
        ],
        tmp_path / "logs",
    )
    assert "pretrained windows [4, 4, 4, 2]" in texts[0]
    assert "tensors of" in texts[0] and "strictly; the head is new" in texts[0]
    evals = [r for r in read_records(ft) if "eval/top1" in r]
    assert len(evals) == 1 and evals[0]["eval/samples"] == 7 and evals[0]["step"] == 4
    best = json.loads((ft / "checkpoints" / "BEST.json").read_text())
    assert best["tag"] == "step-4"
    # --eval-only on the ZeRO-2 checkpoint (consolidated in memory) at the same world size: the same figures.
    texts = _run("pretrain.finetune", [*common, "--eval-only", str(ft)], tmp_path / "logs")
    result = json.loads(next(line for line in reversed(texts[0].splitlines()) if line.startswith("{")))
    assert result["eval/samples"] == 7
    for key in ("eval/top1", "eval/top5", "eval/loss"):
        assert result[key] == pytest.approx(evals[0][key], abs=1e-5), key


def _finetune_args(run_dir: Path, train: Path, val: Path, **extra: object) -> list[str]:
    """A tiny one-rank fine-tune with the recipe's augmentations (RandAugment, random erasing, Mixup/CutMix, label
    smoothing) and drop path on: every random draw they make must continue exactly across a resume."""
    recipe: dict[str, object] = {
        "model.drop_path_rate": 0.1,
        "augment.auto_augment": "rand-m9-mstd0.5-inc1",
        "schedule.epochs": 50,  # long: the preempted run must still be going when the signal arrives
        "finetune.eval_every_epochs": 0,
    }
    return tiny_finetune_overrides(run_dir, train, val, **{**recipe, **extra})


def _start(args: list[str], log_dir: Path) -> subprocess.Popen:
    """One rank of ``python -m pretrain.finetune ARGS``, its output in log_dir/rank0.log."""
    return start_ranks(args, 1, log_dir, module="pretrain.finetune")[0]


def test_preempted_finetune_saves_exits_75_and_resumes_exactly(tmp_path: Path) -> None:
    """SIGTERM to a running ``python -m pretrain.finetune`` (one rank, class folders): a complete checkpoint at the
    step it was in, exit 75; the resumed run's losses equal those of an uninterrupted run, bit for bit."""
    train = make_image_folder(tmp_path / "train", 40)  # 10 steps per epoch: the signal lands mid-epoch mostly
    val = make_image_folder(tmp_path / "val", 6, seed=1)
    end = 16
    # The uninterrupted reference runs beside the preempted run (start-up is most of the time of both).
    straight_dir = tmp_path / "straight"
    straight = _start(_finetune_args(straight_dir, train, val, **{"training.max_steps": end}), tmp_path / "s")
    run_dir, logs = tmp_path / "preempted", tmp_path / "p"
    proc = _start(_finetune_args(run_dir, train, val), logs)
    log = logs / "rank0.log"
    try:
        deadline = time.time() + 180
        while "step=2/" not in log.read_text() and time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 75, log.read_text()[-3000:]
        assert straight.wait(timeout=180) == 0, log_text(tmp_path / "s")[-3000:]
    finally:
        for p in (proc, straight):
            if p.poll() is None:
                p.kill()
    text = log.read_text()
    assert "preempted (SIGTERM)" in text and "exiting with code 75" in text, text[-3000:]
    saved = [int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*/COMPLETE")]
    assert len(saved) == 1 and 2 <= saved[0] <= end - 2, text[-3000:]
    stop = saved[0]
    assert max(losses(run_dir)) == stop  # nothing was trained past the saved step

    resumed = _start(_finetune_args(run_dir, train, val, **{"training.max_steps": end}), tmp_path / "r")
    assert resumed.wait(timeout=180) == 0, log_text(tmp_path / "r")[-3000:]
    resumed_text = log_text(tmp_path / "r")
    assert "resumed from" in resumed_text and f"at step={stop} " in resumed_text, resumed_text[-3000:]

    reference, continued = losses(straight_dir), losses(run_dir)
    assert sorted(reference) == sorted(continued) == list(range(1, end + 1))
    for step in range(1, end + 1):
        assert continued[step] == reference[step], f"step {step}: {continued[step]} != uninterrupted {reference[step]}"
