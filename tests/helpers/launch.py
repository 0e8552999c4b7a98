"""Run ``python -m pretrain`` (or any module) as N local ranks with the torch launch variables set, for tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish_rank() -> NoReturn:
    """End a helper rank after its checks the way ``python -m pretrain`` ends a rank, so that a helper cannot abort in
    interpreter teardown either."""
    from pretrain.distributed import finish_process, leave_process_group

    leave_process_group()
    finish_process(0)


def rank_env(rank: int, world: int, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        # Workers run as scripts (sys.path[0] is then their own folder): the repo root makes ``tests.*`` importable.
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        **extra,
    )
    return env


def start_ranks(args: list[str], world: int, log_dir: Path, module: str = "pretrain") -> list[subprocess.Popen]:
    """Start ``python -m MODULE ARGS`` as ``world`` ranks; output of rank r goes to log_dir/rank{r}.log."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world):
        out = open(log_dir / f"rank{rank}.log", "w")  # noqa: SIM115 - owned by the process
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", module, *args],
                cwd=REPO,
                env=rank_env(rank, world, port),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def run_ranks(args: list[str], world: int, log_dir: Path, timeout: float = 600, module: str = "pretrain") -> list[int]:
    """:func:`start_ranks`, then wait for every rank (all killed if one outlives ``timeout``); their exit codes."""
    procs = start_ranks(args, world, log_dir, module)
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    return codes


def log_text(log_dir: Path, rank: int = 0) -> str:
    return (log_dir / f"rank{rank}.log").read_text()


def read_records(run_dir: Path) -> list[dict]:
    """Every record of the run's metrics.jsonl: training steps (with ``loss``), evaluations (``eval/...``) and the
    memory calibration (``memory/...``)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> logged loss, from the run's metrics.jsonl."""
    return {r["step"]: r["loss"] for r in read_records(run_dir) if "loss" in r}


def make_image_folder(root: Path, count: int, size: int = 48, seed: int = 0) -> Path:
    """``count`` random RGB JPEG/PNG images in two class subfolders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size + i % 7, size + i % 5, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:04d}.{'png' if i % 3 else 'jpg'}")
    return root


# What every tiny test run shares, pretraining or fine-tuning: the model (img 32, 4 stages, 1 block each), fp32 on
# the CPU without ZeRO, a log line per step, no TensorBoard or progress bar.
_TINY_RUN: dict[str, object] = {
    "model.size": "tiny",
    "model.embed_dim": 16,
    "model.depths": "[1,1,1,1]",
    "model.num_heads": "[1,1,2,2]",
    "model.img_size": 32,
    "model.window_size": 4,
    "model.drop_path_rate": 0.0,
    "data.batch_size": 4,
    "data.num_workers": 0,
    "optimizer.lr_reference_batch": 0,
    "schedule.warmup_epochs": 1,
    "training.precision": "fp32",
    "training.device": "cpu",
    "distributed.zero_stage": 0,
    "distributed.timeout_minutes": 2,
    "checkpoint.every_steps": 1000,
    "logging.log_every": 1,
    "logging.progress_bar": False,
    "logging.tensorboard": False,
}


def _as_overrides(values: dict[str, object], extra: dict[str, object]) -> list[str]:
    return [f"{k}={v}" for k, v in {**values, **extra}.items()]


def tiny_overrides(run_dir: Path, data: Path, **extra: object) -> list[str]:
    """A very small SimMIM config on an image folder (see _TINY_RUN); ``extra`` overrides any key."""
    values = {
        **_TINY_RUN,
        "simmim.mask_patch_size": 8,
        "simmim.norm_target_patch_size": 7,
        "data.source": "folder",
        "data.path": str(data),
        "optimizer.base_lr": 2e-4,
        "schedule.name": "cosine",
        "schedule.epochs": 5,
        "training.output_dir": str(run_dir),
        "logging.image_every": 0,
    }
    return _as_overrides(values, extra)


def tiny_finetune_overrides(run_dir: Path, train: Path, val: Path, **extra: object) -> list[str]:
    """A very small fine-tuning config on class folders (see _TINY_RUN), from random init; ``extra`` overrides any
    key."""
    values = {
        **_TINY_RUN,
        "model.pretrained_window_sizes": "[0,0,0,0]",
        "data.source": "folder",
        "data.train_path": str(train),
        "data.val_path": str(val),
        "optimizer.base_lr": 1e-3,
        "schedule.epochs": 2,
        "training.output_dir": str(run_dir),
    }
    return _as_overrides(values, extra)
