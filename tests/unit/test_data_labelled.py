"""Labelled data: class folders and labelled shards for training (exact resume with a transform that draws from the
global generators) and evaluation (every sample once over all ranks, equal batch counts, padding marked)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from pretrain.data import (
    DataError,
    LabelledDataConfig,
    build_classification_loader,
    build_eval_loader,
    resolve_labelled_source,
)
from pretrain.shards import write_shards

CLASSES = ("ant", "bee", "cat")


def make_split(root: Path, per_class: dict[str, int], start: int = 0) -> Path:
    """Uniform images whose red value is a unique id: id = start + running index."""
    n = start
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            Image.new("RGB", (20, 20), (n * 3, 0, 0)).save(root / name / f"{n:03d}.png")
            n += 1
    return root


class RandomTransform:
    """Draws from Python's, numpy's and torch's global generators, as timm's transforms do."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        tensor = T.functional.to_tensor(image)
        noise = random.random() + float(np.random.rand()) + float(torch.rand(()))
        return torch.cat([tensor, torch.full((1, 20, 20), noise)])


def ident(batch: dict) -> list[int]:
    return [round(float(r) * 255 / 3) for r in batch["images"][:, 0, 0, 0]]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    make_split(root / "train", {"ant": 5, "bee": 6, "cat": 5})
    make_split(root / "val", {"ant": 3, "cat": 4}, start=50)  # no bee: labels still follow the training classes
    (root / "val" / "cat" / "broken.png").write_bytes(b"not a png")
    write_shards(root / "val", root / "val-shards", maxcount=3, progress=False, labels=True)
    return root


def test_class_folders_train_with_exact_resume(data: Path) -> None:
    cfg = LabelledDataConfig(train_path=str(data / "train"), batch_size=4, num_workers=0)
    source = resolve_labelled_source(cfg, "train", 1)
    assert source.classes == CLASSES and source.num_classes == 3 and source.samples_per_epoch == 16
    kwargs = {"rank": 0, "world_size": 1, "epoch": 2, "seed": 7}
    full = list(build_classification_loader(cfg, source, RandomTransform(), start_step=0, **kwargs))
    assert len(full) == 4 and full[0]["labels"].dtype == torch.int64 and full[0]["skipped"] == 0
    ids = [i for b in full for i in ident(b)]
    labels = [int(v) for b in full for v in b["labels"]]
    assert sorted(ids) == list(range(16))
    assert all(lab == (0 if i < 5 else 1 if i < 11 else 2) for i, lab in zip(ids, labels, strict=True))
    random.seed(123)  # whatever state the process is in, the resumed batches are the same
    resumed = list(build_classification_loader(cfg, source, RandomTransform(), start_step=2, **kwargs))
    for a, b in zip(full[2:], resumed, strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    # Two workers (forkserver) give the same batches as the main process.
    workers = LabelledDataConfig(train_path=str(data / "train"), batch_size=4, num_workers=2)
    parallel = list(build_classification_loader(workers, source, RandomTransform(), start_step=0, **kwargs))
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(full, parallel, strict=True))


@pytest.mark.filterwarnings("ignore:skipping unreadable image", "ignore:skipping corrupt image")
@pytest.mark.parametrize("source_kind", ["folder", "webdataset"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_counts_every_sample_once(data: Path, source_kind: str, world: int) -> None:
    path = data / ("val" if source_kind == "folder" else "val-shards")
    cfg = LabelledDataConfig(source=source_kind, val_path=str(path), batch_size=2, num_workers=0)
    train = resolve_labelled_source(LabelledDataConfig(train_path=str(data / "train")), "train", 1)
    source = resolve_labelled_source(cfg, "val", world, classes=train.classes)
    transform = T.Compose([T.Resize(20), T.ToTensor()])
    per_rank = [list(build_eval_loader(cfg, source, transform, rank=r, world_size=world)) for r in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1  # every rank the same number of batches
    seen, skipped = [], 0
    for batches in per_rank:
        for batch in batches:
            assert batch["images"].shape[0] == 2 and batch["valid"].dtype == torch.bool
            valid = batch["valid"]
            seen += list(
                zip(np.array(ident(batch))[valid.numpy()].tolist(), batch["labels"][valid].tolist(), strict=True)
            )
            skipped += batch["skipped"]
    # 7 readable images, each once with its training-class label (ant 0, cat 2); the broken file counted once
    # (the folder lists it; the shard writer left it out).
    assert sorted(seen) == [(50, 0), (51, 0), (52, 0), (53, 2), (54, 2), (55, 2), (56, 2)]
    assert skipped == (1 if source_kind == "folder" else 0)


def test_labelled_errors(data: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"num_classes=5 but the data has 3 classes"):
        resolve_labelled_source(LabelledDataConfig(train_path=str(data / "train"), num_classes=5), "train", 1)
    loose = make_split(tmp_path / "loose", {"ant": 2})
    Image.new("RGB", (8, 8)).save(loose / "stray.png")
    with pytest.raises(DataError, match="outside class subfolders"):
        resolve_labelled_source(LabelledDataConfig(train_path=str(loose)), "train", 1)
    with pytest.raises(DataError, match="'bee' is not a training class"):
        resolve_labelled_source(LabelledDataConfig(val_path=str(data / "train")), "val", 1, classes=("ant", "cat"))
