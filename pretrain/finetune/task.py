"""Classification fine-tuning (and linear probing) as a task of the generic trainer (issue 12).

Same engine, checkpoints, resume, preemption and logging as SimMIM pretraining; this module supplies the classifier
(pretrained backbone loaded strictly, new head), layer-wise lr decay groups, labelled data with timm's transforms,
Mixup/CutMix and the soft-target loss, evaluation after each epoch, and an optional EMA of the weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from swinv2 import SwinTransformerV2, param_groups

from ..checks import ConfigError
from ..data import LabelledSource, build_classification_loader, build_eval_loader, resolve_labelled_source
from ..engine import compute_dtype
from ..formats import ConversionError
from ..tasks import Batch
from .config import FinetuneConfig
from .ema import WeightEMA
from .evaluation import evaluate
from .model import build_classifier
from .transforms import build_criterion, build_mixup, eval_transform, require_timm, train_transform
from .weights import Pretrained, check_pretrained_windows, load_strictly, read_weights

__all__ = ["FinetuneTask", "read_init"]


def read_init(cfg: FinetuneConfig) -> Pretrained:
    """``finetune.init`` read into our layout (ConfigError naming the key when it cannot be)."""
    f = cfg.finetune
    try:
        return read_weights(f.init, f.init_format, f.init_tag, f.trust_pickle)
    except ConversionError as exc:
        raise ConfigError(f"finetune.init={f.init!r}: {exc}") from None


class FinetuneTask:
    """Image classification on labelled folders or shards, from pretrained SwinV2 weights.

    Args:
        cfg: the resolved fine-tuning configuration.
    """

    name = "finetune"

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.best_metric: str | None = "eval/top1" if cfg.finetune.keep_best else None
        self.train_source: LabelledSource | None = None
        self.val_source: LabelledSource | None = None
        self.pretrained: Pretrained | None = None
        self.ema: WeightEMA | None = None
        self._ema_model: nn.Module | None = None
        self.notes: list[str] = []  # what start-up found out about the weights, for the run's log

    # ------------------------------------------------------------------------------------------------- start-up
    def resolve_data(self, world_size: int) -> int:
        cfg = self.cfg
        require_timm()
        self.train_source = resolve_labelled_source(cfg.data, "train", world_size)
        self.val_source = resolve_labelled_source(cfg.data, "val", world_size, classes=self.train_source.classes)
        self.mixup = build_mixup(cfg.augment, self.num_classes)
        if self.mixup is not None and cfg.data.batch_size % 2:
            raise ConfigError(
                f"data.batch_size={cfg.data.batch_size} with Mixup/CutMix: timm mixes a batch with its reverse and "
                f"needs an even batch; accepted: an even data.batch_size, or augment.mixup_prob=0"
            )
        self.criterion = build_criterion(cfg.augment, self.mixup is not None)
        self.train_transform = train_transform(cfg.augment, cfg.model.img_size)
        self.eval_transform = eval_transform(cfg.augment, cfg.model.img_size)
        if cfg.finetune.init:
            # Read once here (every rank, before the engine exists) so a bad source stops the run at start-up.
            self.pretrained = read_init(cfg)
            self.notes.append(check_pretrained_windows(cfg.model, self.pretrained))
        else:
            self.notes.append("finetune.init is empty: the backbone starts from random initialisation")
        return self.train_source.samples_per_epoch // (cfg.data.batch_size * world_size)

    @property
    def num_classes(self) -> int:
        assert self.train_source is not None, "resolve_data first"
        return self.train_source.num_classes

    # ---------------------------------------------------------------------------------------------------- model
    def build_model(self) -> SwinTransformerV2:
        cfg = self.cfg
        model = build_classifier(cfg.model, self.num_classes, cfg.finetune.mode, cfg.finetune.probe_stages)
        if self.pretrained is not None:
            count = load_strictly(model, self.pretrained.weights, new_head=True, source=self.pretrained.source)
            self.notes.append(f"loaded {count} tensors of {self.pretrained.source} strictly; the head is new")
            self.pretrained = None  # the engine holds the weights now
        if cfg.finetune.ema:
            self.ema = WeightEMA(model, cfg.finetune.ema_decay)
        return model

    def backbone(self, model: nn.Module) -> SwinTransformerV2:
        return model  # type: ignore[return-value]

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Official fine-tuning groups: no decay for biases, norms and the position-bias MLP; layer-wise lr decay
        with the official layer ids (``swinv2.param_groups``); a frozen backbone contributes none."""
        o = self.cfg.optimizer
        return param_groups(
            model,
            weight_decay=o.weight_decay,
            layer_decay=o.layer_decay,
            no_decay_names=tuple(sorted(model.no_weight_decay())),  # type: ignore[operator]
            no_decay_keywords=tuple(sorted(model.no_weight_decay_keywords())),  # type: ignore[operator]
        )

    # ----------------------------------------------------------------------------------------------------- data
    def batches(self, *, rank: int, world_size: int, epoch: int, start_step: int) -> Iterable[Batch]:
        return build_classification_loader(
            self.cfg.data,
            self.train_source,  # type: ignore[arg-type]
            self.train_transform,
            rank=rank,
            world_size=world_size,
            epoch=epoch,
            seed=self.cfg.training.seed,
            start_step=start_step,
        )

    def inputs(self, batch: Batch, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in ``dtype`` and targets (soft, mixed, when Mixup is on) on ``device``.

        timm's Mixup draws from numpy's global generator: it is seeded from torch's generator, which the trainer
        seeds per micro-step, so a resumed run mixes the same way; numpy's own state is left as it was.
        """
        images = batch["images"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        if self.mixup is None:
            return images.to(dtype), labels
        saved = np.random.get_state()
        np.random.seed(int(torch.randint(0, 2**31 - 1, ())))
        try:
            images, targets = self.mixup(images.float(), labels)
        finally:
            np.random.set_state(saved)
        return images.to(dtype), targets

    def loss(self, engine: Any, batch: Batch, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        images, targets = self.inputs(batch, device, dtype)
        return self.criterion(engine(images).float(), targets)

    def samples(self, batch: Batch) -> int:
        return int(batch["images"].shape[0])

    def forward_flops(self, model: nn.Module, batch: Batch, device: torch.device, dtype: torch.dtype) -> float:
        # In eval mode: a probe's BatchNorm cannot take one sample in training mode, and the running statistics must
        # not move; dropout and drop path change no FLOPs.
        images = batch["images"][:2].to(device, dtype=dtype)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(images)
        finally:
            model.train(was_training)
        return counter.get_total_flops() / images.shape[0]

    def log_images(self, engine: Any, batch: Batch, step: int, metrics: Any) -> None:
        return None  # classification has no pictures to log

    # -------------------------------------------------------------------------------------------- optional hooks
    def evaluate(self, engine: Any, *, rank: int, world_size: int, epoch: int, final: bool) -> dict[str, float] | None:
        """Top-1, top-5 and loss on the validation split after every ``finetune.eval_every_epochs`` epochs and at the
        end (of the EMA weights too, as ``eval_ema/...``)."""
        every = self.cfg.finetune.eval_every_epochs
        if not final and (every == 0 or (epoch + 1) % every):
            return None
        device = engine.device
        scalars = evaluate(engine.module, self._eval_batches(rank, world_size), device, compute_dtype(self.cfg))
        if self.ema is not None:
            ema_model = self._ema_eval_model(device)
            scalars |= evaluate(ema_model, self._eval_batches(rank, world_size), device, torch.float32, "eval_ema/")
        return scalars

    def _eval_batches(self, rank: int, world_size: int) -> Iterable[Batch]:
        return build_eval_loader(
            self.cfg.data,
            self.val_source,  # type: ignore[arg-type]
            self.eval_transform,
            rank=rank,
            world_size=world_size,
        )

    def _ema_eval_model(self, device: torch.device) -> nn.Module:
        """An fp32 copy of the classifier holding the EMA weights (built once, refreshed at each evaluation)."""
        assert self.ema is not None
        if self._ema_model is None:
            f = self.cfg.finetune
            self._ema_model = build_classifier(self.cfg.model, self.num_classes, f.mode, f.probe_stages).to(device)
        self._ema_model.load_state_dict(self.ema.state_dict())
        return self._ema_model

    def after_step(self, engine: Any) -> None:
        if self.ema is not None:
            self.ema.update(engine.module)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is not None:
            if "ema" not in state:
                raise ConfigError(
                    "finetune.ema=true, but the checkpoint this run resumes from holds no EMA of the weights (it was "
                    "saved with finetune.ema=false); accepted: resume it with finetune.ema=false, or start fresh"
                )
            self.ema.load_state_dict(state["ema"])
