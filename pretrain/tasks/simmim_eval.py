"""Evaluation while pretraining (the ``eval`` config section): every ``eval.every_steps`` steps and at the end of the
run, on held-out images,

- ``eval/recon_loss``: the masked L1 reconstruction loss with fixed masks (held-out sample g always gets the mask
  drawn from ``(eval.mask_seed, g)``), comparable across steps and runs;
- ``eval/knn_top1``: a weighted kNN classifier on the pooled, L2-normalised backbone features of a small labelled
  train/val set (class folders or labelled shards): k nearest training features by cosine similarity, each voting
  for its class with weight exp(similarity / T) (k=20, T=0.07: DINO's protocol);
- reconstruction pictures of the first held-out images with their fixed masks, in pixel space
  (:func:`pretrain.simmim.reconstruction_in_input_space`).

Every held-out and labelled sample is seen exactly once over the ranks (padding is marked and left out); per-rank
sums are all-reduced and the training features all-gathered, so the numbers do not depend on the world size.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..checks import one_of, require
from ..data import DataError, LabelledDataConfig, LabelledSource, build_eval_loader, resolve_labelled_source
from ..data.config import SOURCES
from ..data.urls import ReadOptions
from ..masking import MaskGenerator
from ..simmim import SimMIM, pixel_mask
from .heldout import EvalTransform, HeldOut, build_heldout_loader, fixed_mask, resolve_heldout

if TYPE_CHECKING:
    from ..config import PretrainConfig
    from ..metrics import MetricsLogger

__all__ = [
    "EvalConfig",
    "KnnConfig",
    "PretrainEvaluator",
    "gather_rows",
    "interleave",
    "knn_correct",
    "knn_metrics",
    "pooled_features",
    "reconstruction_metrics",
    "reconstruction_sums",
]


@dataclass
class KnnConfig:
    # Labelled class folders (root/<class>/**/image) or labelled shards; both empty = no kNN.
    train_path: str = ""
    val_path: str = ""
    source: str = "folder"
    k: int = 20
    temperature: float = 0.07

    def check(self) -> None:
        one_of("eval.knn.source", self.source, SOURCES)
        require(
            bool(self.train_path) == bool(self.val_path),
            f"eval.knn.train_path={self.train_path!r}, eval.knn.val_path={self.val_path!r}; accepted: both set (a "
            f"labelled train and val split) or both empty (no kNN)",
        )
        require(self.k >= 1, f"eval.knn.k={self.k}; accepted: 1 or more neighbours")
        require(self.temperature > 0, f"eval.knn.temperature={self.temperature}; accepted: > 0")


@dataclass
class EvalConfig:
    # Evaluate every N optimizer steps and at the end of the run; 0 = never.
    every_steps: int = 0
    # Held-out images for the fixed-mask reconstruction loss and pictures: a folder (any layout, searched
    # recursively) or shards; "" = none.
    path: str = ""
    source: str = "folder"
    # Use the first N held-out images only (needed for shards without a size index); null = all.
    max_samples: int | None = None
    # Held-out sample g is masked with the mask drawn from (mask_seed, g).
    mask_seed: int = 0
    # Reconstruction pictures of this many held-out images at each evaluation; 0 = none.
    images: int = 4
    knn: KnnConfig = field(default_factory=KnnConfig)
    # Per-device batch and loader workers of the evaluation (other worker and remote-read options come from data).
    batch_size: int = 64
    num_workers: int = 2
    # Resize to img_size / crop_pct, then a centre crop of img_size.
    crop_pct: float = 0.875

    def check(self) -> None:
        require(self.every_steps >= 0, f"eval.every_steps={self.every_steps}; accepted: 0 (off) or more")
        one_of("eval.source", self.source, SOURCES)
        require(
            self.max_samples is None or self.max_samples > 0,
            f"eval.max_samples={self.max_samples}; accepted: a positive integer or null (all)",
        )
        require(0 <= self.mask_seed < 2**63, f"eval.mask_seed={self.mask_seed}; accepted: 0 <= seed < 2**63")
        require(self.images >= 0, f"eval.images={self.images}; accepted: 0 (none) or more")
        require(self.batch_size > 0, f"eval.batch_size={self.batch_size}; accepted: a positive integer")
        require(self.num_workers >= 0, f"eval.num_workers={self.num_workers}; accepted: 0 or more")
        require(0.0 < self.crop_pct <= 1.0, f"eval.crop_pct={self.crop_pct}; accepted: (0, 1]")
        self.knn.check()
        require(
            self.every_steps == 0 or bool(self.path) or bool(self.knn.train_path),
            f"eval.every_steps={self.every_steps} with neither eval.path nor eval.knn.train_path/val_path set: "
            f"nothing to evaluate; accepted: held-out images in eval.path and/or a labelled set in eval.knn, or "
            f"eval.every_steps=0",
        )


# ------------------------------------------------------------------------------------------------ computations
def reconstruction_sums(model: SimMIM, images: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> tuple:
    """(sums, reconstruction) of one held-out batch: sums = float64 [masked L1 error, masked pixel values, valid
    samples] over the valid samples (the loss is their ratio: SimMIM's loss with every pixel of the set weighed
    alike), and the reconstruction in target space.

    Args:
        model: the SimMIM model (in eval mode); images in its dtype; mask (B, h, w), 1 = masked; valid (B,) bool.
    """
    _, reconstruction = model.reconstruct(images, mask)
    target = model.target(images.float())
    weights = pixel_mask(mask, model.encoder.patch_size).to(torch.float32) * valid.view(-1, 1, 1, 1)
    error = ((reconstruction.float() - target).abs() * weights).sum(dtype=torch.float64)
    pixels = weights.sum(dtype=torch.float64) * target.shape[1]
    return torch.stack([error, pixels, valid.sum().double()]), reconstruction


def pooled_features(model: SimMIM, images: torch.Tensor) -> torch.Tensor:
    """The backbone's average-pooled final-norm features (B, num_features) of unmasked images, float32: the features
    a classifier built on this backbone would see (through the encoder's own forward, so ZeRO-3 gathers its
    parameters)."""
    b, _, h, w = images.shape
    patch = model.encoder.patch_size
    nothing = torch.zeros(b, h // patch, w // patch, dtype=torch.uint8, device=images.device)
    return model.encoder(images, nothing).float().mean(dim=(2, 3))


def gather_rows(local: torch.Tensor, world_size: int) -> torch.Tensor:
    """Collective: the (N, ...) tensors of every rank (N equal on all ranks) as one (N * world_size, ...) tensor in
    global sample order: row j of rank r is global sample r + j * world_size (the evaluation loaders' stride)."""
    if world_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local.contiguous())
    return interleave(parts)


