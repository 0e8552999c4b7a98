"""Data pipeline on real tar shards and real folders: rank/worker splits, determinism, resume, corrupt samples."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
import webdataset as wds
from PIL import Image

from pretrain.config import PretrainConfig, load_config
from pretrain.data import DataError, SimMIMTransform, build_pretrain_loader, expand_shards, steps_per_epoch
from pretrain.shards import write_shards
from tests.helpers.tiny import TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]

N_SHARD_IMAGES = 24


def colour(i: int) -> tuple[int, int, int]:
    return (8 + 10 * i, 250 - 5 * i, 100)


def write_colours(folder: Path, ids: range) -> None:
    """Uniform images whose red value identifies them (survives crop, resize and flip exactly; PNG is lossless)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.new("RGB", (40 + i % 5, 36), colour(i)).save(folder / f"img{i:03d}.png")


def ids_of(images: torch.Tensor, cfg: PretrainConfig) -> list[int]:
    red = images[:, 0, 0, 0] * cfg.data.std[0] + cfg.data.mean[0]
    return [round((float(r) * 255 - 8) / 10) for r in red]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_colours(root / "src", range(N_SHARD_IMAGES))
    write_shards(root / "src", root / "out", maxcount=6, progress=False)  # 4 shards of 6
    return root / "out"


def shard_cfg(shard_dir: Path, *extra: str) -> PretrainConfig:
    pattern = str(shard_dir / "shard-{000000..000003}.tar")
    return load_config(
        None,
        [
            *TINY_MODEL,
            "data.source=webdataset",
            f"data.path={pattern}",
            "data.batch_size=2",
            "data.num_workers=0",
            "data.shuffle_buffer=4",
            *extra,
        ],
    )


def collect(cfg: PretrainConfig, **kwargs: int) -> list[dict[str, torch.Tensor]]:
    return list(build_pretrain_loader(cfg, **kwargs))


def test_batch_format_and_mask_statistics(shard_dir: Path) -> None:
    cfg = shard_cfg(shard_dir)
    batches = collect(cfg, rank=0, world_size=1)
    assert len(batches) == steps_per_epoch(cfg, 1) == N_SHARD_IMAGES // 2
    for batch in batches:
        assert batch["images"].shape == (2, 3, 64, 64) and batch["images"].dtype == torch.float32
        assert batch["mask"].shape == (2, 16, 16)
        # 4 x 4 cells of 16 px, ceil(16 * 0.6) = 10 masked, each 4 x 4 tokens.
        assert batch["mask"].flatten(1).sum(1).tolist() == [160, 160]
        assert int(batch["skipped"]) == 0
        assert set(ids_of(batch["images"], cfg)) <= set(range(N_SHARD_IMAGES))


@pytest.mark.slow
def test_two_ranks_two_workers_disjoint_equal_streams(shard_dir: Path) -> None:
    # One pass over the shards: 4 shards = 2 ranks x 2 workers, one shard per reader, 24 // (2 x 2) = 6 batches/rank.
    cfg = shard_cfg(shard_dir, "data.resampled=false", "data.num_workers=2", "data.shuffle_buffer=1")
    assert steps_per_epoch(cfg, 2) == 6
    seen = []
    for rank in (0, 1):
        batches = collect(cfg, rank=rank, world_size=2)
        assert len(batches) == 6
        ids = [i for b in batches for i in ids_of(b["images"], cfg)]
        assert len(ids) == len(set(ids)) == 12  # each of this rank's two shards read once
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(N_SHARD_IMAGES))


