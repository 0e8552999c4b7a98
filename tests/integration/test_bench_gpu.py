"""bench/gpu.py cannot rot: its CPU smoke mode runs every code path (numerics, both attention paths, engines at ZeRO 0
and 3, eager and compiled, with activation checkpointing) and writes its JSON; without a GPU it measures nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.launch import REPO

pytestmark = pytest.mark.slow
SCRIPT = REPO / "bench" / "gpu.py"


def _run(*args: str, hide_gpus: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )


def test_without_a_gpu_it_says_so_and_measures_nothing(tmp_path: Path) -> None:
    proc = _run("--out", str(tmp_path / "gpu.json"), hide_gpus=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA device is visible" in proc.stdout and "nothing measured" in proc.stdout
    assert not (tmp_path / "gpu.json").exists()
    proc = _run("--device", "cuda", hide_gpus=True)
    assert proc.returncode == 2 and "no CUDA device is visible" in proc.stderr
    (tmp_path / "gpu.json").write_text("{}")
    proc = _run("--device", "cpu", "--out", str(tmp_path / "gpu.json"))
    assert proc.returncode == 2 and "exists" in proc.stderr and (tmp_path / "gpu.json").read_text() == "{}"


def test_cpu_smoke_run_exercises_every_path(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = _run(
        "--device", "cpu", "--quick", "--compile-backend", "eager", "--zero", "0", "3", "--checkpointing", "all",
        "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["environment"]["device_type"] == "cpu" and result["quick"] is True
    assert {k: v["ok"] for k, v in result["numerics"].items() if isinstance(v, dict)} == {
        "cpu_sdpa": True,
        "cpu_explicit": True,
    }
    attention = result["attention"]
    assert attention["faster"] in ("sdpa", "explicit") and attention["auto_picks_now"] in ("sdpa", "explicit")
    assert attention["sdpa"]["ms_per_step"] > 0 and attention["explicit"]["ms_per_step"] > 0
    rows = result["train_step"]
    assert [(r["zero"], r["checkpointing"], r["compile"]) for r in rows] == [
        (0, "all", False),
        (3, "all", False),
        (0, "all", True),
        (3, "all", True),
    ]
    for row in rows:
        assert "error" not in row and "skipped" not in row, row
        assert row["img_per_s"] > 0 and math.isfinite(row["mfu_pct"]) and row["peak_gib"] > 0
    assert [row["how"] for row in rows] == ["eager", "eager", "compile_blocks (eager)", "engine.compile (eager)"]
    assert "training step, batch 2, bf16" in proc.stdout and f"wrote {out}" in proc.stdout
