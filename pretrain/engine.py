"""The DeepSpeed engine and the ``distributed`` config section: the DeepSpeed config dict generated from the typed
config, the task's model built (partitioned under ZeRO-3), the optimizer and schedule attached. The model stays a
plain single-device module; parallelism, activation checkpointing and compilation are applied here, from outside."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from swinv2 import compile_blocks, parse_checkpointing

from .checks import ConfigError, one_of, require
from .optim import LRSchedule, build_optimizer

if TYPE_CHECKING:
    from .tasks import Task

__all__ = [
    "DEEPSPEED_TYPED_KEYS",
    "DistributedConfig",
    "build_engine",
    "compute_dtype",
    "deepspeed_config",
    "loss_scale",
    "overflow_skipped_steps",
    "resolve_device",
]


BACKENDS = ("auto", "nccl", "gloo")

# distributed.deepspeed keys (dotted paths into the DeepSpeed config) that the typed configuration generates, with
# the typed key to use instead. Accepting them would let the DeepSpeed engine silently disagree with values the rest
# of the code reads (lr scaling by the global batch, loss scale logging, ZeRO-3 model construction...).
DEEPSPEED_TYPED_KEYS: dict[str, str] = {
    "train_batch_size": "data.batch_size (per device) and training.grad_accum_steps; the global batch follows",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "training.grad_accum_steps",
    "gradient_clipping": "optimizer.clip_grad",
    # Only the switches: fp16 loss-scaling settings (initial_scale_power, loss_scale_window...) may be passed through.
    "bf16.enabled": "training.precision",
    "bfloat16.enabled": "training.precision",  # DeepSpeed's other spelling of bf16
    "fp16.enabled": "training.precision",
    "zero_optimization.stage": "distributed.zero_stage",
    "optimizer": "the optimizer section (AdamW is built by pretrain/optim.py)",
    "scheduler": "the schedule section (the lr schedule is built by pretrain/optim.py)",
}


@dataclass
class DistributedConfig:
    zero_stage: int = 2
    offload_optimizer: bool = False
    # auto: nccl on cuda, gloo on cpu.
    backend: str = "auto"
    # Bound on every collective: ranks raise instead of hanging when a peer dies.
    timeout_minutes: float = 30.0
    # Extra DeepSpeed config keys, merged over the generated dict (deepspeed_config below). Keys that the typed
    # settings generate are refused (see DEEPSPEED_TYPED_KEYS): set the typed key instead.
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        one_of("distributed.zero_stage", self.zero_stage, (0, 1, 2, 3))
        one_of("distributed.backend", self.backend, BACKENDS)
        require(
            0 < self.timeout_minutes <= 7 * 24 * 60,
            f"distributed.timeout_minutes={self.timeout_minutes}; accepted: > 0 and at most a week (10080)",
        )
        require(
            not (self.offload_optimizer and self.zero_stage == 0),
            "distributed.offload_optimizer=true needs distributed.zero_stage 1, 2 or 3",
        )
        conflicts = _deepspeed_conflicts(dict(self.deepspeed))
        if conflicts:
            key, value, typed = conflicts[0]
            raise ConfigError(
                f"distributed.deepspeed.{key}={value!r} repeats a typed setting; set {typed} instead. Accepted in "
                f"distributed.deepspeed: any other DeepSpeed key (refused: {', '.join(DEEPSPEED_TYPED_KEYS)})"
            )


def _deepspeed_conflicts(extra: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(dotted key, value, typed key) for each key of ``extra`` that DEEPSPEED_TYPED_KEYS refuses.

    A non-dict value on the way to a refused key (``fp16: true``) counts too: merged over the generated config it
    would replace the whole generated section, switch included.
    """
    found = []
    for path, typed in DEEPSPEED_TYPED_KEYS.items():
        node: Any = extra
        parts = path.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
            if depth == len(parts) - 1 or not isinstance(node, dict):
                found.append((".".join(parts[: depth + 1]), node, typed))
                break
    return found


def resolve_device(cfg: Any, local_rank: int) -> torch.device:
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


def backend_for(cfg: Any, device: torch.device) -> str:
    if cfg.distributed.backend != "auto":
        return cfg.distributed.backend
    return "nccl" if device.type == "cuda" else "gloo"


def compute_dtype(cfg: Any) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.training.precision]


def deepspeed_config(cfg: Any, world_size: int) -> dict[str, Any]:
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
        # ZeRO checks the optimizer's exact type against its list; ours is AdamW (or apex FusedAdam) with a switch that
        # skips a step (pretrain/optim.py), the same update under another class name.
        "zero_allow_untested_optimizer": True,
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


def build_model(cfg: Any, ds_config: dict[str, Any], task: Task) -> nn.Module:
    """The task's model, built under ``deepspeed.zero.Init`` for ZeRO-3 (no rank ever holds the whole model), with
    activation checkpointing and compilation applied to its backbone from outside."""
    import deepspeed

    if cfg.distributed.zero_stage == 3:
        # No dtype argument: DeepSpeed 0.19 takes it from the config, and an explicit dtype is ignored on CPU
        # (operator precedence in Init._set_dtype turns it into bfloat16).
        context: Any = deepspeed.zero.Init(config_dict_or_path=ds_config)
    else:
        context = contextlib.nullcontext()
    with context:
        model = task.build_model()
    backbone = task.backbone(model)
    backbone.set_grad_checkpointing(**parse_checkpointing(cfg.model.activation_checkpointing))
    if cfg.model.compile:
        compile_blocks(backbone)
    return model


def build_engine(
    cfg: Any, world_size: int, steps_per_epoch: int, task: Task, load_universal: bool = False
) -> tuple[Any, LRSchedule]:
    """A DeepSpeed engine for the task's model with AdamW, and the lr schedule; the process group must exist.

    The schedule is handed to DeepSpeed (so it is saved with checkpoints) but the trainer sets its step explicitly
    before every optimizer step: the lr is a function of the step, whatever DeepSpeed skipped.

    Args:
        cfg: the task's resolved configuration.
        world_size: data-parallel size.
        steps_per_epoch: optimizer steps per epoch (for the schedule).
        task: builds the model and its parameter groups.
        load_universal: the checkpoint to resume from is in DeepSpeed's universal format.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    ds_config = deepspeed_config(cfg, world_size)
    # Same initial weights on every rank and for every world size (zero.Init partitions after each module's init).
    torch.manual_seed(cfg.training.seed)
    if load_universal:
        ds_config["checkpoint"]["load_universal"] = True
    model = build_model(cfg, ds_config, task)
    optimizer = build_optimizer(task.param_groups(model), cfg, get_accelerator().device_name())
    schedule = LRSchedule(optimizer, cfg, world_size, steps_per_epoch)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config, dist_init_required=False
    )
    return engine, schedule


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
