"""Classification evaluation gathered over ranks: top-1, top-5 and the mean cross-entropy, every validation sample
counted exactly once (the evaluation loader marks padding ``valid=False``; the sums are all-reduced)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["classification_sums", "evaluate", "metrics_from_sums"]


def classification_sums(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(loss sum, top-1 hits, top-5 hits, samples) of one batch over its valid entries, float64 on the device."""
    logits = logits.float()
    valid = valid.to(logits.device)
    labels = labels.to(logits.device).clamp(min=0)  # padding's -100 would index out of range; it is masked anyway
    losses = F.cross_entropy(logits, labels, reduction="none")
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
    return torch.stack(
        [
            torch.where(valid, losses, 0.0).sum().double(),
            (top[:, 0] & valid).sum().double(),
            (top.any(dim=1) & valid).sum().double(),
            valid.sum().double(),
        ]
    )


def metrics_from_sums(sums: torch.Tensor, prefix: str = "eval/") -> dict[str, float]:
    """Percentages and the mean loss from summed :func:`classification_sums` (plus a skipped count at index 4)."""
    loss, top1, top5, count, skipped = sums.tolist()
    n = max(count, 1.0)
    return {
        f"{prefix}top1": 100.0 * top1 / n,
        f"{prefix}top5": 100.0 * top5 / n,
        f"{prefix}loss": loss / n,
        f"{prefix}samples": count,
        f"{prefix}skipped": skipped,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    dtype: torch.dtype,
    prefix: str = "eval/",
) -> dict[str, float]:
    """Collective when a process group exists: ``model`` in eval mode over this rank's ``batches`` (from
    :func:`pretrain.data.build_eval_loader`), sums all-reduced, the model's mode restored.

    Args:
        model: images -> logits.
        batches: {"images", "labels", "valid", "skipped"} batches, the same count on every rank.
        device, dtype: where and in which precision the images go.
        prefix: of the metric names.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    try:
        for batch in batches:
            logits = model(batch["images"].to(device, dtype=dtype, non_blocking=True))
            sums[:4] += classification_sums(logits, batch["labels"], batch["valid"])
            sums[4] += int(batch["skipped"])
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    return metrics_from_sums(sums, prefix)
