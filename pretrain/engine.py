"""The DeepSpeed engine: config dict generated from our typed config, model built (partitioned under ZeRO-3), the
optimizer and schedule attached. The model stays a plain single-device module; parallelism is applied here."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch

from swinv2 import compile_blocks, parse_checkpointing

from .config import ConfigError
from .optim import LRSchedule, build_optimizer
from .simmim import SimMIM, build_simmim, simmim_param_groups

if TYPE_CHECKING:
    from .config import PretrainConfig

__all__ = [
    "build_engine",
    "compute_dtype",
    "deepspeed_config",
    "loss_scale",
    "overflow_skipped_steps",
    "resolve_device",
]


def resolve_device(cfg: PretrainConfig, local_rank: int) -> torch.device:
    """cuda:<local_rank> or cpu, from training.device (auto = cuda when available)."""
    want = cfg.training.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cpu" and cfg.training.precision == "fp16":
            # Validation cannot see this combination (it depends on the machine), so it is caught here, before any
            # process group or model exists.
            raise ConfigError(
                "training.precision=fp16 with training.device=auto: no CUDA device is visible, and fp16 does not "
                "train on the CPU; accepted there: training.precision=bf16 or fp32"
            )
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("training.device=cuda but no CUDA device is visible; accepted here: cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def backend_for(cfg: PretrainConfig, device: torch.device) -> str:
    if cfg.distributed.backend != "auto":
        return cfg.distributed.backend
    return "nccl" if device.type == "cuda" else "gloo"


def compute_dtype(cfg: PretrainConfig) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.training.precision]


def deepspeed_config(cfg: PretrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict (batch triple, clipping, precision, ZeRO), ``distributed.deepspeed`` merged over it."""
    d = cfg.distributed
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.training.grad_accum_steps,
        "train_batch_size": cfg.data.batch_size * cfg.training.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optimizer.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.training.precision == "bf16"},
        "fp16": {
            "enabled": cfg.training.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        # torch's AdamW is accepted with optimizer offload (DeepSpeed's CPUAdam needs a compiled op).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": False},
    }
    _merge(config, dict(d.deepspeed))
    return config


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def build_model(cfg: PretrainConfig, ds_config: dict[str, Any]) -> SimMIM:
    """Build SimMIM; under ZeRO-3 inside deepspeed.zero.Init so no rank ever holds the whole model."""
    import deepspeed

    if cfg.distributed.zero_stage == 3:
        # No dtype argument: DeepSpeed 0.19 takes it from the config, and an explicit dtype is ignored on CPU
        # (operator precedence in Init._set_dtype turns it into bfloat16).
        context: Any = deepspeed.zero.Init(config_dict_or_path=ds_config)
    else:
        context = contextlib.nullcontext()
    with context:
        model = build_simmim(cfg)
    model.encoder.set_grad_checkpointing(**parse_checkpointing(cfg.model.activation_checkpointing))
    if cfg.model.compile:
        compile_blocks(model.encoder)
    return model


def build_engine(cfg: PretrainConfig, world_size: int, steps_per_epoch: int, load_universal: bool = False) -> Any:
    """A DeepSpeed engine for SimMIM with AdamW and the schedule; the process group must already exist.

    Args:
        cfg: resolved configuration.
        world_size: data-parallel size.
        steps_per_epoch: optimizer steps per epoch (for the schedule).
        load_universal: the checkpoint to resume from is in DeepSpeed's universal format.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    ds_config = deepspeed_config(cfg, world_size)
    # Same initial weights on every rank and for every world size (zero.Init partitions after each module's init).
    torch.manual_seed(cfg.training.seed)
    if load_universal:
        ds_config["checkpoint"]["load_universal"] = True
    model = build_model(cfg, ds_config)
    groups = simmim_param_groups(model, cfg)
    optimizer = build_optimizer(groups, cfg, get_accelerator().device_name())
    schedule = LRSchedule(optimizer, cfg, world_size, steps_per_epoch)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config, dist_init_required=False
    )
    return engine


def loss_scale(engine: Any) -> float:
    """The current fp16 loss scale (NaN when the engine has none).

    DeepSpeed 0.19's fp16 optimizer at ZeRO stage 0 (FP16_Optimizer) keeps the scale in ``loss_scale_config`` and
    has no ``cur_scale`` attribute; the ZeRO optimizers have ``cur_scale``. The engine's own accessor knows both;
    the attribute fallbacks cover versions without it.
    """
    getter = getattr(engine, "_get_optimizer_loss_scale", None)
    value = getter() if callable(getter) else None
    if value is None:
        optimizer = getattr(engine, "optimizer", None)
        value = getattr(optimizer, "loss_scale", None)
        if value is None:
            value = getattr(optimizer, "cur_scale", None)
    return float(value) if value is not None else float("nan")


def overflow_skipped_steps(engine: Any) -> int:
    """Optimizer steps DeepSpeed skipped because fp16 gradients overflowed (kept across resume in its checkpoint)."""
    return int(getattr(engine, "skipped_steps", 0))
