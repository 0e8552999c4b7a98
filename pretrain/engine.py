"""The DeepSpeed engine and the ``distributed`` config section: the DeepSpeed config dict generated from the typed
config, the task's model built (partitioned under ZeRO-3), the optimizer and schedule attached. The model stays a
plain single-device module; parallelism, activation checkpointing and compilation are applied here, from outside."""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import sys
import typing
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
    "check_deepspeed_keys",
    "compute_dtype",
    "configure_matmul_precision",
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

# zero_optimization keys with a typed twin in the distributed section that may be left null (auto); only a non-null
# typed value makes the pass-through key a conflict.
ZERO_TYPED_KEYS = ("overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size")


@dataclass
class DistributedConfig:
    zero_stage: int = 2
    offload_optimizer: bool = False
    # auto: nccl on cuda, gloo on cpu.
    backend: str = "auto"
    # Bound on every collective: ranks raise instead of hanging when a peer dies.
    timeout_minutes: float = 30.0
    # ZeRO communication (stages 1-3; null = auto). overlap_comm auto: on for ZeRO 2/3 when training on CUDA, off
    # otherwise (see _zero_section). contiguous_gradients auto: DeepSpeed's default (on). Bucket sizes, in elements:
    # auto = DeepSpeed's defaults (5e8 each in 0.19); allgather_bucket_size is used by ZeRO 1/2 only (ZeRO-3 gathers
    # by zero_optimization.stage3_prefetch_bucket_size, passed through `deepspeed`). With a typed value set, the same
    # zero_optimization key in `deepspeed` is refused; left auto, that key may be set there instead.
    overlap_comm: bool | None = None
    contiguous_gradients: bool | None = None
    reduce_bucket_size: int | None = None
    allgather_bucket_size: int | None = None
    # Extra DeepSpeed config keys, merged over the generated dict (deepspeed_config below). Keys that the typed
    # settings generate are refused (see DEEPSPEED_TYPED_KEYS): set the typed key instead. Every key is checked
    # against DeepSpeed's own config parser at load time (check_deepspeed_keys).
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
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            value = getattr(self, key)
            require(
                value is None or value > 0, f"distributed.{key}={value}; accepted: null (DeepSpeed's default) or > 0"
            )
        conflicts = _deepspeed_conflicts(dict(self.deepspeed))
        if conflicts:
            key, value, typed = conflicts[0]
            raise ConfigError(
                f"distributed.deepspeed.{key}={value!r} repeats a typed setting; set {typed} instead. Accepted in "
                f"distributed.deepspeed: any other DeepSpeed key (refused: {', '.join(DEEPSPEED_TYPED_KEYS)})"
            )
        zero_extra = self.deepspeed.get("zero_optimization")
        for key in ZERO_TYPED_KEYS:
            if getattr(self, key) is not None and isinstance(zero_extra, dict) and key in zero_extra:
                raise ConfigError(
                    f"distributed.deepspeed.zero_optimization.{key}={zero_extra[key]!r} and distributed.{key}="
                    f"{getattr(self, key)!r} both set it; accepted: one of the two (the typed key, or leave it null)"
                )
        check_deepspeed_keys(self)


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


def configure_matmul_precision(tf32: bool, device: torch.device) -> bool:
    """Allow or forbid TF32 tensor cores for fp32 matmuls and convolutions when training on CUDA.

    TF32 keeps fp32's range with a 10-bit mantissa: on Ampere and later GPUs fp32 matmuls run several times faster,
    for a rounding error far below SimMIM's loss noise. It only affects fp32 matmuls: those of fp32 training, and
    the fp32 parts of a bf16/fp16 run. On the CPU nothing is changed (``torch.set_float32_matmul_precision`` would
    also let oneDNN compute fp32 matmuls in bf16 there).

    The legacy ``allow_tf32`` flags are set, not torch's per-backend ``fp32_precision``: torch 2.14 raises when
    code reads the legacy flags after the new API was used, and torch's inductor and bench/gpu.py read them.

    Args:
        tf32: allow TF32 (False: strict IEEE fp32, e.g. for numerical comparisons).
        device: the training device.

    Returns:
        Whether fp32 matmuls now use TF32.
    """
    if torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return tf32