def test_resampled_stream_is_deterministic(shard_dir: Path) -> None:
    cfg = shard_cfg(shard_dir)
    first = collect(cfg, rank=1, world_size=2, epoch=3)
    again = collect(cfg, rank=1, world_size=2, epoch=3)
    assert len(first) == len(again) == steps_per_epoch(cfg, 2)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["mask"], b["mask"])
    other_epoch = collect(cfg, rank=1, world_size=2, epoch=4)
    other_rank = collect(cfg, rank=0, world_size=2, epoch=3)
    stack = torch.cat([b["images"] for b in first])
    assert not torch.equal(stack, torch.cat([b["images"] for b in other_epoch]))
    assert not torch.equal(stack, torch.cat([b["images"] for b in other_rank]))
    # A resume reseeds (start_step enters the seed) and yields the remaining batches of the epoch.
    assert len(collect(cfg, rank=1, world_size=2, epoch=3, start_step=2)) == len(first) - 2


def test_corrupt_jpeg_in_shard_is_skipped_and_counted(tmp_path: Path) -> None:
    shard = tmp_path / "bad-000000.tar"
    good = 0
    with wds.TarWriter(str(shard)) as writer:
        for i in range(12):
            if i == 4:
                writer.write({"__key__": f"{i:04d}", "jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF truncated"})
            elif i == 7:
                writer.write({"__key__": f"{i:04d}", "txt": b"no image here"})
            else:
                buffer = io.BytesIO()
                Image.new("RGB", (40, 40), colour(good)).save(buffer, format="PNG")
                writer.write({"__key__": f"{i:04d}", "png": buffer.getvalue(), "cls": b"3"})
                good += 1
    cfg = load_config(
        None,
        [
            *TINY_MODEL,
            f"data.path={shard}",
            "data.batch_size=2",
            "data.num_workers=0",
            "data.resampled=false",
            "data.shuffle_buffer=1",
            "data.samples_per_epoch=10",
        ],
    )
    with pytest.warns(UserWarning, match="skipping"):
        batches = collect(cfg, rank=0, world_size=1)
    assert len(batches) == 5
    assert sum(int(b["skipped"]) for b in batches) == 2
    assert sorted(i for b in batches for i in ids_of(b["images"], cfg)) == list(range(10))


def test_shard_configuration_errors(shard_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="matches no shard files"):
        steps_per_epoch(shard_cfg(shard_dir, f"data.path={tmp_path}/none-{{000..003}}.tar"), 1)
    with pytest.raises(DataError, match=r"4 shards for 2 ranks x 3 workers = 6 readers"):
        build_pretrain_loader(shard_cfg(shard_dir, "data.resampled=false", "data.num_workers=3"), rank=0, world_size=2)
    # Resampling lifts the restriction.
    assert steps_per_epoch(shard_cfg(shard_dir, "data.num_workers=3"), 2) == 6
    # The shard folder itself is accepted as data.path (all *.tar inside).
    assert steps_per_epoch(shard_cfg(shard_dir, f"data.path={shard_dir}"), 1) == N_SHARD_IMAGES // 2
    no_index = tmp_path / "copy"
    no_index.mkdir()
    (no_index / "shard-000000.tar").write_bytes((shard_dir / "shard-000000.tar").read_bytes())
    with pytest.raises(DataError, match=r"sizes\.json"):
        steps_per_epoch(shard_cfg(shard_dir, f"data.path={no_index}/shard-000000.tar"), 1)
    assert (
        steps_per_epoch(shard_cfg(shard_dir, f"data.path={no_index}/shard-000000.tar", "data.samples_per_epoch=6"), 1)
        == 3
    )
    with pytest.raises(DataError, match="fewer than one global batch"):
        steps_per_epoch(shard_cfg(shard_dir, "data.batch_size=16"), 2)
    assert json.loads((shard_dir / "sizes.json").read_text())["shard-000003.tar"] == 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    write_colours(root / "a", range(0, 10))
    write_colours(root / "b" / "nested", range(10, 19))
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8 broken")  # 20 files, one unreadable
    return root


def folder_cfg(folder: Path, *extra: str) -> PretrainConfig:
    return load_config(None, [*TINY_MODEL, "data.source=folder", f"data.path={folder}", "data.num_workers=0", *extra])


