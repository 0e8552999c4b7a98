"""The configuration of classification fine-tuning and linear probing: the ``finetune`` and ``augment`` sections,
the labelled ``data`` section, and the whole tree (:class:`FinetuneConfig`).

The other sections (model, optimizer, schedule, training, distributed, checkpoint, logging) are the ones pretraining
uses, owned by their modules; :func:`load_finetune_config` merges defaults <- YAML <- overrides exactly as
:func:`pretrain.config.load_config` does and runs the same shared checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..backbone import ModelConfig
from ..checkpoint import CheckpointConfig
from ..checks import one_of, require
from ..config import check_common, merge_config
from ..data import LabelledDataConfig
from ..engine import DistributedConfig
from ..metrics import LoggingConfig
from ..optim import OptimizerConfig, ScheduleConfig
from ..train_config import TrainingConfig

__all__ = [
    "INIT_FORMATS",
    "MODES",
    "AugmentConfig",
    "FinetuneConfig",
    "FinetuneDataConfig",
    "FinetuneSection",
    "load_finetune_config",
]

MODES = ("full", "linear")
# auto: a directory is a DeepSpeed checkpoint (tag, checkpoints or run folder) or an HF model directory (config.json);
# a file is read by its layout (ours/SimMIM, timm; official files are in our layout).
INIT_FORMATS = ("auto", "deepspeed", "ours", "official", "timm", "hf")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
MIXUP_MODES = ("batch", "pair", "elem")
ERASE_MODES = ("pixel", "rand", "const")


@dataclass
class FinetuneSection:
    # full: every weight trains (layer-wise lr decay); linear: the backbone is frozen and a parameter-free BatchNorm
    # then a linear layer learn on its pooled features (MAE's probe).
    mode: str = "full"
    # Linear probe: concatenate the average-pooled outputs of the last N stages (1 = the final features only).
    probe_stages: int = 1
    # Pretrained weights: a DeepSpeed checkpoint of a pretraining run (any ZeRO stage and world size), a consolidated
    # SimMIM or backbone file, or an official/timm/HF backbone; "" = random initialisation.
    init: str = ""
    init_format: str = "auto"
    # Checkpoint tag (step-<N>) when ``init`` is a DeepSpeed checkpoints/run folder; null = the newest complete one.
    init_tag: str | None = None
    # Pickled inputs that hold Python objects (official training checkpoints): only for files you trust.
    trust_pickle: bool = False
    # Evaluate every N epochs (and always at the end); 0 = only at the end.
    eval_every_epochs: int = 1
    # Keep the checkpoint with the best validation top-1 besides the last checkpoint.keep_last.
    keep_best: bool = True
    # Exponential moving average of the weights (evaluated too); decay per optimizer step.
    ema: bool = False
    ema_decay: float = 0.9999

    def check(self) -> None:
        one_of("finetune.mode", self.mode, MODES)
        one_of("finetune.init_format", self.init_format, INIT_FORMATS)
        require(
            self.eval_every_epochs >= 0,
            f"finetune.eval_every_epochs={self.eval_every_epochs}; accepted: 0 (only at the end) or more",
        )
        require(0.0 < self.ema_decay < 1.0, f"finetune.ema_decay={self.ema_decay}; accepted: 0 < decay < 1")
        require(
            not (self.mode == "linear" and not self.init),
            "finetune.mode=linear with finetune.init empty: a linear probe of a random backbone measures nothing; "
            "accepted: finetune.init set to pretrained weights",
        )


@dataclass
class AugmentConfig:
    """Training and evaluation transforms (timm's ``create_transform``), Mixup/CutMix and label smoothing. Defaults
    are the official SwinV2/SimMIM fine-tuning values (spec §3.7)."""

    # RandAugment policy string (timm syntax); "" = none.
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    # Ignored by timm when auto_augment is set (as in the official recipe).
    color_jitter: float = 0.4
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    interpolation: str = "bicubic"
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    hflip: float = 0.5
    # Evaluation: resize to img_size / eval_crop_pct, then a centre crop of img_size (224/256 = 0.875).
    eval_crop_pct: float = 0.875
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    mixup: float = 0.8
    cutmix: float = 1.0
    cutmix_minmax: list[float] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    label_smoothing: float = 0.1

    @property
    def mixes(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None)

    def check(self, in_chans: int) -> None:
        one_of("augment.interpolation", self.interpolation, INTERPOLATIONS)
        one_of("augment.mixup_mode", self.mixup_mode, MIXUP_MODES)
        one_of("augment.remode", self.remode, ERASE_MODES)
        for key in ("reprob", "hflip", "mixup_prob", "mixup_switch_prob"):
            value = getattr(self, key)
            require(0.0 <= value <= 1.0, f"augment.{key}={value}; accepted: a probability in [0, 1]")
        for key in ("mixup", "cutmix", "color_jitter"):
            require(getattr(self, key) >= 0, f"augment.{key}={getattr(self, key)}; accepted: >= 0 (0 = off)")
        require(self.recount >= 1, f"augment.recount={self.recount}; accepted: 1 or more")
        require(
            0.0 <= self.label_smoothing < 1.0,
            f"augment.label_smoothing={self.label_smoothing}; accepted: 0 <= smoothing < 1",
        )
        require(0.0 < self.eval_crop_pct <= 1.0, f"augment.eval_crop_pct={self.eval_crop_pct}; accepted: (0, 1]")
        require(
            len(self.crop_scale) == 2 and 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0,
            f"augment.crop_scale={list(self.crop_scale)}; accepted: [min, max] with 0 < min <= max <= 1",
        )
        require(
            len(self.crop_ratio) == 2 and 0.0 < self.crop_ratio[0] <= self.crop_ratio[1],
            f"augment.crop_ratio={list(self.crop_ratio)}; accepted: [min, max] with 0 < min <= max",
        )
        require(
            self.cutmix_minmax is None or (len(self.cutmix_minmax) == 2 and 0 < self.cutmix_minmax[0] < 1),
            f"augment.cutmix_minmax={self.cutmix_minmax}; accepted: null or [min, max] area ratios in (0, 1)",
        )
        require(
            len(self.mean) == in_chans and len(self.std) == in_chans and all(v > 0 for v in self.std),
            f"augment.mean={list(self.mean)}, augment.std={list(self.std)}; accepted: {in_chans} values each, std > 0",
        )


@dataclass
class FinetuneDataConfig(LabelledDataConfig):
    """Labelled class folders or shards (see :class:`pretrain.data.LabelledDataConfig`)."""

    def check(self, in_chans: int = 3) -> None:  # type: ignore[override]
        # The shared checks pass the model's channels; the transforms' mean/std live in ``augment``.
        # data.train_path is checked when training starts (--eval-only needs only the validation split).
        super().check()
        require(bool(self.val_path), "data.val_path is empty; accepted: a class folder or labelled shards")


def _finetune_model() -> ModelConfig:
    # The official fine-tuning geometry: 224 px, window 14, from a 192/w12 pretraining.
    return ModelConfig(img_size=224, window_size=14, pretrained_window_sizes=[12, 12, 12, 6])


def _finetune_optimizer() -> OptimizerConfig:
    return OptimizerConfig(base_lr=1.25e-3, warmup_lr=2.5e-7, min_lr=2.5e-7, weight_decay=0.05, layer_decay=0.75)


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=_finetune_model)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optimizer: OptimizerConfig = field(default_factory=_finetune_optimizer)
    schedule: ScheduleConfig = field(
        default_factory=lambda: ScheduleConfig(name="cosine", epochs=100, warmup_epochs=20, milestones=[])
    )
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(output_dir="runs/finetune"))
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(image_every=0))


def validate_finetune(cfg: FinetuneConfig) -> None:
    """Section checks, the rules shared with pretraining, and the fine-tuning combinations."""
    check_common(cfg)
    cfg.finetune.check()
    cfg.augment.check(cfg.model.in_chans)
    stages = len(cfg.model.resolved("depths"))
    require(
        1 <= cfg.finetune.probe_stages <= stages,
        f"finetune.probe_stages={cfg.finetune.probe_stages}; accepted: 1 to {stages} (the model's stages)",
    )
    require(
        cfg.finetune.probe_stages == 1 or cfg.finetune.mode == "linear",
        f"finetune.probe_stages={cfg.finetune.probe_stages} with finetune.mode={cfg.finetune.mode!r}; accepted: "
        f"probe_stages > 1 with mode=linear only (full fine-tuning classifies the final features)",
    )
    require(
        not (cfg.finetune.ema and cfg.distributed.zero_stage == 3),
        "finetune.ema=true with distributed.zero_stage=3: the average would need every partitioned weight gathered "
        "after each step; accepted: zero_stage 0, 1 or 2 with ema, or finetune.ema=false",
    )


def load_finetune_config(path: str | Path | None, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """Defaults <- YAML recipe <- ``section.key=value`` overrides, type-checked and validated.

    Args:
        path: a YAML file (e.g. configs/finetune_swinv2_base_224_w14.yaml) or None for the defaults.
        overrides: command-line overrides like ``finetune.mode=linear``.

    Raises:
        ConfigError: unknown key, wrong type or impossible combination, naming the key and what is accepted.
    """
    cfg = merge_config(FinetuneConfig, path, overrides)
    assert isinstance(cfg, FinetuneConfig)
    validate_finetune(cfg)
    return cfg
