"""Typed configuration tree for SimMIM pretraining.

One OmegaConf structured config (dataclasses below) is merged from, in order: the defaults here, a YAML
recipe from configs/, then command-line overrides ``section.key=value``. OmegaConf rejects unknown keys and
wrong types; :func:`validate` then rejects impossible combinations. Both happen before any model is built.

Section owners (one module each): model -> swinv2/, simmim -> pretrain/simmim.py, data -> pretrain/data.py,
optimizer + schedule -> pretrain/optim.py, training + distributed -> pretrain/engine.py and pretrain/train.py,
checkpoint -> pretrain/checkpoint.py, logging -> pretrain/metrics.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError


@dataclass
class ModelConfig:
    # Named size: tiny, small, base, large, huge, giant (see swinv2.MODEL_SIZES); fields below left at None
    # take the size's value.
    size: str = "base"
    img_size: int = 192
    patch_size: int = 4
    in_chans: int = 3
    window_size: int = 12
    pretrained_window_sizes: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    embed_dim: int | None = None
    depths: list[int] | None = None
    num_heads: list[int] | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    ape: bool = False
    patch_norm: bool = True
    # The SwinV2 paper's extra LayerNorm on the main branch every k blocks (H and G); None = the size's default.
    extra_norm_every: int | None = None
    # Attention kernel: auto (measured choice per device and dtype), sdpa, or explicit.
    attn_impl: str = "auto"
    # Sequential window attention: process at most this many windows at a time (0 = all at once).
    window_chunk_size: int = 0
    # Activation checkpointing, parsed by swinv2.parse_checkpointing into set_grad_checkpointing arguments: "none",
    # "all", "every:K" (every K-th block counted over the whole network) or "stages:I,J" (all blocks of stages I, J;
    # indices below the number of stages). One form at a time: every-K restricted to some stages has no spelling here.
    activation_checkpointing: str = "none"
    # torch.compile each Swin block (regional compilation: one graph per block kind, checkpoint keys unchanged).
    # Costs a compile at start-up (about a minute per block kind on a small CPU); not with ZeRO-3, whose per-module
    # parameter gathering would be traced into the compiled blocks.
    compile: bool = False


@dataclass
class SimMIMConfig:
    mask_patch_size: int = 32
    mask_ratio: float = 0.6
    norm_target: bool = True
    norm_target_patch_size: int = 47
    # The official SimMIM code weight-decays cpb_mlp weights and logit_scale through a name-prefix bug
    # (spec 3.6). False (default) excludes them as the backbone's own no-decay lists intend; True reproduces
    # the official training dynamics.
    decay_position_bias: bool = False


@dataclass
class DataConfig:
    # webdataset: tar shards (path is a brace pattern, e.g. data/shards/train-{000000..000127}.tar, a glob, or the
    # folder holding them);
    # folder: a directory of images, searched recursively.
    source: str = "webdataset"
    path: str = ""
    # Per-device micro-batch.
    batch_size: int = 128
    num_workers: int = 8
    pin_memory: bool = True
    resampled: bool = True
    # Samples per epoch over all ranks; None = read from the size index next to the shards, or count the folder.
    samples_per_epoch: int | None = None
    shuffle_buffer: int = 2000
    crop_scale: list[float] = field(default_factory=lambda: [0.67, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    hflip: float = 0.5
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    base_lr: float = 1e-4
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # Learning rates are multiplied by global batch / lr_reference_batch (the official rule); 0 disables scaling.
    lr_reference_batch: int = 512
    clip_grad: float = 5.0
    layer_decay: float = 1.0


@dataclass
class ScheduleConfig:
    # cosine or multistep; all lengths in epochs, applied per iteration.
    name: str = "multistep"
    epochs: int = 800
    warmup_epochs: float = 10.0
    milestones: list[int] = field(default_factory=lambda: [700])
    gamma: float = 0.1


@dataclass
class TrainingConfig:
    output_dir: str = "runs/simmim"
    seed: int = 0
    # bf16 (default), fp16 (dynamic loss scaling) or fp32.
    precision: str = "bf16"
    grad_accum_steps: int = 1
    # Stop after this many optimizer steps (None = run the whole schedule).
    max_steps: int | None = None
    # Non-finite loss: the step is skipped and counted; training stops after this many in a row.
    max_nonfinite_steps: int = 10
    # auto: cuda when available, else cpu.
    device: str = "auto"


@dataclass
class DistributedConfig:
    zero_stage: int = 2
    offload_optimizer: bool = False
    # auto: nccl on cuda, gloo on cpu.
    backend: str = "auto"
    # Bound on every collective: ranks raise instead of hanging when a peer dies.
    timeout_minutes: float = 30.0
    # Extra DeepSpeed config keys, merged over the generated dict (pretrain/engine.py). Keys that the typed settings
    # generate are refused (see DEEPSPEED_TYPED_KEYS): set the typed key instead.
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    # auto: newest complete checkpoint in output_dir/checkpoints; none; or a path to a step-<N> directory.
    resume: str = "auto"


@dataclass
class LoggingConfig:
    log_every: int = 10
    progress_bar: bool = True
    tensorboard: bool = True
    jsonl: bool = True
    # Reconstruction grids (TensorBoard and PNG) every N steps; 0 disables.
    image_every: int = 1000


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    simmim: SimMIMConfig = field(default_factory=SimMIMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


PRECISIONS = ("bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "multistep")
SOURCES = ("webdataset", "folder")
OPTIMIZERS = ("adamw",)
DEVICES = ("auto", "cuda", "cpu")
BACKENDS = ("auto", "nccl", "gloo")
# The data pipeline decodes every image to RGB (SimMIMTransform), so the model sees 3 channels.
IN_CHANS = 3

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


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or impossible; the message names key and accepted values."""


