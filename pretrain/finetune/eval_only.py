"""``--eval-only PATH``: top-1, top-5 and loss of any classifier this project reads (a fine-tuning run's DeepSpeed
checkpoint at any ZeRO stage and world size, a consolidated or exported file, a timm state dict, an HF model
directory) on ``data.val_path``, every sample counted once over the ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checks import ConfigError
from ..data import LabelledSource, build_eval_loader, resolve_labelled_source
from ..distributed import LaunchEnv
from ..engine import compute_dtype, resolve_device
from ..formats import ConversionError
from .config import FinetuneConfig
from .evaluation import evaluate
from .model import build_classifier, probe_width
from .transforms import eval_transform
from .weights import Pretrained, load_strictly, read_weights

__all__ = ["classifier_from", "evaluate_path"]


def _head_classes(weights: dict[str, torch.Tensor], source: str) -> tuple[int, str]:
    """(classes, mode) the head of ``weights`` was trained for: a linear head or a probe head."""
    for key, mode in (("head.weight", "full"), ("head.linear.weight", "linear")):
        if key in weights:
            return int(weights[key].shape[0]), mode
    raise ConfigError(f"{source}: no classification head (head.weight or head.linear.weight): nothing to evaluate")


def _probe_stages(cfg: FinetuneConfig, weights: dict[str, torch.Tensor]) -> int:
    """The stages a probe head was trained on, from its input width (``finetune.probe_stages`` when no count of
    last stages matches it: strict loading then names the misshaped head)."""
    head = weights.get("head.linear.weight")
    if head is None:
        return cfg.finetune.probe_stages
    stages = len(cfg.model.resolved("depths"))
    matches = [n for n in range(1, stages + 1) if probe_width(cfg.model, n) == head.shape[1]]
    return matches[0] if matches else cfg.finetune.probe_stages


def _check_geometry(cfg: FinetuneConfig, pretrained: Pretrained) -> None:
    """A source that records its geometry must be evaluated at it (strict loading cannot see image or window)."""
    geo = pretrained.geometry
    if geo is None:
        return
    m = cfg.model
    ours = {"img_size": m.img_size, "window_size": m.window_size, "pretrained_window_sizes": m.pretrained_window_sizes}
    for key, value in ours.items():
        recorded = geo.get(key)
        if recorded is None:
            continue
        same = list(recorded) == list(value) if isinstance(recorded, (list, tuple)) else recorded == value
        if isinstance(recorded, (list, tuple)) and not isinstance(value, (list, tuple)):
            same = all(r == value for r in recorded)
        if not same:
            raise ConfigError(
                f"model.{key}={value}, but {pretrained.source} was trained with {key}={recorded}; accepted: "
                f"model.{key}={recorded}"
            )


def classifier_from(cfg: FinetuneConfig, path: str) -> tuple[nn.Module, int, str]:
    """The classifier held at ``path`` (every key loaded strictly, head included), its class count and source."""
    try:
        pretrained = read_weights(path, cfg.finetune.init_format, cfg.finetune.init_tag, cfg.finetune.trust_pickle)
    except ConversionError as exc:
        raise ConfigError(f"--eval-only {path}: {exc}") from None
    _check_geometry(cfg, pretrained)
    classes, mode = _head_classes(pretrained.weights, pretrained.source)
    model = build_classifier(cfg.model, classes, mode, _probe_stages(cfg, pretrained.weights))
    try:
        load_strictly(model, pretrained.weights, new_head=False, source=pretrained.source)
    except ConversionError as exc:
        raise ConfigError(str(exc)) from None
    return model, classes, pretrained.source


def _val_source(cfg: FinetuneConfig, world_size: int, classes: int) -> LabelledSource:
    """The validation split, labelled in the training classes' order when data.train_path is set (as in training),
    else in its own sorted class folders."""
    train = resolve_labelled_source(cfg.data, "train", world_size).classes if cfg.data.train_path else None
    source = resolve_labelled_source(cfg.data, "val", world_size, classes=train)
    if source.num_classes > classes:
        raise ConfigError(
            f"data.val_path={cfg.data.val_path!r} has {source.num_classes} classes, the checkpoint's head {classes}"
        )
    return source


def evaluate_path(cfg: FinetuneConfig, path: str, launch: LaunchEnv) -> dict[str, Any]:
    """Collective when the process group exists: evaluate the classifier at ``path`` on ``data.val_path``.

    Returns:
        The metrics (``eval/top1``, ``eval/top5``, ``eval/loss``, ``eval/samples``, ``eval/skipped``) and the source.
    """
    device = resolve_device(cfg, launch.local_rank)
    model, classes, source = classifier_from(cfg, path)
    dtype = compute_dtype(cfg)
    model = model.to(device=device, dtype=dtype)
    val = _val_source(cfg, launch.world_size, classes)
    batches = build_eval_loader(
        cfg.data, val, eval_transform(cfg.augment, cfg.model.img_size), rank=launch.rank, world_size=launch.world_size
    )
    metrics: dict[str, Any] = evaluate(model, batches, device, dtype)
    if dist.is_initialized():
        dist.barrier()
    return {**metrics, "source": source, "classes": classes}