def interleave(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rank r's row j -> row r + j * len(parts): strided per-rank shares back in global sample order."""
    return torch.stack(parts, dim=1).flatten(0, 1)


def knn_correct(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 256,
) -> int:
    """Correct top-1 predictions of DINO's weighted kNN classifier for ``features`` with true ``labels``.

    Features are L2-normalised here; the k most cosine-similar training features vote for their labels with weight
    exp(similarity / temperature); the class with the most weight is the prediction (k is capped at the training
    set's size). Queries are processed ``chunk`` at a time to bound the (chunk, N_train) similarity matrix.
    """
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    correct = 0
    for start in range(0, features.shape[0], chunk):
        queries = F.normalize(features[start : start + chunk].float(), dim=1)
        similarity, index = (queries @ bank.T).topk(k, dim=1)
        votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
        votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
        correct += int((votes.argmax(dim=1) == labels[start : start + chunk]).sum())
    return correct


def reconstruction_metrics(sums: torch.Tensor) -> dict[str, float]:
    """``eval/recon_*`` from the summed :meth:`PretrainEvaluator.local_reconstruction` of every rank."""
    error, pixels, samples, skipped = sums.tolist()
    return {"eval/recon_loss": error / max(pixels, 1.0), "eval/recon_samples": samples, "eval/recon_skipped": skipped}


def knn_metrics(sums: torch.Tensor, train_samples: int) -> dict[str, float]:
    """``eval/knn_*`` from summed [correct, validation samples, skipped] and the training bank's size."""
    correct, count, skipped = sums.tolist()
    return {
        "eval/knn_top1": 100.0 * correct / max(count, 1.0),
        "eval/knn_samples": count,
        "eval/knn_train_samples": float(train_samples),
        "eval/knn_skipped": skipped,
    }


# ------------------------------------------------------------------------------------------------- the evaluator
def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model's weights live and their dtype (DeepSpeed casts the whole module for bf16/fp16)."""
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def _loader_config(cfg: PretrainConfig, knn: KnnConfig | None = None) -> LabelledDataConfig:
    """The eval section's loader settings on top of the data section's worker and remote-read options."""
    names = [f.name for f in dataclasses.fields(LabelledDataConfig) if hasattr(cfg.data, f.name)]
    shared = {name: getattr(cfg.data, name) for name in names}
    shared["storage_options"] = dict(cfg.data.storage_options)
    shared.update(batch_size=cfg.eval.batch_size, num_workers=cfg.eval.num_workers, samples_per_epoch=None)
    shared.update(num_classes=None, source=knn.source if knn else cfg.eval.source)
    shared.update(train_path=knn.train_path if knn else "", val_path=knn.val_path if knn else "")
    return LabelledDataConfig(**shared)


class PretrainEvaluator:
    """The ``eval`` section's evaluation of a SimMIM model; data resolved once, at construction (DataError early).

    Args:
        cfg: the resolved pretraining configuration (``eval``, ``data``, ``model``, ``simmim``).
        world_size: the number of ranks.
    """

    def __init__(self, cfg: PretrainConfig, world_size: int) -> None:
        e = cfg.eval
        self.cfg = cfg
        self.transform = EvalTransform(cfg.model.img_size, e.crop_pct, list(cfg.data.mean), list(cfg.data.std))
        generator = MaskGenerator(
            cfg.model.img_size, cfg.simmim.mask_patch_size, cfg.model.patch_size, cfg.simmim.mask_ratio
        )
        self.masks = functools.partial(fixed_mask, generator, e.mask_seed)  # picklable for loader workers
        self.loader_cfg = _loader_config(cfg)
        self.heldout: HeldOut | None = None
        if e.path:
            self.heldout = resolve_heldout(e.source, e.path, e.max_samples, ReadOptions.of(self.loader_cfg))
        self.knn_cfg: LabelledDataConfig | None = None
        self.knn_train: LabelledSource | None = None
        self.knn_val: LabelledSource | None = None
        if e.knn.train_path:
            self.knn_cfg = _loader_config(cfg, e.knn)
            try:
                self.knn_train = resolve_labelled_source(self.knn_cfg, "train", world_size)
                classes = self.knn_train.classes
                self.knn_val = resolve_labelled_source(self.knn_cfg, "val", world_size, classes=classes)
            except DataError as exc:
                raise DataError(f"eval.knn: {str(exc).replace('data.', 'eval.knn.')}") from None

    @torch.no_grad()
    def evaluate(self, model: SimMIM, *, rank: int, world_size: int) -> tuple[dict[str, float], dict | None]:
        """Collective: (``eval/...`` scalars, equal on every rank; the pictures of this rank's first held-out images
        as {"images", "mask", "reconstruction"} in input space on rank 0, else None).

        Args:
            model: the SimMIM model (its training mode is restored afterwards).
            rank, world_size: this rank and the number of ranks.
        """
        was_training = model.training
        model.eval()
        try:
            scalars, pictures = {}, None
            if self.heldout is not None:
                recon, pictures = self._reconstruction(model, rank, world_size)
                scalars |= recon
            if self.knn_train is not None:
                scalars |= self._knn(model, rank, world_size)
        finally:
            model.train(was_training)
        return scalars, pictures

    def local_reconstruction(self, model: SimMIM, rank: int, world_size: int) -> tuple[torch.Tensor, dict | None]:
        """This rank's share of the held-out loss (no collective): float64 [masked L1 error, masked pixel values,
        valid samples, skipped], and on rank 0 the pictures of its first ``eval.images`` valid held-out images."""
        device, dtype = _device_dtype(model)
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        wanted = self.cfg.eval.images if rank == 0 else 0
        shown: list[tuple[torch.Tensor, ...]] = []
        loader = build_heldout_loader(
            self.heldout, self.transform, self.masks, self.loader_cfg, rank=rank, world_size=world_size
        )
        for batch in loader:
            images = batch["images"].to(device, dtype=dtype, non_blocking=True)
            mask, valid = batch["mask"].to(device), batch["valid"].to(device)
            batch_sums, reconstruction = reconstruction_sums(model, images, mask, valid)
            sums[:3] += batch_sums
            sums[3] += int(batch["skipped"])
            keep = valid.nonzero().flatten()[: wanted - sum(len(p[0]) for p in shown)]
            if len(keep):
                drawn = model.to_input_space(reconstruction[keep].float(), images[keep].float(), mask[keep])
                shown.append((images[keep].float(), mask[keep], drawn))
        if not shown:
            return sums, None
        images, masks, drawn = (torch.cat(parts) for parts in zip(*shown, strict=True))
        return sums, {"images": images, "mask": masks, "reconstruction": drawn}

    def local_features(
        self, model: SimMIM, split: str, rank: int, world_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This rank's features and labels of the kNN ``split`` ("train" or "val") in its loader's slot order
        (padding and unreadable slots labelled -100), and its skipped count; no collective."""
        source = self.knn_train if split == "train" else self.knn_val
        device, dtype = _device_dtype(model)
        features, labels, skipped = [], [], 0
        for batch in build_eval_loader(self.knn_cfg, source, self.transform, rank=rank, world_size=world_size):  # type: ignore[arg-type]
            features.append(pooled_features(model, batch["images"].to(device, dtype=dtype, non_blocking=True)))
            labels.append(batch["labels"].to(device))
            skipped += int(batch["skipped"])
        return torch.cat(features), torch.cat(labels), skipped

    def _reconstruction(self, model: SimMIM, rank: int, world_size: int) -> tuple[dict[str, float], dict | None]:
        sums, pictures = self.local_reconstruction(model, rank, world_size)
        if world_size > 1:
            dist.all_reduce(sums)
        return reconstruction_metrics(sums), pictures

    def _knn(self, model: SimMIM, rank: int, world_size: int) -> dict[str, float]:
        knn = self.cfg.eval.knn
        split = {}
        for name in ("train", "val"):
            features, labels, skipped = self.local_features(model, name, rank, world_size)
            features, labels = gather_rows(features, world_size), gather_rows(labels, world_size)
            keep = labels >= 0
            split[name] = (features[keep], labels[keep], skipped)
        (bank, bank_labels, skipped_train), (queries, labels, skipped_val) = split["train"], split["val"]
        # Every rank holds every feature now; each classifies its strided share of the validation samples.
        mine = slice(rank, None, world_size)
        num_classes = self.knn_train.num_classes  # type: ignore[union-attr]
        correct = knn_correct(bank, bank_labels, queries[mine], labels[mine], num_classes, knn.k, knn.temperature)
        sums = torch.tensor([correct, labels[mine].numel(), skipped_train + skipped_val], dtype=torch.float64)
        sums = sums.to(bank.device)
        if world_size > 1:
            dist.all_reduce(sums)
        return knn_metrics(sums, bank.shape[0])

    def draw(self, pictures: dict, step: int, metrics: MetricsLogger) -> None:
        """The reconstruction grid of :meth:`evaluate`'s pictures as ``eval/reconstruction`` (rank 0 draws)."""
        metrics.log_images(
            step,
            pictures["images"],
            pictures["mask"],
            pictures["reconstruction"],
            list(self.cfg.data.mean),
            list(self.cfg.data.std),
            self.cfg.model.patch_size,
            prefix="eval/",
            count=self.cfg.eval.images,
        )