def _section_fields(path: str) -> list[str]:
    """Accepted keys at a dotted path of the schema ("" = top level)."""
    node: Any = PretrainConfig
    for part in [p for p in path.split(".") if p]:
        hit = {f.name: f for f in dataclasses.fields(node)}.get(part)
        if hit is None or not dataclasses.is_dataclass(hit.default_factory()):  # type: ignore[misc]
            return []
        node = type(hit.default_factory())  # type: ignore[misc]
    return [f.name for f in dataclasses.fields(node)]


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        parent = key.rpartition(".")[0]
        accepted = _section_fields(parent)
        where = f"section {parent!r}" if parent else "the top level"
        return ConfigError(f"unknown config key {key!r} ({source}); accepted keys in {where}: {', '.join(accepted)}")
    if isinstance(exc, ValidationError):
        return ConfigError(f"config key {key!r} ({source}): {str(exc.msg).splitlines()[0]}")
    return ConfigError(f"config error at {key!r} ({source}): {exc}")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Defaults <- YAML recipe <- ``section.key=value`` overrides, type-checked and validated.

    Args:
        path: a YAML file (e.g. configs/demo_cpu.yaml) or None for the defaults.
        overrides: command-line overrides like ``training.max_steps=10`` (OmegaConf dotlist syntax).

    Raises:
        ConfigError: unknown key, wrong type or impossible combination, naming the key and what is accepted.
    """
    merged: DictConfig = OmegaConf.structured(PretrainConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as exc:
            raise _explain(exc, str(path)) from None
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form section.key=value")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _explain(exc, "command-line override") from None
    assert isinstance(cfg, PretrainConfig)
    validate(cfg)
    return cfg


def to_yaml(cfg: PretrainConfig) -> str:
    """The resolved configuration as YAML (printed by --print-config, saved in every run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: PretrainConfig) -> dict[str, Any]:
    """The resolved configuration as plain Python containers (stored in checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def _one_of(key: str, value: Any, accepted: Sequence[Any]) -> None:
    if value not in accepted:
        raise ConfigError(f"{key}={value!r} is not accepted; accepted: {', '.join(map(str, accepted))}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_geometry(m: ModelConfig, depths: Sequence[int]) -> None:
    """Image size vs patch size vs window, with the official window clamp rule, without building a model."""
    from swinv2.swin_transformer_v2 import _window_and_shift

    _require(
        m.patch_size > 0 and m.img_size > 0,
        f"model.img_size={m.img_size} and model.patch_size={m.patch_size} must be positive",
    )
    if m.img_size % m.patch_size:
        valid = [
            m.patch_size * k for k in range(max(1, m.img_size // m.patch_size - 2), m.img_size // m.patch_size + 3)
        ]
        raise ConfigError(
            f"model.img_size={m.img_size} is not a multiple of model.patch_size={m.patch_size}; e.g. {valid}"
        )
    side = m.img_size // m.patch_size
    stride = m.patch_size * 2 ** (len(depths) - 1)
    for stage in range(len(depths)):
        if stage and side % 2:
            raise ConfigError(
                f"model.img_size={m.img_size}: stage {stage - 1} resolution {side} is odd and cannot be merged; "
                f"use a multiple of {stride} (e.g. {[stride * k for k in (2, 3, 4, 6)]})"
            )
        if stage:
            side //= 2
        window = m.window_size
        try:
            _window_and_shift((side, side), (window, window), (window // 2, window // 2) if side > window else (0, 0))
        except ValueError as exc:
            raise ConfigError(f"model.img_size={m.img_size} with model.window_size={window}: {exc}") from None


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


def _check_model(m: ModelConfig) -> None:
    """Ranges of the model's scalar settings (the backbone would fail later, or train wrongly, on these)."""
    _require(
        m.embed_dim is None or m.embed_dim > 0,
        f"model.embed_dim={m.embed_dim}; accepted: a positive integer or null (the size's default)",
    )
    _require(m.in_chans == IN_CHANS, f"model.in_chans={m.in_chans}; accepted: {IN_CHANS} (the pipeline decodes to RGB)")
    _require(m.mlp_ratio > 0, f"model.mlp_ratio={m.mlp_ratio}; accepted: > 0")
    for key in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        rate = getattr(m, key)
        _require(0.0 <= rate < 1.0, f"model.{key}={rate}; accepted: 0 <= rate < 1")
    _require(
        m.extra_norm_every is None or m.extra_norm_every >= 0,
        f"model.extra_norm_every={m.extra_norm_every}; accepted: 0 (off), a positive block count, or null (the "
        f"size's default)",
    )
    _require(
        all(w >= 0 for w in m.pretrained_window_sizes),
        f"model.pretrained_window_sizes={list(m.pretrained_window_sizes)}; accepted: per stage 0 (not pretrained) or "
        f"a positive window size",
    )


