"""Metrics units: the peak-FLOPs table on the exact names torch reports, logging.peak_tflops, the measured CPU peak and
the JSONL trim."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from pretrain.checks import ConfigError
from pretrain.config import load_config
from pretrain.metrics import GPU_PEAK_TFLOPS, gpu_peak_tflops, peak_flops, trim_jsonl

# Strings that torch.cuda.get_device_name returned on real machines (seen in public logs: torch collect_env, sglang
# check_env, nvidia-smi -L, which prints the same name, and benchmark reports), with the table entry they must hit.
DEVICE_NAMES = [
    ("NVIDIA A100-SXM4-80GB", ("A100", 312.0)),
    ("NVIDIA A100-SXM4-40GB", ("A100", 312.0)),
    ("NVIDIA A100 80GB PCIe", ("A100", 312.0)),
    ("NVIDIA A100-PCIE-40GB", ("A100", 312.0)),
    ("NVIDIA H100 80GB HBM3", ("H100", 989.0)),
    ("NVIDIA H100 PCIe", ("H100 PCIe", 756.0)),
    ("NVIDIA H100 NVL", ("H100 NVL", 835.0)),
    ("NVIDIA H200", ("H200", 989.0)),
    ("NVIDIA H200 NVL", ("H200 NVL", 835.0)),
    ("NVIDIA GH200 480GB", ("GH200", 989.0)),
    ("NVIDIA H20", ("H20", 148.0)),
    ("NVIDIA L40S", ("L40S", 362.0)),
    ("NVIDIA B200", ("B200", 2250.0)),
    ("NVIDIA GB200", ("GB200", 2500.0)),
    ("NVIDIA B300 SXM6 AC", ("B300", 2250.0)),
    ("NVIDIA GB300", ("GB300", 2500.0)),
    ("AMD Instinct MI250X/MI250", ("MI250X", 191.5)),
    ("AMD Instinct MI300X", ("MI300X", 1307.4)),
    ("AMD Instinct MI325X", ("MI325X", 1307.4)),
    ("NVIDIA A10G", ("A10G", 70.0)),
    ("NVIDIA A10", ("A10", 125.0)),
    ("NVIDIA L4", ("L4", 121.0)),
    ("Tesla V100-SXM2-32GB", ("V100", 125.0)),
    # Not in the table: MFU needs logging.peak_tflops. ROCm on some hosts gives the generic name.
    ("Tesla T4", None),
    ("NVIDIA GeForce RTX 4090", None),
    ("AMD Radeon Graphics", None),
]


@pytest.mark.parametrize(("name", "expected"), DEVICE_NAMES)
def test_gpu_peak_table_matches_whole_names(name: str, expected: tuple[str, float] | None) -> None:
    hit = gpu_peak_tflops(name)
    assert (None if hit is None else (hit[1], hit[0])) == expected


def test_every_table_key_matches_its_own_name() -> None:
    """No key is shadowed by another one that always wins; every part of issue 14 is tested on a real name above."""
    for key, tflops in GPU_PEAK_TFLOPS.items():
        assert gpu_peak_tflops(f"NVIDIA {key}") == (tflops, key)
    listed = {hit[0] for _, hit in DEVICE_NAMES if hit is not None}
    for part in ("A100", "H100", "H100 PCIe", "H100 NVL", "H200", "H20", "L40S", "B200", "GB200", "B300"):
        assert part in listed
    for part in ("MI250X", "MI300X", "MI325X"):
        assert part in listed


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, name: str) -> torch.device:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return torch.device("cuda", 0)


def test_peak_flops_of_a_gb200(monkeypatch: pytest.MonkeyPatch) -> None:
    flops, source = peak_flops(_fake_gpu(monkeypatch, "NVIDIA GB200"), torch.bfloat16)
    assert flops == 2500e12 and source == "table (GB200, dense 16-bit)"


def test_unknown_gpu_warns_once_and_peak_tflops_sets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    device = _fake_gpu(monkeypatch, "NVIDIA Test Part 9000")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = peak_flops(device, torch.bfloat16)
        second = peak_flops(device, torch.bfloat16)
    assert math.isnan(first[0]) and math.isnan(second[0])
    assert "logging.peak_tflops" in first[1]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "'NVIDIA Test Part 9000'" in messages[0] and "logging.peak_tflops" in messages[0]
    assert peak_flops(device, torch.bfloat16, peak_tflops=65.0) == (65e12, "logging.peak_tflops")
    # The override wins on a known GPU and on the CPU too (a power-capped part, a CPU figure from its data sheet).
    assert peak_flops(_fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3"), peak_tflops=700.0)[0] == 700e12
    assert peak_flops(torch.device("cpu"), torch.float32, peak_tflops=2.5) == (2.5e12, "logging.peak_tflops")


def test_peak_tflops_config_key() -> None:
    assert load_config(None, ["logging.peak_tflops=989.5"]).logging.peak_tflops == 989.5
    assert load_config(None).logging.peak_tflops is None
    for bad in ("0", "-3"):
        with pytest.raises(ConfigError, match=rf"logging.peak_tflops={float(bad)}; accepted: null .* positive"):
            load_config(None, [f"logging.peak_tflops={bad}"])
    with pytest.raises(ConfigError, match=r"logging.peak_tflops=inf; accepted: a finite number"):
        load_config(None, ["logging.peak_tflops=.inf"])


def test_tracker_config_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(None, ["logging.wandb.mode=offline", "logging.mlflow.experiment=exp"])
    wandb, mlflow = cfg.logging.wandb, cfg.logging.mlflow
    assert (wandb.enabled, wandb.mode, mlflow.enabled, mlflow.experiment) == (False, "offline", False, "exp")
    with pytest.raises(ConfigError, match=r"logging.wandb.mode='cloud' is not accepted; accepted: online, offline"):
        load_config(None, ["logging.wandb.mode=cloud"])
    with pytest.raises(ConfigError, match=r"unknown config key 'logging.wandb.projects'.*accepted keys in section "):
        load_config(None, ["logging.wandb.projects=x"])
    with pytest.raises(ConfigError, match=r"logging.mlflow.experiment is empty"):
        load_config(None, ["logging.mlflow.experiment=''"])
    # Enabling a tracker whose extra is missing fails at config time, naming the extra.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real_find_spec(n, *a))
    with pytest.raises(ConfigError, match=r"logging.mlflow.enabled=true but the 'mlflow' package is not installed.*"):
        load_config(None, ["logging.mlflow.enabled=true"])


def test_cpu_peak_is_measured_in_the_compute_dtype() -> None:
    cpu = torch.device("cpu")
    for dtype, label in ((torch.bfloat16, "bfloat16"), (torch.float32, "float32")):
        flops, source = peak_flops(cpu, dtype)
        assert source == f"measured {label} matmul"
        assert math.isfinite(flops) and flops > 1e8


def test_trim_jsonl_drops_records_past_the_resume_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert trim_jsonl(path, 3) == 3  # steps 4 and 5, and the line torn by a kill
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert trim_jsonl(path, 3) == 0 and trim_jsonl(tmp_path / "absent.jsonl", 0) == 0