def stacked(batches: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.cat([b[key] for b in batches])


def test_folder_counts_unreadable_and_resumes_exactly(folder: Path) -> None:
    cfg = folder_cfg(folder, "data.batch_size=4")
    with pytest.warns(UserWarning, match="unreadable"):
        full = collect(cfg, rank=0, world_size=1, epoch=1)
    assert len(full) == steps_per_epoch(cfg, 1) == 5
    assert sum(int(b["skipped"]) for b in full) == 1
    # The unreadable file's position is filled by the next position's file: full batches, one image twice.
    ids = ids_of(stacked(full, "images"), cfg)
    assert len(ids) == 20 and set(ids) == set(range(19))
    assert all(b["images"].shape[0] == 4 and isinstance(b["skipped"], int) for b in full)
    resumed = collect(cfg, rank=0, world_size=1, epoch=1, start_step=3)
    assert len(resumed) == 2
    for a, b in zip(full[3:], resumed, strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["mask"], b["mask"])
    with pytest.raises(DataError, match="start_step=6"):
        build_pretrain_loader(cfg, rank=0, world_size=1, start_step=6)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_folder_two_ranks_equal_one_rank_any_workers(folder: Path) -> None:
    one = collect(folder_cfg(folder, "data.batch_size=4"), rank=0, world_size=1, epoch=2)
    two = [
        collect(folder_cfg(folder, "data.batch_size=2", "data.num_workers=2"), rank=r, world_size=2, epoch=2)
        for r in (0, 1)
    ]
    assert len(two[0]) == len(two[1]) == len(one) == 5
    for step, batch in enumerate(one):
        # The global batch of step s is rank 0's slice then rank 1's slice, unreadable images (replaced by position)
        # included.
        assert batch["skipped"] == two[0][step]["skipped"] + two[1][step]["skipped"]
        joined = torch.cat([two[0][step]["images"], two[1][step]["images"]])
        assert torch.equal(batch["images"], joined)
        assert torch.equal(batch["mask"], torch.cat([two[0][step]["mask"], two[1][step]["mask"]]))
    other_epoch = collect(folder_cfg(folder, "data.batch_size=4"), rank=0, world_size=1, epoch=3)
    assert not torch.equal(stacked(one, "mask"), stacked(other_epoch, "mask"))


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        steps_per_epoch(folder_cfg(tmp_path / "missing"), 1)
    with pytest.raises(DataError, match="holds no images"):
        steps_per_epoch(folder_cfg(tmp_path), 1)


def test_random_resized_crop_parameters() -> None:
    cfg = load_config(None, TINY_MODEL)
    transform = SimMIMTransform(cfg)
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = transform.crop_params(rng, 300, 200)
        assert top >= 0 and top + h <= 200 and left >= 0 and left + w <= 300
        # Rounding of the sides moves area and aspect slightly outside the sampled ranges.
        assert 0.67 * 0.97 <= h * w / 60000 <= 1.0
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 80, 3), dtype=np.uint8))
    tensor, mask = transform(image, np.random.default_rng(5))
    again, mask2 = transform(image, np.random.default_rng(5))
    assert tensor.shape == (3, 64, 64) and torch.equal(tensor, again) and torch.equal(mask, mask2)
    assert math.isclose(float(mask.float().mean()), 10 / 16)


def test_folder_epoch_longer_than_folder(folder: Path) -> None:
    cfg = folder_cfg(folder, "data.batch_size=4", "data.samples_per_epoch=48")
    assert steps_per_epoch(cfg, 1) == 12
    with pytest.warns(UserWarning, match="unreadable"):
        batches = collect(cfg, rank=0, world_size=1)
    assert len(batches) == 12
    ids = ids_of(stacked(batches, "images"), cfg)
    # 48 positions = two full permutations of the 20 files and 8 of a third: the 19 readable ones at least twice.
    assert all(ids.count(i) >= 2 for i in range(19)) and sum(int(b["skipped"]) for b in batches) >= 2


