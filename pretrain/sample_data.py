"""Sample data for the demos and the tests, from images that ship inside scikit-image (nothing is downloaded).

    python -m pretrain.sample_data OUT_DIR [--maxcount 8] [--force]             # unlabelled photos -> shards
    python -m pretrain.sample_data --labelled OUT_DIR [--val-per-class 20]      # labelled faces -> class folders

Unlabelled (SimMIM pretraining, scripts/demo.sh): the photos of the installed ``skimage/data`` folder packed into
webdataset shards. Photos smaller than ``--min-side`` pixels are left out; grayscale ones are converted to RGB by the
pipeline at load time.

Labelled (fine-tuning, scripts/demo_finetune.sh): scikit-image's ``lfw_subset``, 200 grey 25x25 crops from Labeled
Faces in the Wild, 100 faces and 100 non-faces (background crops of the same photos), written as 8-bit PNGs into
``OUT_DIR/{train,val}/{face,non_face}/``, the layout ``python -m pretrain.finetune`` reads (``data.source: folder``).
The split is per class, drawn with a fixed seed, so every run of the demo sees the same images.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .shards import write_shards

__all__ = [
    "LFW_CLASSES",
    "lfw_subset_images",
    "main",
    "sample_image_files",
    "write_labelled_sample",
    "write_sample_shards",
]

# Class folder names in label order: lfw_subset holds the 100 faces first, then the 100 non-faces.
LFW_CLASSES = ("face", "non_face")
_LFW_SHAPE = (200, 25, 25)
_SPLITS = ("train", "val")


def _skimage_data_dir() -> Path:
    """The installed ``skimage/data`` folder (SystemExit with the install command when scikit-image is missing)."""
    try:
        import skimage
    except ImportError:
        raise SystemExit(
            "the sample images come with scikit-image, which is not installed: `pip install -e .[demo]` "
            "(scripts/demo.sh installs it)"
        ) from None
    return Path(skimage.__file__).parent / "data"


def sample_image_files(min_side: int = 128) -> list[Path]:
    """The photos in the installed skimage/data folder whose shorter side is at least ``min_side``."""
    data_dir = _skimage_data_dir()
    files = []
    for path in sorted(data_dir.iterdir()):
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            continue
        with Image.open(path) as image:
            if min(image.size) >= min_side:
                files.append(path)
    if not files:
        raise FileNotFoundError(f"no sample photos found in {data_dir}; is scikit-image installed completely?")
    return files


def write_sample_shards(out_dir: str | Path, maxcount: int = 8, force: bool = False, min_side: int = 128) -> dict:
    """Copy the sample photos to a temporary folder and pack them with the shard writer into ``out_dir``."""
    with tempfile.TemporaryDirectory() as tmp:
        for path in sample_image_files(min_side):
            (Path(tmp) / path.name).write_bytes(path.read_bytes())
        return write_shards(tmp, out_dir, maxcount=maxcount, force=force, progress=False)


def lfw_subset_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's ``lfw_subset`` read from the installed package (what ``skimage.data.lfw_subset()`` returns).

    Returns:
        ``(images, labels)``: uint8 (200, 25, 25) grey images (the stored floats in [0, 1] times 255, rounded) and
        int64 (200,) labels indexing :data:`LFW_CLASSES` (0 = face for the first 100, 1 = non-face).

    Raises:
        FileNotFoundError: the file is not in the installed scikit-image.
        ValueError: the file does not hold 200 images of 25x25 in [0, 1].
    """
    path = _skimage_data_dir() / "lfw_subset.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; is scikit-image installed completely?")
    images = np.load(path, allow_pickle=False)
    if images.shape != _LFW_SHAPE or not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError(
            f"{path}: shape {images.shape}, values in [{images.min()}, {images.max()}]; expected {_LFW_SHAPE} in [0, 1]"
        )
    pixels = np.rint(images * 255.0).astype(np.uint8)
    labels = np.repeat(np.arange(len(LFW_CLASSES), dtype=np.int64), _LFW_SHAPE[0] // len(LFW_CLASSES))
    return pixels, labels


def _split(labels: np.ndarray, val_per_class: int, seed: int) -> dict[str, list[int]]:
    """Indices of each split: ``val_per_class`` images of every class drawn with ``seed``, the rest for training."""
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        val.extend(int(i) for i in rng.permutation(members)[:val_per_class])
    chosen = set(val)
    return {"train": [i for i in range(len(labels)) if i not in chosen], "val": sorted(val)}


def write_labelled_sample(out_dir: str | Path, val_per_class: int = 20, seed: int = 0, force: bool = False) -> dict:
    """Write ``lfw_subset`` as class folders ``out_dir/{train,val}/{face,non_face}/lfwNNN.png`` (NNN = the image's
    index in ``lfw_subset``).

    The two splits are built in a temporary folder inside ``out_dir`` and renamed into place, so an interrupted call
    leaves no half-written split behind.

    Args:
        out_dir: the folder to write into (created if missing); other files in it are left alone.
        val_per_class: validation images per class (1 to 99); the other images of the class go to training.
        seed: seed of the per-class draw of the validation images.
        force: replace existing ``train/`` and ``val/`` folders in ``out_dir`` (refused without it).

    Returns:
        ``{"train": {class: count}, "val": {class: count}, "out_dir": str}``.

    Raises:
        ValueError: ``val_per_class`` out of range.
        FileExistsError: ``out_dir/train`` or ``out_dir/val`` exists and ``force`` is off.
    """
    per_class = _LFW_SHAPE[0] // len(LFW_CLASSES)
    if not 1 <= val_per_class < per_class:
        raise ValueError(f"val_per_class={val_per_class}; accepted: 1 to {per_class - 1} (each class has {per_class})")
    out = Path(out_dir)
    existing = [str(out / split) for split in _SPLITS if (out / split).exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} already exist; pass --force (force=True) to replace them")
    images, labels = lfw_subset_images()
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"out_dir": str(out)}
    with tempfile.TemporaryDirectory(dir=out, prefix=".labelled-") as tmp:
        for split, indices in _split(labels, val_per_class, seed).items():
            counts = dict.fromkeys(LFW_CLASSES, 0)
            for index in indices:
                name = LFW_CLASSES[labels[index]]
                folder = Path(tmp) / split / name
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[index]).save(folder / f"lfw{index:03d}.png")
                counts[name] += 1
            report[split] = counts
        for split in _SPLITS:
            target = out / split
            if target.exists():  # force: move the old split aside, put the new one in place, then delete the old
                aside = Path(tmp) / f"old-{split}"
                os.replace(target, aside)
            os.replace(Path(tmp) / split, target)
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain.sample_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="where the shards and sizes.json (or, with --labelled, train/ and val/) go")
    parser.add_argument("--labelled", action="store_true", help="write lfw_subset as labelled class folders")
    parser.add_argument("--maxcount", type=int, default=8, help="samples per shard (default 8)")
    parser.add_argument("--min-side", type=int, default=128, help="leave out photos smaller than this (pixels)")
    parser.add_argument(
        "--val-per-class", type=int, default=20, help="--labelled: validation images per class (default 20 of 100)"
    )
    parser.add_argument("--seed", type=int, default=0, help="--labelled: seed of the train/val split (default 0)")
    parser.add_argument(
        "--force", action="store_true", help="write into a non-empty output folder (--labelled: replace train/, val/)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.labelled:
            report = write_labelled_sample(args.out_dir, args.val_per_class, args.seed, args.force)
        else:
            report = write_sample_shards(args.out_dir, args.maxcount, args.force, args.min_side)
    except (ValueError, OSError) as exc:  # bad values, writer refusals, missing sample files, filesystem errors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.labelled:
        counts = ", ".join(f"{split} {report[split]}" for split in _SPLITS)
        print(f"wrote lfw_subset as class folders in {args.out_dir}: {counts}")
    else:
        print(f"wrote {report['written']} sample photos to {len(report['shards'])} shards in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