def validate(cfg: PretrainConfig) -> None:
    """Reject impossible combinations before anything heavy happens (ConfigError naming key and accepted values)."""
    from swinv2 import MODEL_SIZES, parse_checkpointing
    from swinv2.swin_transformer_v2 import ATTN_IMPLS

    m = cfg.model
    _one_of("model.size", m.size, list(MODEL_SIZES))
    _one_of("model.attn_impl", m.attn_impl, ATTN_IMPLS)
    try:
        checkpointing = parse_checkpointing(m.activation_checkpointing)
    except ValueError as exc:
        raise ConfigError(f"model.activation_checkpointing: {exc}") from None
    depths = m.depths if m.depths is not None else MODEL_SIZES[m.size]["depths"]
    # parse_checkpointing cannot know the number of stages; set_grad_checkpointing would only refuse once the model
    # exists.
    stages_out = [i for i in checkpointing.get("stages", []) if i >= len(depths)]
    _require(
        not stages_out,
        f"model.activation_checkpointing={m.activation_checkpointing!r}: stages {stages_out} do not exist; accepted: "
        f"stage indices 0..{len(depths) - 1}",
    )
    heads = m.num_heads if m.num_heads is not None else MODEL_SIZES[m.size]["num_heads"]
    _require(
        len(depths) == len(heads) and len(depths) > 0,
        f"model.depths={list(depths)} and model.num_heads={list(heads)} need the same, non-zero length",
    )
    _require(
        len(m.pretrained_window_sizes) == len(depths),
        f"model.pretrained_window_sizes={list(m.pretrained_window_sizes)} needs one entry per stage ({len(depths)})",
    )
    _check_model(m)
    embed_dim = m.embed_dim if m.embed_dim is not None else MODEL_SIZES[m.size]["embed_dim"]
    for i, h in enumerate(heads):
        _require(
            h > 0 and (embed_dim * 2**i) % h == 0,
            f"model.num_heads[{i}]={h} does not divide the stage {i} width {embed_dim * 2**i} "
            f"(model.embed_dim={embed_dim})",
        )
    _require(m.window_size > 0, f"model.window_size={m.window_size}; accepted: a positive integer")
    _require(m.window_chunk_size >= 0, f"model.window_chunk_size={m.window_chunk_size}; accepted: 0 (off) or > 0")
    _check_geometry(m, depths)

    s = cfg.simmim
    _require(
        s.mask_patch_size > 0 and s.mask_patch_size % m.patch_size == 0,
        f"simmim.mask_patch_size={s.mask_patch_size} must be a positive multiple of model.patch_size={m.patch_size}",
    )
    _require(
        m.img_size % s.mask_patch_size == 0,
        f"simmim.mask_patch_size={s.mask_patch_size} must divide model.img_size={m.img_size}",
    )
    _require(0.0 < s.mask_ratio < 1.0, f"simmim.mask_ratio={s.mask_ratio}; accepted: 0 < mask_ratio < 1")
    _require(
        s.norm_target_patch_size > 0 and s.norm_target_patch_size % 2 == 1,
        f"simmim.norm_target_patch_size={s.norm_target_patch_size}; accepted: a positive odd integer",
    )

    d = cfg.data
    _one_of("data.source", d.source, SOURCES)
    _require(d.batch_size > 0, f"data.batch_size={d.batch_size}; accepted: a positive integer (per-device micro-batch)")
    _require(d.num_workers >= 0, f"data.num_workers={d.num_workers}; accepted: 0 or more")
    _require(
        d.shuffle_buffer >= 0,
        f"data.shuffle_buffer={d.shuffle_buffer}; accepted: 0 or 1 (no shuffling) or more samples",
    )
    _require(
        d.samples_per_epoch is None or d.samples_per_epoch > 0,
        f"data.samples_per_epoch={d.samples_per_epoch}; accepted: a positive integer or null",
    )
    _require(
        len(d.crop_scale) == 2 and 0.0 < d.crop_scale[0] <= d.crop_scale[1] <= 1.0,
        f"data.crop_scale={list(d.crop_scale)}; accepted: [min, max] with 0 < min <= max <= 1",
    )
    _require(
        len(d.crop_ratio) == 2 and 0.0 < d.crop_ratio[0] <= d.crop_ratio[1],
        f"data.crop_ratio={list(d.crop_ratio)}; accepted: [min, max] with 0 < min <= max",
    )
    _require(0.0 <= d.hflip <= 1.0, f"data.hflip={d.hflip}; accepted: a probability in [0, 1]")
    _require(
        len(d.mean) == m.in_chans and len(d.std) == m.in_chans and all(v > 0 for v in d.std),
        f"data.mean={list(d.mean)}, data.std={list(d.std)}; accepted: {m.in_chans} values each (one per channel of "
        f"model.in_chans), std > 0",
    )

    o = cfg.optimizer
    _one_of("optimizer.name", o.name, OPTIMIZERS)
    _require(o.base_lr > 0, f"optimizer.base_lr={o.base_lr}; accepted: > 0")
    _require(o.warmup_lr >= 0, f"optimizer.warmup_lr={o.warmup_lr}; accepted: >= 0")
    _require(o.min_lr >= 0, f"optimizer.min_lr={o.min_lr}; accepted: >= 0")
    _require(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay}; accepted: >= 0")
    _require(
        o.lr_reference_batch >= 0, f"optimizer.lr_reference_batch={o.lr_reference_batch}; accepted: 0 (off) or > 0"
    )
    _require(o.clip_grad >= 0, f"optimizer.clip_grad={o.clip_grad}; accepted: 0 (off) or > 0")
    _require(0.0 < o.layer_decay <= 1.0, f"optimizer.layer_decay={o.layer_decay}; accepted: 0 < layer_decay <= 1")
    _require(
        len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas),
        f"optimizer.betas={list(o.betas)}; accepted: two values in [0, 1)",
    )
    _require(o.eps > 0, f"optimizer.eps={o.eps}; accepted: > 0")

    sc = cfg.schedule
    _one_of("schedule.name", sc.name, SCHEDULES)
    _require(sc.epochs > 0, f"schedule.epochs={sc.epochs}; accepted: a positive integer")
    _require(
        0 <= sc.warmup_epochs <= sc.epochs,
        f"schedule.warmup_epochs={sc.warmup_epochs}; accepted: 0 <= warmup_epochs <= schedule.epochs={sc.epochs}",
    )
    _require(sc.gamma > 0, f"schedule.gamma={sc.gamma}; accepted: > 0 (the lr factor at each milestone)")
    if sc.name == "multistep":
        # A milestone at or after the last epoch is never reached: the lr would silently never decay at it.
        outside = [ms for ms in sc.milestones if not 0 < ms < sc.epochs]
        accepted = f"epochs 1..{sc.epochs - 1}" if sc.epochs > 1 else "none (an empty list)"
        _require(
            not outside,
            f"schedule.milestones={list(sc.milestones)}: {outside} outside the schedule; accepted: {accepted} "
            f"(before schedule.epochs={sc.epochs})",
        )

    t = cfg.training
    _one_of("training.precision", t.precision, PRECISIONS)
    _one_of("training.device", t.device, DEVICES)
    _require(t.grad_accum_steps >= 1, f"training.grad_accum_steps={t.grad_accum_steps}; accepted: 1 or more")
    _require(t.max_steps is None or t.max_steps > 0, f"training.max_steps={t.max_steps}; accepted: > 0 or null")
    _require(t.max_nonfinite_steps >= 1, f"training.max_nonfinite_steps={t.max_nonfinite_steps}; accepted: 1 or more")

    dist = cfg.distributed
    _one_of("distributed.zero_stage", dist.zero_stage, (0, 1, 2, 3))
    _one_of("distributed.backend", dist.backend, BACKENDS)
    _require(dist.timeout_minutes > 0, f"distributed.timeout_minutes={dist.timeout_minutes}; accepted: > 0")
    _require(
        not (dist.offload_optimizer and dist.zero_stage == 0),
        "distributed.offload_optimizer=true needs distributed.zero_stage 1, 2 or 3",
    )
    _require(
        not (cfg.model.compile and dist.zero_stage == 3),
        "model.compile=true with distributed.zero_stage=3 is not supported (ZeRO-3 gathers parameters in hooks on "
        "every module, which would be traced into the compiled blocks); accepted: zero_stage 0, 1 or 2 with "
        "model.compile=true, or model.compile=false",
    )
    _require(
        not (t.precision == "fp16" and t.device == "cpu"),
        "training.precision=fp16 is not supported on training.device=cpu; accepted there: bf16, fp32",
    )
    conflicts = _deepspeed_conflicts(dict(dist.deepspeed))
    if conflicts:
        key, value, typed = conflicts[0]
        raise ConfigError(
            f"distributed.deepspeed.{key}={value!r} repeats a typed setting; set {typed} instead. Accepted in "
            f"distributed.deepspeed: any other DeepSpeed key (refused: {', '.join(DEEPSPEED_TYPED_KEYS)})"
        )

    ck = cfg.checkpoint
    _require(ck.every_steps >= 1, f"checkpoint.every_steps={ck.every_steps}; accepted: 1 or more")
    _require(ck.keep_last >= 1, f"checkpoint.keep_last={ck.keep_last}; accepted: 1 or more")

    lg = cfg.logging
    _require(lg.log_every >= 1, f"logging.log_every={lg.log_every}; accepted: 1 or more")
    _require(lg.image_every >= 0, f"logging.image_every={lg.image_every}; accepted: 0 (off) or more")