# ------------------------------------------------------------------------------------------- shard patterns
def test_expand_shards_brace_alternatives_inside_comma_lists(tmp_path: Path) -> None:
    for name in ("x-a.tar", "x-b.tar", "y-0.tar", "y-1.tar", "z.tar"):
        (tmp_path / name).write_bytes(b"")
    t = str(tmp_path)
    # Commas inside braces are alternatives, commas outside separate list entries; globs and ranges combine.
    assert expand_shards(f"{t}/x-{{a,b}}.tar") == [f"{t}/x-a.tar", f"{t}/x-b.tar"]
    assert expand_shards(f"{t}/x-{{a,b}}.tar, {t}/y-{{0..1}}.tar,{t}/z.*") == [
        f"{t}/x-a.tar",
        f"{t}/x-b.tar",
        f"{t}/y-0.tar",
        f"{t}/y-1.tar",
        f"{t}/z.tar",
    ]
    assert expand_shards(f"{t}/z.tar,{t}/x-a.tar,") == [f"{t}/z.tar", f"{t}/x-a.tar"]


@pytest.mark.parametrize(
    ("pattern", "detail"),
    [("x-{a,b.tar", "1 '{' left open"), ("x-a}.tar", "'}' at position 3"), ("a.tar,x-{0..2.tar", "left open")],
)
def test_unbalanced_braces_are_a_data_error(pattern: str, detail: str) -> None:
    with pytest.raises(DataError) as info:
        expand_shards(pattern)
    message = str(info.value)
    assert f"data.path={pattern!r}" in message and "unbalanced braces" in message and detail in message
    assert "accepted: a brace pattern" in message


