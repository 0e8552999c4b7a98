"""Shard writer round trip (real tar files), refusal to overwrite, the CLI, and the sample-data packer."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain import shards
from pretrain.sample_data import sample_image_files, write_sample_shards
from pretrain.shards import ShardError, main, write_shards


def make_folder(root: Path) -> dict[str, tuple[int, int]]:
    """Images in class subfolders and at top level, several formats, plus a corrupt file and a non-image file."""
    rng = np.random.default_rng(0)
    expected = {}
    layout = [
        ("cat/a.jpg", "JPEG"),
        ("cat/b.png", "PNG"),
        ("dog/c.webp", "WEBP"),
        ("dog/deep/d.bmp", "BMP"),
        ("e.jpeg", "JPEG"),
        ("f.tif", "TIFF"),
        ("dog/g.jpg", "JPEG"),
    ]
    for i, (name, fmt) in enumerate(layout):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (20 + i, 30 + i)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
        expected[name] = size
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("ignored")
    return expected


def read_back(out: Path) -> dict[str, tuple[str, tuple[int, int], int | None]]:
    found: dict[str, tuple[str, tuple[int, int], int | None]] = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for parts in members.values():
            rel = json.loads(parts["json"])["path"]
            assert rel not in found, f"{rel} packed twice"
            ext = next(e for e in ("jpg", "png", "webp") if e in parts)
            with Image.open(io.BytesIO(parts[ext])) as image:
                size = image.size
            found[rel] = (ext, size, int(parts["cls"]) if "cls" in parts else None)
    return found


def test_round_trip(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    expected = make_folder(src)
    report = write_shards(src, out, maxcount=3, progress=False)
    assert report["written"] == 7
    assert report["unreadable"] == [str(src / "cat" / "broken.jpg")]
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 1} == report["shards"]
    assert sorted(p.name for p in out.iterdir()) == [*sorted(sizes), "sizes.json"]  # no leftover temporary files
    found = read_back(out)
    assert {k: v[1] for k, v in found.items()} == expected
    # JPEG/PNG/WebP kept as they are, other formats converted to PNG; class = sorted top-level folder index.
    assert found["dog/c.webp"][0] == "webp" and found["dog/deep/d.bmp"][0] == "png" and found["f.tif"][0] == "png"
    assert found["cat/a.jpg"][2] == 0 and found["dog/deep/d.bmp"][2] == 1 and found["e.jpeg"][2] is None
    assert (out / "shard-000000.tar").read_bytes().count((src / "cat" / "a.jpg").read_bytes()) == 1


def test_refuses_non_empty_output_unless_forced(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    make_folder(src)
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        write_shards(src, out, progress=False)
    assert not list(out.glob("shard-*"))
    write_shards(src, out, maxcount=2, force=True, progress=False)  # 4 shards
    assert len(list(out.glob("shard-*.tar"))) == 4
    report = write_shards(src, out, maxcount=5, force=True, progress=False)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert json.loads((out / "sizes.json").read_text()) == report["shards"]
    assert (out / "keep.txt").exists()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    make_folder(src)
    run = subprocess.run(
        [sys.executable, "-m", "pretrain.shards", str(src), str(out), "--maxcount", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "wrote 7 images to 2 shards" in run.stdout
    assert "broken.jpg" in run.stderr
    # The same entry point in-process (what the swinv2-shards console script calls): errors exit 2 with a message.
    assert main([str(src), str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), str(tmp_path / "o2")]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert main([str(src), str(tmp_path / "o3"), "--maxcount", "0"]) == 2
    assert "maxcount=0" in capsys.readouterr().err


def test_sample_data_packs_skimage_photos(tmp_path: Path) -> None:
    photos = sample_image_files()
    report = write_sample_shards(tmp_path / "sample", maxcount=8)
    assert report["written"] == len(photos) >= 10 and not report["unreadable"]
    assert sum(json.loads((tmp_path / "sample" / "sizes.json").read_text()).values()) == len(photos)


def unreadable_folder(root: Path) -> Path:
    """Two files with image extensions that no decoder accepts."""
    root.mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "b.png").write_bytes(b"\x89PNG broken")
    return root


def test_source_without_a_readable_image_is_an_error_that_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = unreadable_folder(tmp_path / "bad")
    with pytest.raises(ShardError, match=r"none of the 2 image files under .*bad.* could be read"):
        write_shards(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert main([str(src), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "none of the 2 image files" in capsys.readouterr().err
    # With --force over a finished shard folder, the old shards and index stay as they were.
    good, out = tmp_path / "good", tmp_path / "kept"
    make_folder(good)
    write_shards(good, out, maxcount=4, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ShardError):
        write_shards(src, out, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_output_path_that_is_a_file_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    make_folder(src)
    a_file = tmp_path / "out.tar"
    a_file.write_bytes(b"x")
    with pytest.raises(ShardError, match=r"output folder .*out\.tar.* is a file"):
        write_shards(src, a_file, progress=False)
    assert main([str(src), str(a_file), "--no-progress"]) == 2
    assert "is a file; give the path of a folder" in capsys.readouterr().err
    assert main([str(src), str(a_file / "sub"), "--no-progress", "--force"]) == 2
    assert "cannot be created" in capsys.readouterr().err
    assert a_file.read_bytes() == b"x"


def test_force_removes_partial_files_of_a_crashed_run(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    make_folder(src)
    out.mkdir()
    (out / "shard-000007.tar.partial").write_bytes(b"half a shard")
    (out / "sizes.json.partial").write_text("{")
    (out / ".partial").mkdir()  # the staging folder of a run killed with SIGKILL
    (out / ".partial" / "shard-000000.tar").write_bytes(b"half a shard")
    with pytest.raises(FileExistsError):  # leftovers alone make the folder non-empty
        write_shards(src, out, progress=False)
    report = write_shards(src, out, maxcount=4, force=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [*sorted(report["shards"]), "sizes.json"]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_interrupted_pack_resumes_to_the_same_output_and_keeps_the_old_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, out, reference = tmp_path / "src", tmp_path / "out", tmp_path / "reference"
    make_folder(src)
    write_shards(src, reference, maxcount=2, progress=False)
    real_encode = shards.encode.encode_file
    calls = []

    def encode_then_interrupt(task: tuple) -> object:
        calls.append(task)
        # Files in order: cat/a.jpg, cat/b.png (shard 0), cat/broken.jpg (unreadable), dog/c.webp, dog/deep/d.bmp
        # (shard 1), dog/g.jpg (shard 2, which completes shard 1), e.jpeg: interrupted while encoding that one.
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_encode(task)

    monkeypatch.setattr(shards.encode, "encode_file", encode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_shards(src, out, maxcount=2, progress=False)
    staged = out / shards.STAGING
    # Complete shards are staged under their final names, the open one (a .tmp) is gone; nothing is installed.
    assert sorted(p.name for p in out.iterdir()) == [shards.STAGING]
    assert sorted(p.name for p in staged.iterdir()) == ["progress.json", "shard-000000.tar", "shard-000001.tar"]
    # Run again with the same arguments: the two complete shards are kept, files 5.. are encoded, same bytes.
    calls.clear()
    monkeypatch.setattr(shards.encode, "encode_file", lambda task: calls.append(task) or real_encode(task))
    report = write_shards(src, out, maxcount=2, progress=False)
    assert report["resumed_shards"] == 2 and [c[0] for c in calls] == [5, 6, 7]
    assert report["unreadable"] == [str(src / "cat" / "broken.jpg")]
    assert shard_bytes(out) == shard_bytes(reference)

    # --force over a finished set: an interruption keeps the old set byte for byte (the staging folder aside);
    # other arguments than the interrupted pack's start over.
    before = shard_bytes(out)
    calls.clear()
    monkeypatch.setattr(shards.encode, "encode_file", encode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_shards(src, out, maxcount=1, force=True, progress=False)
    assert shard_bytes(out) == before and (out / shards.STAGING / "progress.json").is_file()
    monkeypatch.setattr(shards.encode, "encode_file", real_encode)
    report = write_shards(src, out, maxcount=3, force=True, progress=False)
    assert report["resumed_shards"] == 0 and sorted(report["shards"]) == [f"shard-00000{i}.tar" for i in range(3)]
    assert not (out / shards.STAGING).exists()


def test_parallel_pack_equals_serial_and_maxsize_rotates(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_folder(src)
    one = write_shards(src, tmp_path / "one", maxcount=2, progress=False)
    two = write_shards(src, tmp_path / "two", maxcount=2, progress=False, workers=2)
    assert one == two and shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    # --maxsize: a shard is closed before a sample would take it past the limit (tar records of 10 KiB included).
    sized = write_shards(src, tmp_path / "sized", maxcount=100, progress=False, maxsize=20 * 1024)
    assert all(path.stat().st_size <= 20 * 1024 for path in (tmp_path / "sized").glob("shard-*.tar"))
    assert sum(sized["shards"].values()) == 7 and len(sized["shards"]) > 1


def test_max_side_reencodes_large_images_and_reports_the_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(src / "big.png")
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(src / "small.png")
    report = write_shards(src, tmp_path / "out", progress=False, max_side=100, jpeg_quality=80)
    found = read_back(tmp_path / "out")
    assert found["big.png"][:2] == ("jpg", (100, 75)) and found["small.png"][:2] == ("png", (30, 40))
    big = (src / "big.png").stat().st_size
    assert report["reencoded"] == 1 and report["bytes_in"] == big and 0 < report["bytes_out"] < big


def test_sixteen_bit_and_alpha_images_are_packed_as_the_loaders_see_them(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    gray = np.full((20, 24), 40000, dtype=np.uint16)
    Image.fromarray(gray).save(src / "deep.tif")  # 16-bit TIFF: converted to PNG, scaled not clipped
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(src / "clear.tif")  # fully transparent red
    write_shards(src, tmp_path / "out", progress=False)
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        images = {
            m.name: Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
            for m in tar.getmembers()
            if m.name.endswith(".png")
        }
    pixels = sorted(tuple(image.getpixel((0, 0))) for image in images.values())
    # 40000 x 255 / 65535 = 155.6 -> 156 (PIL's own conversion clips it to 255); transparency composited on white.
    assert pixels == [(156, 156, 156), (255, 255, 255)]


def test_labels_write_classes_json_and_refuse_loose_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "src"
    make_folder(src)
    assert main([str(src), str(tmp_path / "bad"), "--labels", "--no-progress"]) == 2
    assert "outside class folders" in capsys.readouterr().err
    for loose in ("e.jpeg", "f.tif", "notes.txt"):
        (src / loose).unlink()
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(["ant", "cat", "dog"]))
    assert main([str(src), str(tmp_path / "out"), "--labels", "--classes", str(classes), "--no-progress"]) == 0
    assert "classes.json" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["ant", "cat", "dog"]
    found = read_back(tmp_path / "out")
    assert found["cat/a.jpg"][2] == 1 and found["dog/deep/d.bmp"][2] == 2
