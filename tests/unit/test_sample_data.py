"""The labelled sample writer: scikit-image's lfw_subset as train/val class folders for the fine-tuning demo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain.data import LabelledDataConfig
from pretrain.data.labelled import resolve_labelled_source
from pretrain.sample_data import LFW_CLASSES, lfw_subset_images, main, write_labelled_sample

skimage_data = pytest.importorskip("skimage.data")


def _files(root: Path) -> dict[str, list[Path]]:
    return {name: sorted((root / name).glob("*.png")) for name in LFW_CLASSES}


def test_lfw_subset_matches_scikit_image_and_its_label_order() -> None:
    images, labels = lfw_subset_images()
    reference = skimage_data.lfw_subset()
    assert images.shape == (200, 25, 25) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, np.rint(reference * 255).astype(np.uint8))
    assert labels.tolist() == [0] * 100 + [1] * 100  # scikit-image: the first 100 are faces


def test_labelled_folders_hold_every_image_once_with_its_label(tmp_path: Path) -> None:
    report = write_labelled_sample(tmp_path / "lfw", val_per_class=20, seed=0)
    assert report["train"] == {"face": 80, "non_face": 80} and report["val"] == {"face": 20, "non_face": 20}
    images, labels = lfw_subset_images()
    seen: set[int] = set()
    for split in ("train", "val"):
        for name, files in _files(tmp_path / "lfw" / split).items():
            for path in files:
                index = int(path.stem[3:])
                assert index not in seen, f"{path.name} written twice"
                seen.add(index)
                assert LFW_CLASSES[labels[index]] == name
                with Image.open(path) as image:
                    assert image.mode == "L"
                    np.testing.assert_array_equal(np.asarray(image), images[index])
    assert seen == set(range(200))
    assert not [p for p in (tmp_path / "lfw").iterdir() if p.name not in ("train", "val")]  # no temporary left


def test_the_split_is_fixed_by_the_seed(tmp_path: Path) -> None:
    write_labelled_sample(tmp_path / "a", seed=0)
    write_labelled_sample(tmp_path / "b", seed=0)
    write_labelled_sample(tmp_path / "c", seed=1)

    def val_names(root: Path) -> list[str]:
        return [p.name for files in _files(root / "val").values() for p in files]

    assert val_names(tmp_path / "a") == val_names(tmp_path / "b") != val_names(tmp_path / "c")


def test_the_fine_tuning_folder_source_reads_the_written_layout(tmp_path: Path) -> None:
    write_labelled_sample(tmp_path / "lfw", val_per_class=10)
    cfg = LabelledDataConfig(
        source="folder", train_path=str(tmp_path / "lfw/train"), val_path=str(tmp_path / "lfw/val")
    )
    train = resolve_labelled_source(cfg, "train", 1)
    val = resolve_labelled_source(cfg, "val", 1, classes=train.classes)
    assert train.classes == LFW_CLASSES and train.samples_per_epoch == 180 and val.samples_per_epoch == 20
    assert sorted(val.labels) == [0] * 10 + [1] * 10


def test_existing_splits_are_refused_without_force_and_replaced_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lfw"
    write_labelled_sample(out, val_per_class=30)
    (out / "notes.txt").write_text("kept")
    with pytest.raises(FileExistsError, match="--force"):
        write_labelled_sample(out)
    assert main(["--labelled", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err
    assert main(["--labelled", str(out), "--val-per-class", "5", "--force"]) == 0
    assert "val {'face': 5, 'non_face': 5}" in capsys.readouterr().out
    assert [len(files) for files in _files(out / "val").values()] == [5, 5]
    assert [len(files) for files in _files(out / "train").values()] == [95, 95]  # nothing left of the old split
    assert (out / "notes.txt").read_text() == "kept"


@pytest.mark.parametrize("bad", [0, 100, -3])
def test_a_validation_count_out_of_range_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: int
) -> None:
    with pytest.raises(ValueError, match=f"val_per_class={bad}; accepted: 1 to 99"):
        write_labelled_sample(tmp_path / "x", val_per_class=bad)
    assert main(["--labelled", str(tmp_path / "y"), "--val-per-class", str(bad)]) == 2
    assert f"val_per_class={bad}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
