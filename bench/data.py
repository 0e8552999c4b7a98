"""Data-pipeline throughput: the loaders per worker, against torchvision's ImageFolder, and the shard writer.

Usage: python bench/data.py [--img 192] [--batch 16] [--seconds 4] [--copies 40] [--skip-model]

Figures (images/s), all measured in this run on this machine, on ImageNet-like JPEGs made from scikit-image's sample
photos (500 x 375, quality 90; ``--copies`` copies of each make the data set, 1,000 images by default):
- decode+augment+mask, in process: the per-image work of one worker (PIL decode -> RandomResizedCrop -> flip ->
  normalise -> SimMIM mask);
- build_pretrain_loader with one worker (tar reading, shuffle buffer, collation, transfer from the worker) from
  local shards, from the same shards over HTTP (a local server, read through curl), and from a two-source mixture
  (3:1) of two shard sets;
- torchvision's ImageFolder + RandomResizedCrop + flip + normalise with one worker, on the same photos as files:
  the reference point of a plain folder pipeline (no mask);
- the shard writer (``pretrain.shards``) packing the folder with 1 and 2 worker processes, as they are (JPEGs are
  checked by a full decode and stored unchanged) and with ``--max-side 256`` (each image decoded, resized and
  re-encoded: the work that parallel packing is for);
- unless --skip-model: the SwinV2-T SimMIM train step at ``--img`` (fp32, CPU threads), to say how many steps one
  worker feeds.
The CPU is shared with other jobs: each loader figure is the best of ``--rounds`` slices of ``--seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from pretrain.config import PretrainConfig, load_config
from pretrain.data import (
    SHARD_IMAGE_KEYS,
    SimMIMTransform,
    build_pretrain_loader,
    decode_image,
    resolve_source,
    worker_context,
)
from pretrain.sample_data import sample_image_files
from pretrain.shards import write_shards

RECIPE = "configs/simmim_swinv2_tiny_192_w12.yaml"


def make_folder(root: Path, copies: int) -> Path:
    """An ImageFolder layout (two classes) of ImageNet-like JPEGs: each sample photo cropped to 4:3 and resized to
    500 x 375 (quality 90, about ImageNet's median size), ``copies`` copies of each."""
    from PIL import Image

    photos = sample_image_files()
    for i, photo in enumerate(photos):
        with Image.open(photo) as image:
            image = image.convert("RGB")
            w, h = image.size
            crop_h = min(h, round(w * 3 / 4))
            crop_w = round(crop_h * 4 / 3)
            top, left = (h - crop_h) // 2, (w - crop_w) // 2
            jpeg = image.crop((left, top, left + crop_w, top + crop_h)).resize((500, 375), Image.BICUBIC)
        first = root / f"class{i % 2}" / f"000-{photo.stem}.jpg"
        first.parent.mkdir(parents=True, exist_ok=True)
        jpeg.save(first, quality=90)
        for copy in range(1, copies):
            shutil.copyfile(first, first.with_name(f"{copy:03d}-{photo.stem}.jpg"))
    return root


def writer_rate(folder: Path, out: Path, workers: int, max_side: int | None = None, rounds: int = 2) -> float:
    """Images/s of the shard writer packing ``folder`` (best of ``rounds`` packs, each into a new folder)."""
    best = 0.0
    for round_ in range(rounds):
        start = time.perf_counter()
        report = write_shards(
            folder, out / str(round_), maxcount=64, progress=False, workers=workers, max_side=max_side
        )
        best = max(best, report["written"] / (time.perf_counter() - start))
    return best


def shard_blobs(folder: Path) -> list[bytes]:
    import tarfile

    blobs = []
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.rpartition(".")[2] in SHARD_IMAGE_KEYS:
                    blobs.append(tar.extractfile(member).read())  # type: ignore[union-attr]
    return blobs


def transform_rate(cfg: PretrainConfig, blobs: list[bytes], seconds: float) -> float:
    """Images/s of decode + augment + mask in this process, with one torch thread (as in a worker)."""
    transform, rng = SimMIMTransform(cfg), np.random.default_rng(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        transform(decode_image(blobs[done % len(blobs)]), rng)
        done += 1
    torch.set_num_threads(threads)
    return done / (time.perf_counter() - start)


def best_rate(batches: Iterator[Any], batch: int, seconds: float, rounds: int) -> float:
    """Best images/s over ``rounds`` slices of ``seconds`` drawn from a running loader (after its first batch)."""
    next(batches)  # worker start-up and the first shuffle-buffer fill are not steady-state throughput
    best = 0.0
    for _ in range(rounds):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(batches)
            count += 1
        best = max(best, count * batch / (time.perf_counter() - start))
    return best


def pretrain_cfg(args: argparse.Namespace, *data: str) -> PretrainConfig:
    return load_config(
        RECIPE,
        [
            f"model.img_size={args.img}",
            f"data.batch_size={args.batch}",
            "data.num_workers=1",
            "data.shuffle_buffer=50",
            "data.samples_per_epoch=1000000",
            "data.pin_memory=false",
            "model.drop_path_rate=0.0",
            *data,
        ],
    )


def pretrain_rate(cfg: PretrainConfig, args: argparse.Namespace) -> float:
    loader = build_pretrain_loader(cfg, resolve_source(cfg.data, 1), rank=0, world_size=1)
    return best_rate(iter(loader), args.batch, args.seconds, args.rounds)


def imagefolder_rate(folder: Path, args: argparse.Namespace) -> float:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    transform = T.Compose(
        [
            T.RandomResizedCrop(args.img, scale=(0.67, 1.0), interpolation=T.InterpolationMode.BILINEAR),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    dataset = ImageFolder(str(folder), transform=transform)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**7)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, sampler=sampler, num_workers=1)
    return best_rate(iter(loader), args.batch, args.seconds, args.rounds)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def handle(self) -> None:
        with contextlib.suppress(ConnectionError):  # the loader stopped a transfer (end of a measurement)
            super().handle()


def serve(folder: Path) -> tuple[ThreadingHTTPServer, str]:
    """A local HTTP server of ``folder`` (in a thread) and its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(folder)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def model_step_rate(cfg: PretrainConfig) -> float:
    """Images/s of one SwinV2-T SimMIM train step (forward, masked L1 loss, backward, AdamW), after a warm-up."""
    from pretrain.masking import MaskGenerator
    from pretrain.simmim import build_simmim

    torch.manual_seed(0)
    model = build_simmim(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = MaskGenerator(cfg.model.img_size, cfg.simmim.mask_patch_size, cfg.model.patch_size, cfg.simmim.mask_ratio)
    rng = np.random.default_rng(0)
    images = torch.randn(cfg.data.batch_size, 3, cfg.model.img_size, cfg.model.img_size)
    mask = torch.from_numpy(np.stack([gen(rng) for _ in range(cfg.data.batch_size)]))
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        model(images, mask).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        best = max(best, images.shape[0] / (time.perf_counter() - start))
    return best


def report(name: str, rate: float, unit: str = "img/s per worker") -> None:
    print(f"{name:<44}: {rate:8.1f} {unit}", flush=True)


def run(args: argparse.Namespace, tmp: Path) -> None:
    folder = make_folder(tmp / "folder", args.copies)
    worker_context("forkserver")  # started once per process (seconds): not part of the writer's packing rate
    rates = {w: writer_rate(folder, tmp / f"shards-w{w}", w) for w in (1, 2)}
    resized = {w: writer_rate(folder, tmp / f"resized-w{w}", w, max_side=256) for w in (1, 2)}
    shards = tmp / "shards-w1" / "0"
    n_images = sum(1 for _ in folder.rglob("*.*"))
    print(f"torch {torch.__version__}, {n_images} images, img {args.img}, batch {args.batch}", flush=True)
    report("shard writer, 1 worker", rates[1], "img/s")
    report("shard writer, 2 workers", rates[2], "img/s")
    report("shard writer --max-side 256, 1 worker", resized[1], "img/s")
    report("shard writer --max-side 256, 2 workers", resized[2], "img/s")
    cfg = pretrain_cfg(args, f"data.path={shards}")
    report("decode+augment+mask, in process", transform_rate(cfg, shard_blobs(shards), args.seconds), "img/s")
    report("build_pretrain_loader, local shards", pretrain_rate(cfg, args))
    server, base = serve(shards)
    try:
        names = sorted(p.name for p in shards.glob("shard-*.tar"))
        http = f"{base}/shard-{{{names[0][6:12]}..{names[-1][6:12]}}}.tar"
        report("build_pretrain_loader, HTTP shards", pretrain_rate(pretrain_cfg(args, f"data.path={http}"), args))
    finally:
        server.shutdown()
    mixture = f"data.sources=[{{path: '{shards}', weight: 3}}, {{path: '{tmp / 'shards-w2' / '0'}', weight: 1}}]"
    mixed = pretrain_cfg(args, "data.path=''", mixture)  # the recipe's data.path gives way to the mixture
    report("build_pretrain_loader, 3:1 mixture of 2 sets", pretrain_rate(mixed, args))
    report("torchvision ImageFolder + RandomResizedCrop", imagefolder_rate(folder, args))
    if not args.skip_model:
        report("SwinV2-T SimMIM train step (fp32)", model_step_rate(cfg), "img/s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img", type=int, default=192)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time of each loader slice")
    parser.add_argument("--rounds", type=int, default=2, help="slices per loader figure (the best is reported)")
    parser.add_argument("--copies", type=int, default=40, help="copies of each sample photo in the data set")
    parser.add_argument("--skip-model", action="store_true", help="leave out the model step")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        run(args, Path(tmp))


if __name__ == "__main__":
    main()