def _default_device(cfg: Any) -> torch.device:
    """The device training.device names, without touching CUDA state (auto = cuda when one is visible)."""
    want = cfg.training.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def _zero_section(d: DistributedConfig, device: torch.device) -> dict[str, Any]:
    """The generated ``zero_optimization`` section for the typed ``distributed`` settings, training on ``device``."""
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.zero_stage >= 1:
        overlap = d.overlap_comm
        if overlap is None:
            # DeepSpeed recommends overlap_comm for ZeRO 2/3 on GPUs: gradient reduction (and ZeRO-3's parameter
            # gathers) run on a side CUDA stream while backward goes on, for more bucket memory. On the CPU (gloo)
            # there is no side stream to hide them behind: only the extra copies would remain. DeepSpeed's own
            # default (on for ZeRO-3 only, whatever the device) is therefore not used.
            overlap = device.type == "cuda" and d.zero_stage >= 2
        zero.update(overlap_comm=overlap, reduce_scatter=True)
        # Left out when auto: DeepSpeed's own defaults apply (contiguous_gradients on, 5e8-element buckets).
        for key in ("contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size"):
            if getattr(d, key) is not None:
                zero[key] = getattr(d, key)
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    return zero


# Entries of the generated config that depend on no setting.
_FIXED_ENTRIES: dict[str, Any] = {
    # torch's AdamW is accepted with optimizer offload (DeepSpeed's CPUAdam needs a compiled op).
    "zero_force_ds_cpu_optimizer": False,
    # ZeRO checks the optimizer's exact type against its list; ours is AdamW (or apex FusedAdam) with a switch that
    # skips a step (pretrain/optim.py), the same update under another class name.
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 2**31 - 1,
    "wall_clock_breakdown": False,
}


