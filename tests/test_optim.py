"""DeepSpeed config generation and the learning-rate schedule (no processes needed)."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import load_config
from pretrain.engine import deepspeed_config
from pretrain.optim import LRSchedule, lr_scale_factor


def test_deepspeed_config_from_typed_config() -> None:
    cfg = load_config(
        "configs/simmim_swinv2_base_192_w12.yaml",
        [
            "training.grad_accum_steps=2",
            "distributed.zero_stage=3",
            "distributed.offload_optimizer=true",
            'distributed.deepspeed={"zero_optimization": {"stage3_max_live_parameters": 1000}, "dump_state": true}',
        ],
    )
    ds = deepspeed_config(cfg, world_size=16)
    assert ds["train_micro_batch_size_per_gpu"] == 128
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 128 * 2 * 16
    assert ds["gradient_clipping"] == 5.0
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    # Pass-through keys are merged, nested dicts included, without dropping generated keys.
    assert ds["zero_optimization"]["stage3_max_live_parameters"] == 1000 and ds["dump_state"] is True
    fp16 = deepspeed_config(load_config(None, ["training.precision=fp16"]), 1)["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # dynamic loss scaling


def test_lr_scaling_is_the_official_rule() -> None:
    cfg = load_config("configs/simmim_swinv2_base_192_w12.yaml", [])
    assert lr_scale_factor(cfg, 16) == pytest.approx(2048 / 512)  # 4e-4 peak at 16 x 128 images
    cfg = load_config("configs/simmim_swinv2_base_192_w12.yaml", ["training.grad_accum_steps=2"])
    assert lr_scale_factor(cfg, 8) == pytest.approx(2048 / 512)
    assert lr_scale_factor(load_config(None, ["optimizer.lr_reference_batch=0"]), 64) == 1.0


def _schedule(overrides: list[str], steps_per_epoch: int = 10) -> tuple[LRSchedule, torch.optim.Optimizer]:
    cfg = load_config(None, ["optimizer.lr_reference_batch=0", *overrides])
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": [params[0]], "lr_scale": 1.0}, {"params": [params[1]], "lr_scale": 0.5}])
    return LRSchedule(optimizer, cfg, 1, steps_per_epoch), optimizer


MULTISTEP = [
    "schedule.name=multistep",
    "schedule.epochs=10",
    "schedule.warmup_epochs=2",
    "schedule.milestones=[7]",
    "optimizer.base_lr=1e-3",
    "optimizer.warmup_lr=1e-5",
]


def test_warmup_then_multistep_per_iteration_and_lr_scale_once() -> None:
    schedule, optimizer = _schedule(MULTISTEP)
    assert schedule.lr_at(0) == pytest.approx(1e-5)
    assert schedule.lr_at(10) == pytest.approx(1e-5 + 10 * (1e-3 - 1e-5) / 20)
    assert schedule.lr_at(20) == pytest.approx(1e-3)
    assert schedule.lr_at(69) == pytest.approx(1e-3) and schedule.lr_at(70) == pytest.approx(1e-4)
    for _ in range(20):
        schedule.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 0.5e-3])
    state = schedule.state_dict()
    fresh, fresh_opt = _schedule(MULTISTEP)
    fresh.load_state_dict(state)
    assert [g["lr"] for g in fresh_opt.param_groups] == pytest.approx([1e-3, 0.5e-3])


def test_cosine_ends_at_min_lr() -> None:
    schedule, _ = _schedule(
        [
            "schedule.name=cosine",
            "schedule.epochs=10",
            "schedule.warmup_epochs=1",
            "optimizer.base_lr=1e-3",
            "optimizer.min_lr=1e-5",
        ]
    )
    assert schedule.lr_at(10) == pytest.approx(1e-3)
    middle = 10 + (100 - 10) // 2
    assert schedule.lr_at(middle) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.5)))
    assert schedule.lr_at(100) == pytest.approx(1e-5) and schedule.lr_at(500) == pytest.approx(1e-5)
