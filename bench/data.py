"""Data-pipeline throughput against the model it feeds: can one worker keep up with a SwinV2-T SimMIM step?

Usage: python bench/data.py [--shards data/sample_shards] [--img 192] [--batch 8] [--seconds 4] [--rounds 3]
                            [--threads N]

Figures (images/s), all measured in this run on this machine:
- decode+augment+mask, in process: JPEG/PNG/WebP bytes from the shards -> PIL decode -> RandomResizedCrop ->
  flip -> normalise -> SimMIM mask, one image at a time (the per-image work of one worker process);
- loader, 1 worker: the real ``build_pretrain_loader`` (tar reading, shuffle buffer, collation, transfer from the
  worker process) with num_workers=1, batches of ``--batch``;
- SwinV2-T SimMIM train step at ``--img``/w12, batch ``--batch`` (forward, masked L1 loss, backward, AdamW step),
  fp32, after one warm-up step.
The three run interleaved, one slice of each per round for ``--rounds`` rounds, and the best round of each is
reported: the CPU is shared with other jobs, the best round is the least disturbed one and all three see the same load.
The ratio loader / model step says how many model steps one worker feeds (>= 1: the GPU-less step is not starved).
The sample photos (scikit-image's, about 512 px) are smaller than ImageNet's average (~400 x 350 px JPEG is similar);
pass --shards to measure your own data. Shards are created with pretrain.sample_data when the folder is missing.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

from pretrain.config import PretrainConfig, load_config
from pretrain.data import SHARD_IMAGE_KEYS, SimMIMTransform, build_pretrain_loader
from pretrain.masking import MaskGenerator
from pretrain.sample_data import write_sample_shards
from pretrain.simmim import build_simmim


def shard_images(folder: Path) -> list[bytes]:
    """Raw image entries of every shard in ``folder``."""
    blobs = []
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.rpartition(".")[2] in SHARD_IMAGE_KEYS:
                    blobs.append(tar.extractfile(member).read())
    return blobs


def transform_rate(transform: SimMIMTransform, blobs: list[bytes], rng: np.random.Generator, seconds: float) -> float:
    """Images/s of decode + augment + mask in this process, for ``seconds``."""
    # A DataLoader worker runs torch with one thread; so does this figure (with more, the OpenMP threads of the
    # small normalise op spin against each other on a loaded machine and the figure drops several-fold).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        with Image.open(io.BytesIO(blobs[done % len(blobs)])) as image:
            image.load()
            transform(image, rng)
        done += 1
    rate = done / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return rate


def loader_rate(loader: Iterator[dict[str, torch.Tensor]], batch: int, seconds: float) -> float:
    """Images/s drawn from a running loader for ``seconds``."""
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(loader)
        batches += 1
    return batches * batch / (time.perf_counter() - start)


class ModelStep:
    """One SimMIM training step of the configured model on fixed random images and real masks."""

    def __init__(self, cfg: PretrainConfig) -> None:
        torch.manual_seed(0)
        self.model = build_simmim(cfg)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)  # as the trainer builds it
        gen = MaskGenerator(cfg.model.img_size, cfg.simmim.mask_patch_size, cfg.model.patch_size, cfg.simmim.mask_ratio)
        rng = np.random.default_rng(0)
        self.images = torch.randn(cfg.data.batch_size, 3, cfg.model.img_size, cfg.model.img_size)
        self.mask = torch.from_numpy(np.stack([gen(rng) for _ in range(cfg.data.batch_size)]))
        self.run()  # the first step allocates the optimizer state and warms caches

    def run(self) -> float:
        """Images/s of one step."""
        start = time.perf_counter()
        self.model(self.images, self.mask).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.images.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default="data/sample_shards")
    parser.add_argument("--img", type=int, default=192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time of each data figure per round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the model step (0: torch default)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one model step each)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    shards = Path(args.shards)
    if not (shards / "sizes.json").is_file():
        write_sample_shards(shards)
    cfg = load_config(
        "configs/simmim_swinv2_tiny_192_w12.yaml",
        [
            f"model.img_size={args.img}",
            f"data.path={shards}/shard-*.tar",
            f"data.batch_size={args.batch}",
            "data.num_workers=1",
            "data.shuffle_buffer=50",
            "data.samples_per_epoch=100000",
            "model.drop_path_rate=0.0",
        ],
    )
    blobs = shard_images(shards)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(blobs)} images in {shards}, "
        f"img {args.img}, batch {args.batch}, {args.rounds} interleaved rounds"
    )
    transform, rng = SimMIMTransform(cfg), np.random.default_rng(0)
    loader = iter(build_pretrain_loader(cfg, rank=0, world_size=1))
    next(loader)  # worker start-up and the first shuffle-buffer fill are not steady-state throughput
    step = ModelStep(cfg)
    best = {"transform": 0.0, "loader": 0.0, "step": 0.0}
    for _ in range(args.rounds):
        best["transform"] = max(best["transform"], transform_rate(transform, blobs, rng, args.seconds))
        best["loader"] = max(best["loader"], loader_rate(loader, args.batch, args.seconds))
        best["step"] = max(best["step"], step.run())
    print(f"decode+augment+mask, 1 process : {best['transform']:8.1f} img/s")
    print(f"build_pretrain_loader, 1 worker: {best['loader']:8.1f} img/s")
    print(f"SwinV2-T SimMIM train step     : {best['step']:8.1f} img/s (fp32)")
    ratio = best["loader"] / best["step"]
    print(f"one worker feeds {ratio:.1f}x the model step's rate ({'keeps up' if ratio >= 1 else 'does NOT keep up'})")


if __name__ == "__main__":
    main()