def deepspeed_config(cfg: Any, world_size: int, device: torch.device | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict (batch triple, clipping, precision, ZeRO), ``distributed.deepspeed`` merged over it.

    Args:
        cfg: the resolved configuration.
        world_size: data-parallel size (the global batch follows).
        device: where training runs (the ZeRO communication defaults depend on it); None: training.device.
    """
    device = _default_device(cfg) if device is None else torch.device(device)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.training.grad_accum_steps,
        "train_batch_size": cfg.data.batch_size * cfg.training.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optimizer.clip_grad,
        "zero_optimization": _zero_section(cfg.distributed, device),
        "bf16": {"enabled": cfg.training.precision == "bf16"},
        "fp16": {
            "enabled": cfg.training.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        **_FIXED_ENTRIES,
        "checkpoint": {"load_universal": False},
    }
    _merge(config, dict(cfg.distributed.deepspeed))
    return config


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


class _ReadRecorder(dict[str, Any]):
    """A config dict that remembers which of its keys were read, nested dicts included.

    DeepSpeed's config parser reads each key it knows by name (``get``, ``[]``, ``in``, ``keys()`` membership), and
    hands whole sections to its pydantic models by unpacking them (``Model(**section)``), which iterates them. A key
    never read in a dict that was read by name is one DeepSpeed does not know; an iterated section is left to the
    pydantic model, which forbids unknown fields itself. ``__iter__`` is overridden so that ``**`` unpacking takes
    the generic mapping path (``keys()`` and ``[]``) instead of copying the dict in C unseen.
    """

    def __init__(self, data: dict[str, Any], path: str = "") -> None:
        super().__init__()
        self.path = path
        self.read: set[str] = set()
        self.touched = False
        for key, value in data.items():
            dict.__setitem__(self, key, _ReadRecorder(value, f"{path}{key}.") if isinstance(value, dict) else value)

    def _read(self, key: Any) -> None:
        self.touched = True
        self.read.add(key)

    def _read_all(self) -> None:
        self.touched = True
        self.read.update(dict.keys(self))

    def __getitem__(self, key: Any) -> Any:
        self._read(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self._read(key)
        return super().__contains__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._read(key)
        return super().get(key, default)

    def pop(self, key: Any, *default: Any) -> Any:
        self._read(key)
        return super().pop(key, *default)

    def keys(self) -> Any:
        # A view whose `in` goes through __contains__ and whose iteration through __iter__.
        return typing.KeysView(self)

    def __iter__(self) -> Any:
        self._read_all()
        return super().__iter__()

    def items(self) -> Any:
        self._read_all()
        return super().items()

    def values(self) -> Any:
        self._read_all()
        return super().values()

    def __copy__(self) -> _ReadRecorder:
        # DeepSpeedConfig parses a shallow copy: share the record (and the nested recorders).
        copied = _ReadRecorder({}, self.path)
        dict.update(copied, dict.items(self))
        copied.read, copied.touched = self.read, self.touched
        return copied

    def nodes(self) -> list[_ReadRecorder]:
        found = [self]
        for value in dict.values(self):
            if isinstance(value, _ReadRecorder):
                found.extend(value.nodes())
        return found


def _import_deepspeed_config() -> tuple[type, str]:
    """DeepSpeed's config parser class and DeepSpeed's version.

    On a machine without a GPU, importing DeepSpeed logs an accelerator notice to stdout, where ``--print-config``
    writes its YAML; the first import therefore runs with stdout captured, the notice is written to stderr, and the
    log handlers DeepSpeed created meanwhile are pointed back at the real stdout.
    """
    if "deepspeed" not in sys.modules:
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            import deepspeed
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            for handler in getattr(logger, "handlers", []):
                if isinstance(handler, logging.StreamHandler) and handler.stream is captured:
                    handler.setStream(sys.stdout)
        sys.stderr.write(captured.getvalue())
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig, deepspeed.__version__


def _model_fields(model: Any) -> list[str]:
    """Accepted keys of a DeepSpeed pydantic config model: field names and aliases, deprecated fields left out."""
    names = []
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if not extra.get("deprecated"):
            names += [name] + ([info.alias] if info.alias and info.alias != name else [])
    return sorted(names)


def _nested_model(model: Any, field_name: str) -> Any:
    """The pydantic model class of ``model``'s field (through Optional/Union), or None."""
    info = model.model_fields.get(field_name)
    if info is None:
        for candidate in model.model_fields.values():
            if candidate.alias == field_name:
                info = candidate
    pending = [info.annotation] if info is not None else []
    while pending:
        annotation = pending.pop()
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            return annotation
        pending.extend(typing.get_args(annotation))
    return None


def _pydantic_model(title: str) -> Any:
    """DeepSpeed's config model class named ``title`` (a ValidationError names its model only by name)."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    pending = [DeepSpeedConfigModel]
    while pending:
        model = pending.pop()
        if model.__name__ == title:
            return model
        pending.extend(model.__subclasses__())
    return None


def _locate(tree: _ReadRecorder, loc: tuple[Any, ...]) -> str:
    """The dotted path in ``tree`` where a pydantic error location (relative to some section) points."""
    for node in tree.nodes():
        current: Any = node
        for part in loc:
            if not isinstance(current, dict) or part not in dict.keys(current):
                break
            current = dict.__getitem__(current, part)
        else:
            return node.path + ".".join(map(str, loc))
    return ".".join(map(str, loc))


def _unknown_key_error(path: str, known: list[str], version: str) -> ConfigError:
    """The error for an unknown key at dotted ``path``; ``known``: the keys DeepSpeed reads where it is."""
    section, _, name = path.rpartition(".")
    refused = {key.rpartition(".")[2] for key in DEEPSPEED_TYPED_KEYS if key.rpartition(".")[0] == section}
    hint = ""
    near = difflib.get_close_matches(name, known, n=1)
    if near and near[0] in refused:
        hint = f" (did you mean {near[0]!r}? set {DEEPSPEED_TYPED_KEYS[f'{section}.{near[0]}'.lstrip('.')]})"
    elif near:
        hint = f" (did you mean {near[0]!r}?)"
    where = f"distributed.deepspeed.{section}" if section else "distributed.deepspeed"
    accepted = sorted(key for key in known if key not in refused)
    return ConfigError(
        f"unknown key distributed.deepspeed.{path}: DeepSpeed {version} does not read it{hint}; accepted keys in "
        f"{where}: {', '.join(accepted)}"
    )


def _validation_error(exc: Any, tree: _ReadRecorder, version: str) -> ConfigError:
    """A ConfigError for the first error of a pydantic ValidationError raised by one of DeepSpeed's config models."""
    error = exc.errors()[0]
    loc = tuple(error["loc"])
    path = _locate(tree, loc)
    if error["type"] == "extra_forbidden":
        model = _pydantic_model(exc.title)
        for part in loc[:-1]:
            model = _nested_model(model, str(part)) if model is not None else None
        if model is not None:
            return _unknown_key_error(path, _model_fields(model), version)
    value = f"={error['input']!r}" if error["type"] != "missing" else ""
    return ConfigError(f"distributed.deepspeed.{path}{value}: DeepSpeed {version} refuses it: {error['msg']}")


def check_deepspeed_keys(d: DistributedConfig) -> None:
    """Refuse ``distributed.deepspeed`` keys that DeepSpeed does not know, and values its config models refuse.

    The keys are checked by DeepSpeed's own config parser (``deepspeed.runtime.config.DeepSpeedConfig``: top-level
    keys read by name, sections validated by its pydantic models, which forbid unknown fields), not by a list kept
    here: a key is accepted exactly when the installed DeepSpeed reads it. The pass-through dict is parsed merged
    over the generated sections that depend only on ``d`` (micro batch and accumulation 1); no process group,
    device or model is involved, and an empty pass-through costs nothing (DeepSpeed is not even imported).

    Args:
        d: the distributed section.

    Raises:
        ConfigError: naming the key (with a close match when there is one) and the keys accepted where it is.
    """
    extra = dict(d.deepspeed)
    if not extra:
        return
    parser, version = _import_deepspeed_config()
    from pydantic import ValidationError

    base: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": _zero_section(d, torch.device("cpu")),
        **_FIXED_ENTRIES,
    }
    _merge(base, extra)
    tree = _ReadRecorder(base)
    try:
        parser(tree)
    except ValidationError as exc:
        raise _validation_error(exc, tree, version) from None
    except Exception as exc:  # DeepSpeed's own checks: DeepSpeedConfigError, assertions, ValueError...
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"distributed.deepspeed: DeepSpeed {version} refuses it: {detail}") from None
    # Not offered as accepted: keys DeepSpeed looks up only to refuse them (removed features).
    removed = set(getattr(sys.modules[parser.__module__], "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))
    for node in tree.nodes():
        if not node.touched:
            continue  # handed whole to a pydantic model (validated there) or never reached
        for key in dict.keys(node):
            user = _lookup(extra, node.path + key)
            if key not in node.read and user is not _MISSING:
                known = [k for k in node.read if isinstance(k, str) and (node.path or k not in removed)]
                raise _unknown_key_error(node.path + key, known, version)


_MISSING = object()


def _lookup(tree: dict[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


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

    device = torch.device(get_accelerator().device_name())  # where DeepSpeed puts the model
    ds_config = deepspeed_config(cfg, world_size, device)
    # Same initial weights on every rank and for every world size (zero.Init partitions after each module's init).
    torch.manual_seed(cfg.training.seed)
    if load_universal:
        ds_config["checkpoint"]["load_universal"] = True
    model = build_model(cfg, ds_config, task)
    optimizer = build_optimizer(task.param_groups(model), cfg, device.type)
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
