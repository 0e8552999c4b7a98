"""Fine-tuning end to end with 2 gloo ranks: SimMIM pretraining under ZeRO-2 (64 px, window 4), fine-tuning from its
DeepSpeed checkpoint at another geometry (96 px, window 6, pretrained windows [4, 4, 4, 2]) under ZeRO-2 with every
backbone key loaded strictly, evaluation over 7 validation images (not divisible by 2) counted once, and
``--eval-only`` on the fine-tuned checkpoint reproducing the last evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.launch import REPO, free_port, make_image_folder, rank_env, tiny_overrides

pytestmark = pytest.mark.slow


def _run(module: str, args: list[str], log_dir: Path, world: int = 2) -> list[str]:
    """``python -m MODULE ARGS`` as ``world`` ranks; returns each rank's output (asserting exit code 0)."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world):
        out = open(log_dir / f"{module}.rank{rank}.log", "w")  # noqa: SIM115 - owned by the process
        cmd = [sys.executable, "-m", module, *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=rank_env(rank, world, port), stdout=out, stderr=out))
    codes = [p.wait(timeout=300) for p in procs]
    texts = [(log_dir / f"{module}.rank{r}.log").read_text() for r in range(world)]
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
    records = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/top1" in r]
    assert len(evals) == 1 and evals[0]["eval/samples"] == 7 and evals[0]["step"] == 4
    best = json.loads((ft / "checkpoints" / "BEST.json").read_text())
    assert best["tag"] == "step-4"
    # --eval-only on the ZeRO-2 checkpoint (consolidated in memory) at the same world size: the same figures.
    texts = _run("pretrain.finetune", [*common, "--eval-only", str(ft)], tmp_path / "logs")
    result = json.loads(next(line for line in reversed(texts[0].splitlines()) if line.startswith("{")))
    assert result["eval/samples"] == 7
    for key in ("eval/top1", "eval/top5", "eval/loss"):
        assert result[key] == pytest.approx(evals[0][key], abs=1e-5), key