def test_unbalanced_braces_exit_cleanly_from_the_command_line(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pretrain", "--config", "configs/demo_cpu.yaml", f"data.path={tmp_path}/x-{{a,b.tar"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 2, run.stderr
    assert "unbalanced braces" in run.stderr and "Traceback" not in run.stderr


# -------------------------------------------------------------------------------------- tar-level errors
def cut_shard(shard_dir: Path, shard: str, sample: int) -> int:
    """Byte offset of the image data of the ``sample``-th sample of ``shard`` (samples in order of the shard)."""
    with tarfile.open(shard_dir / shard) as tar:
        images = [m for m in tar.getmembers() if m.name.endswith(".png")]
        return images[sample].offset_data


def header_of(shard_dir: Path, shard: str, sample: int) -> int:
    """Byte offset of the first tar header of the ``sample``-th sample of ``shard``."""
    with tarfile.open(shard_dir / shard) as tar:
        keys: list[str] = []
        for member in tar.getmembers():
            key = member.name.partition(".")[0]
            if key not in keys:
                keys.append(key)
                if len(keys) == sample + 1:
                    return member.offset
    raise AssertionError(f"{shard} has fewer than {sample + 1} samples")


def one_shard_cfg(path: Path, *extra: str) -> PretrainConfig:
    # Batches of 1 from one shard read in order (no shuffling), cycled: batch k is sample k of the shard's good prefix.
    return load_config(
        None,
        [
            *TINY_MODEL,
            f"data.path={path}",
            "data.batch_size=1",
            "data.num_workers=0",
            "data.resampled=false",
            "data.shuffle_buffer=1",
            *extra,
        ],
    )


@pytest.fixture
def six_samples(tmp_path: Path) -> Path:
    """One shard of six PNGs with its sizes.json, written by the shard writer."""
    write_colours(tmp_path / "src", range(6))
    write_shards(tmp_path / "src", tmp_path / "out", maxcount=6, progress=False)
    return tmp_path / "out"


@pytest.mark.filterwarnings("ignore:skipping sample .* no image entry")  # the partial sample
def test_truncated_shard_counts_exactly_the_lost_samples(six_samples: Path) -> None:
    shard = six_samples / "shard-000000.tar"
    # Cut inside the image of sample 3: samples 0-2 survive, sample 3 is partial (no image), 4 and 5 are gone.
    data = shard.read_bytes()
    shard.write_bytes(data[: cut_shard(six_samples, shard.name, 3) + 100])
    cfg = one_shard_cfg(shard, "data.samples_per_epoch=4")
    with pytest.warns(UserWarning, match=r"read 4 samples of the 6 listed in sizes\.json; 2 counted as skipped; tar"):
        batches = collect(cfg, rank=0, world_size=1)
    # Batches 1-3: samples 0-2; the fourth comes from the next pass over the shard and carries the 3 lost samples.
    assert [ids_of(b["images"], cfg)[0] for b in batches] == [0, 1, 2, 0]
    assert [int(b["skipped"]) for b in batches] == [0, 0, 0, 3]


def test_bad_header_mid_shard_is_counted_through_the_size_index(six_samples: Path) -> None:
    # Python's tarfile ends the archive silently at an invalid header after the first one: no error to catch, the size
    # index reveals the loss.
    shard = six_samples / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    start = header_of(six_samples, shard.name, 4)
    data[start : start + 100] = b"\x07" * 100
    shard.write_bytes(bytes(data))
    cfg = one_shard_cfg(shard, "data.samples_per_epoch=5")
    with pytest.warns(UserWarning, match=r"read 4 samples of the 6 listed in sizes\.json; 2 counted as skipped"):
        batches = collect(cfg, rank=0, world_size=1)
    assert [ids_of(b["images"], cfg)[0] for b in batches] == [0, 1, 2, 3, 0]
    assert [int(b["skipped"]) for b in batches] == [0, 0, 0, 0, 2]


@pytest.mark.filterwarnings("ignore:skipping sample .* no image entry")  # the partial sample
def test_truncated_shard_without_size_index_counts_the_broken_shard(six_samples: Path, tmp_path: Path) -> None:
    shard = tmp_path / "bare-000000.tar"  # no sizes.json beside it
    data = (six_samples / "shard-000000.tar").read_bytes()
    shard.write_bytes(data[: cut_shard(six_samples, "shard-000000.tar", 3) + 100])
    cfg = one_shard_cfg(shard, "data.samples_per_epoch=4")
    with pytest.warns(UserWarning, match=r"read 4 samples; 1 counted as skipped; tar errors: ReadError: unexpected"):
        batches = collect(cfg, rank=0, world_size=1)
    # How much of the shard was lost is unknown without the index: the broken shard counts 1, the partial sample 1.
    assert [int(b["skipped"]) for b in batches] == [0, 0, 0, 2]


@pytest.mark.filterwarnings("ignore:shard .* read 0 samples")
def test_shards_that_yield_nothing_stop_with_a_data_error(tmp_path: Path) -> None:
    garbage = tmp_path / "junk-000000.tar"
    garbage.write_bytes(b"this is not a tar file" * 40)
    cfg = one_shard_cfg(garbage, "data.samples_per_epoch=4", "data.resampled=true")
    with pytest.raises(DataError, match=r"64 shards in a row gave no sample .*junk-000000\.tar"):
        collect(cfg, rank=0, world_size=1)


@pytest.mark.filterwarnings("ignore:skipping sample", "ignore:skipping corrupt image")
def test_samples_that_never_decode_stop_with_a_data_error(tmp_path: Path) -> None:
    """A readable shard whose samples hold no decodable image: an error, not a loader that spins without a batch."""
    shard = tmp_path / "text-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(5):
            sink.write(
                {"__key__": f"s{i}", "txt": b"no image here", "jpg": b"not a jpeg"}
                if i % 2
                else {"__key__": f"s{i}", "txt": b"no image here"}
            )
    cfg = one_shard_cfg(shard, "data.samples_per_epoch=4", "data.resampled=true")
    with pytest.raises(DataError, match=r"samples in a row could not be decoded .*jpg, png or webp"):
        collect(cfg, rank=0, world_size=1)


# ------------------------------------------------------------------------------------------- resampled workers
@pytest.mark.slow
def test_resampled_two_workers_equal_lengths_distinct_streams(shard_dir: Path) -> None:
    cfg = shard_cfg(shard_dir, "data.num_workers=2")  # resampled (the default)
    in_process = shard_cfg(shard_dir, "data.num_workers=0")
    streams = []
    for rank in (0, 1):
        batches = collect(cfg, rank=rank, world_size=2)
        assert len(batches) == steps_per_epoch(cfg, 2) == 6  # every rank the same number of batches
        # The DataLoader takes batches from its workers round-robin: even batches from worker 0, odd from worker 1.
        workers = [batches[0::2], batches[1::2]]
        assert [len(w) for w in workers] == [3, 3]
        streams += [torch.cat([b["images"] for b in w]) for w in workers]
        # Worker 0's stream is seeded by (seed, epoch, rank, worker 0): the first half of the in-process stream.
        alone = collect(in_process, rank=rank, world_size=2)
        assert torch.equal(streams[-2], torch.cat([b["images"] for b in alone[:3]]))
        assert not torch.equal(streams[-1], torch.cat([b["images"] for b in alone[3:]]))
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(streams[i], streams[j]), (i, j)


# ------------------------------------------------------------------------------------------- transform constants
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def test_transform_constants_of_the_official_pipeline() -> None:
    pretraining = [*sorted((ROOT / "configs").glob("simmim_*.yaml")), ROOT / "configs" / "demo_cpu.yaml"]
    assert len(pretraining) == 7  # the six sizes and the CPU demo
    for recipe in pretraining:
        d = load_config(recipe).data
        assert d.hflip == 0.5 and d.mean == IMAGENET_MEAN and d.std == IMAGENET_STD, recipe.name
        assert d.crop_scale == [0.67, 1.0] and d.crop_ratio == pytest.approx([3 / 4, 4 / 3]), recipe.name
    transform = SimMIMTransform(load_config(None, TINY_MODEL))
    assert transform.hflip == 0.5 and transform.mean == IMAGENET_MEAN and transform.std == IMAGENET_STD
    assert transform.scale == (0.67, 1.0) and transform.ratio == pytest.approx((3 / 4, 4 / 3))
    assert transform.interpolation == TF.InterpolationMode.BILINEAR


def test_transform_output_is_crop_bilinear_resize_flip_normalise() -> None:
    transform = SimMIMTransform(load_config(None, TINY_MODEL))
    # Square, so that crops over the whole aspect range fit at every scale.
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (160, 160, 3), dtype=np.uint8))
    flips = 0
    areas, aspects = [], []
    for seed in range(200):
        tensor, _ = transform(image, np.random.default_rng(seed))
        # The same draws, applied by hand with the official constants.
        rng = np.random.default_rng(seed)
        top, left, h, w = transform.crop_params(rng, 160, 160)
        areas.append(h * w / 160**2)
        aspects.append(w / h)
        flip = rng.random() < 0.5
        crop = TF.resized_crop(image, top, left, h, w, [64, 64], TF.InterpolationMode.BILINEAR, antialias=True)
        expected = TF.normalize(TF.to_tensor(TF.hflip(crop) if flip else crop), IMAGENET_MEAN, IMAGENET_STD)
        assert torch.equal(tensor, expected), seed
        if seed == 0:
            bicubic = TF.resized_crop(image, top, left, h, w, [64, 64], TF.InterpolationMode.BICUBIC, antialias=True)
            bicubic = TF.normalize(TF.to_tensor(TF.hflip(bicubic) if flip else bicubic), IMAGENET_MEAN, IMAGENET_STD)
            assert not torch.allclose(tensor, bicubic, atol=1e-3)  # the comparison tells the interpolations apart
        flips += flip
    assert 80 <= flips <= 120  # p = 0.5: 200 draws, standard deviation ~7
    # The sampled crops span the accepted ranges (a narrower range would not reach these).
    assert min(areas) < 0.70 and max(areas) > 0.97
    assert min(aspects) < 0.8 and max(aspects) > 1.25
