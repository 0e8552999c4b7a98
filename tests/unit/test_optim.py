"""In-process units of the trainer (no processes needed): DeepSpeed config generation, the learning-rate schedule,
the optimizer choice with and without apex and the fp16 loss-scale accessor. The metrics units (peak-FLOPs table,
JSONL trim) are in test_metrics.py."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from pretrain.config import load_config
from pretrain.engine import deepspeed_config, loss_scale
from pretrain.optim import LRSchedule, SkippableAdamW, build_optimizer, lr_scale_factor


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine-dependent refusal on a CPU-only machine")
def test_device_errors_are_config_errors_before_any_work(capsys: pytest.CaptureFixture[str]) -> None:
    from pretrain.__main__ import main

    # No launcher variables: the error must come from the device check, ahead of the process group and the model.
    assert main(["training.precision=fp16", "training.device=auto", "training.output_dir=/nonexistent/x"]) == 2
    assert "training.precision=fp16 with training.device=auto: no CUDA device" in capsys.readouterr().err
    assert main(["training.device=cuda", "training.output_dir=/nonexistent/x"]) == 2
    assert "training.device=cuda but no CUDA device is visible; accepted here: cpu or auto" in capsys.readouterr().err


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


def _groups() -> list[dict]:
    return [{"params": [torch.nn.Parameter(torch.zeros(3, 3))], "lr_scale": 1.0, "weight_decay": 0.05}]


def test_apex_absent_falls_back_to_torch_adamw(monkeypatch: pytest.MonkeyPatch) -> None:
    """apex is optional: hidden (as on a machine without it), CUDA training gets torch's fused AdamW; the CPU (and an
    offloaded optimizer) always gets torch's fused CPU kernel."""
    monkeypatch.setitem(sys.modules, "apex", None)
    monkeypatch.setitem(sys.modules, "apex.optimizers", None)
    cfg = load_config(None, [])
    cuda = build_optimizer(_groups(), cfg, "cuda")
    assert type(cuda) is SkippableAdamW and cuda.defaults["fused"]
    cpu = build_optimizer(_groups(), cfg, "cpu")
    assert type(cpu) is SkippableAdamW and cpu.defaults["fused"]
    offload = load_config(None, ["distributed.offload_optimizer=true"])
    offloaded = build_optimizer(_groups(), offload, "cuda")  # the update runs on the CPU: torch's CPU kernel
    assert type(offloaded) is SkippableAdamW and offloaded.defaults["fused"]


def test_apex_fused_adam_is_used_when_importable_and_skipped_when_unbuilt(monkeypatch: pytest.MonkeyPatch) -> None:
    class FusedAdam(torch.optim.AdamW):  # stands in for apex.optimizers.FusedAdam (same constructor signature)
        def __init__(self, params: list[dict], adam_w_mode: bool = True, **kwargs: object) -> None:
            assert adam_w_mode
            super().__init__(params, **kwargs)

    apex = types.ModuleType("apex")
    apex.optimizers = types.ModuleType("apex.optimizers")  # type: ignore[attr-defined]
    apex.optimizers.FusedAdam = FusedAdam  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", apex.optimizers)  # type: ignore[attr-defined]
    cfg = load_config(None, [])
    fused = build_optimizer(_groups(), cfg, "cuda")
    assert isinstance(fused, FusedAdam) and not isinstance(fused, SkippableAdamW)  # apex's, made skippable
    assert type(build_optimizer(_groups(), cfg, "cpu")) is SkippableAdamW

    class Unbuilt(FusedAdam):  # apex installed without its CUDA extensions raises at construction
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("apex.optimizers.FusedAdam requires cuda extensions")

    apex.optimizers.FusedAdam = Unbuilt  # type: ignore[attr-defined]
    fallback = build_optimizer(_groups(), cfg, "cuda")
    assert type(fallback) is SkippableAdamW and fallback.defaults["fused"]


def test_fp16_loss_scale_of_deepspeed_zero0_optimizer() -> None:
    """DeepSpeed 0.19's fp16 optimizer at ZeRO stage 0 has no ``cur_scale``: the accessor still finds the scale.

    fp16 cannot run on this CPU (DeepSpeed refuses it without an accelerator), so the optimizer object is DeepSpeed's
    real FP16_Optimizer class with only its loss-scale state set, and the engine DeepSpeed's real engine class.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.loss_scaler import LossScaleConfig, LossScaleProfile

    optimizer = FP16_Optimizer.__new__(FP16_Optimizer)
    optimizer.custom_loss_scaler = False
    optimizer.loss_scale_config = LossScaleConfig(
        low_precision_dtype=torch.float16,
        dynamic_loss_scale=True,
        static_loss_scale=1.0,
        dynamic_loss_args=None,
        profile=LossScaleProfile.FUSED,
        initial_dynamic_scale=2**16,
    )
    assert not hasattr(optimizer, "cur_scale")  # what the metric used to read (NaN)
    engine = DeepSpeedEngine.__new__(DeepSpeedEngine)
    engine.__dict__["optimizer"] = optimizer
    assert loss_scale(engine) == 2.0**16
    optimizer.loss_scale_config.cur_scale = 512.0  # after overflows halved it
    assert loss_scale(engine) == 512.0
    assert loss_scale(types.SimpleNamespace(optimizer=optimizer)) == 512.0  # engines without the accessor
    assert math.isnan(loss_scale(types.SimpleNamespace(optimizer=torch.optim.AdamW(_groups()))))
