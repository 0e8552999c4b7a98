"""Pack a folder of images into webdataset tar shards with a size index.

    python -m pretrain.shards SRC_DIR OUT_DIR [--maxcount 1000] [--force]

Every image under SRC_DIR (recursive) is checked by decoding it; JPEG, PNG and WebP files are stored byte for byte,
other formats (BMP, TIFF, GIF...) are converted to PNG. A file that cannot be decoded is reported and left out, never
fatal. Each sample holds the image, ``cls`` (index of its top-level subfolder in sorted order, when images sit in
class subfolders) and ``json`` (its relative path). The new shards and their ``sizes.json`` (shard file name ->
sample count) are written into ``OUT_DIR/.partial/`` and moved into OUT_DIR only once all are complete, the index
last. An OUT_DIR that already holds files is refused unless ``--force`` is given; with it, the old shards and index
are replaced at that final move, so an interrupted or failed run leaves the old set as it was. A source without a
single readable image is an error that writes nothing; an interrupted run leaves nothing of its own behind.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from .data import IMAGE_EXTENSIONS, SIZE_INDEX, list_images

__all__ = ["ShardError", "ShardReport", "main", "write_shards"]

STAGING = ".partial"  # OUT_DIR's subfolder where a new shard set is written before it replaces the old one
_STORED_AS_IS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


class ShardReport(dict):
    """Result of :func:`write_shards`: {"shards": {name: count}, "written": n, "unreadable": [paths]}."""


class ShardError(ValueError):
    """The shards cannot be written (output path is a file, nothing readable in the source...); nothing was written."""


def _check_out_dir(out: Path, force: bool) -> None:
    """Refuse an output path that cannot become an empty shard folder, before any image is read."""
    if out.exists() and not out.is_dir():
        raise ShardError(f"output folder {str(out)!r} is a file; give the path of a folder (created when missing)")
    # The first existing ancestor must be a folder too, or creating ``out`` fails with NotADirectoryError later.
    ancestor = next((parent for parent in out.absolute().parents if parent.exists()), None)
    if not out.exists() and ancestor is not None and not ancestor.is_dir():
        raise ShardError(f"output folder {str(out)!r} cannot be created: {str(ancestor)!r} is a file")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"output folder {str(out)!r} is not empty; pass --force to replace its shards")


def _install(stage: Path, out: Path, shard_names: list[str]) -> None:
    """Move the complete staged shard set into ``out``, replacing a previous one.

    The old index goes first and the new one comes last: a crash during the moves leaves shards without an index,
    which the loader refuses, never an index that lists shards of another set. ``*.partial`` files are leftovers of
    interrupted runs of earlier versions of this tool.
    """
    for old in [
        out / SIZE_INDEX,
        *out.glob("shard-*.tar"),
        *out.glob("shard-*.tar.partial"),
        out / (SIZE_INDEX + ".partial"),
    ]:
        old.unlink(missing_ok=True)
    for name in shard_names:
        os.replace(stage / name, out / name)
    os.replace(stage / SIZE_INDEX, out / SIZE_INDEX)
    stage.rmdir()


def _encode(path: Path) -> tuple[str, bytes]:
    """(extension key, bytes) of a decodable image; raises on anything PIL cannot fully decode."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        key = _STORED_AS_IS.get(path.suffix.lower())
        if key is not None and (image.format or "").lower() in ("jpeg", "png", "webp"):
            return key, data
        buffer = io.BytesIO()
        image.convert("RGBA" if "A" in image.getbands() else "RGB").save(buffer, format="PNG")
        return "png", buffer.getvalue()


def write_shards(
    src_dir: str | Path, out_dir: str | Path, maxcount: int = 1000, force: bool = False, progress: bool = True
) -> ShardReport:
    """Write ``out_dir/shard-000000.tar ...`` and ``out_dir/sizes.json`` from the images under ``src_dir``.

    Args:
        src_dir: folder searched recursively for images.
        out_dir: destination folder (created); must be empty unless ``force``.
        maxcount: samples per shard.
        force: allow writing into a non-empty ``out_dir``: its old shards and index are replaced once the new set is
            complete; other files stay.
        progress: show a progress bar.

    Raises:
        DataError: ``src_dir`` is not a folder or holds no image files.
        FileExistsError: ``out_dir`` is not empty and ``force`` is off.
        ShardError: ``out_dir`` is (or lies under) a file, or no image could be read; nothing was written.
    """
    if maxcount < 1:
        raise ValueError(f"maxcount={maxcount}; accepted: a positive number of samples per shard")
    src, out = Path(src_dir), Path(out_dir)
    files = list_images(src)
    _check_out_dir(out, force)
    classes = sorted({p.relative_to(src).parts[0] for p in files if len(p.relative_to(src).parts) > 1})
    class_index = {name: i for i, name in enumerate(classes)}
    report = ShardReport(shards={}, written=0, unreadable=[])
    stage = out / STAGING
    created_out = not out.exists()
    writer: wds.TarWriter | None = None
    stream = None
    shard_name = ""

    def close_shard() -> None:
        nonlocal writer, stream
        if writer is not None:
            writer.close()
            stream.close()
            writer = stream = None

    try:
        for path in tqdm(files, desc="packing", unit="img", disable=not progress):
            try:
                key, data = _encode(path)
            except Exception as exc:
                report["unreadable"].append(str(path))
                tqdm.write(f"unreadable, skipped: {path} ({exc})", file=sys.stderr)
                continue
            if writer is None and not report["shards"]:
                # First readable image: only now is anything created, so a source with nothing readable leaves
                # OUT_DIR as it was. A staging folder left by a killed run is replaced.
                shutil.rmtree(stage, ignore_errors=True)
                stage.mkdir(parents=True)
            if writer is None or report["shards"][shard_name] >= maxcount:
                close_shard()
                shard_name = f"shard-{len(report['shards']):06d}.tar"
                stream = open(stage / shard_name, "wb")  # noqa: SIM115 - closed in close_shard
                writer = wds.TarWriter(stream)
                report["shards"][shard_name] = 0
            relative = path.relative_to(src)
            sample = {"__key__": f"{report['written']:09d}", key: data, "json": {"path": str(relative)}}
            if len(relative.parts) > 1:
                sample["cls"] = class_index[relative.parts[0]]
            writer.write(sample)
            report["shards"][shard_name] += 1
            report["written"] += 1
        close_shard()
        if report["written"]:
            (stage / SIZE_INDEX).write_text(json.dumps(report["shards"], indent=1, sort_keys=True))
            _install(stage, out, list(report["shards"]))
    except BaseException:
        # Interrupted (Ctrl-C, disk full...): nothing of this run stays; a previous shard set is untouched.
        if writer is not None:
            # Flush tarfile's buffer into the file now: left to garbage collection it would write to a closed file.
            with contextlib.suppress(Exception):
                writer.close()
        if stream is not None:
            stream.close()
        shutil.rmtree(stage, ignore_errors=True)
        if created_out:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    if not report["written"]:
        raise ShardError(
            f"none of the {len(files)} image files under {str(src)!r} could be read (e.g. {report['unreadable'][0]}); "
            f"nothing was written"
        )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("src_dir", help=f"folder of images, searched recursively ({', '.join(IMAGE_EXTENSIONS)})")
    parser.add_argument("out_dir", help="where shard-NNNNNN.tar and sizes.json are written")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        report = write_shards(args.src_dir, args.out_dir, args.maxcount, args.force, progress=not args.no_progress)
    except (ValueError, OSError) as exc:  # ShardError, DataError, FileExistsError, permission or disk errors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_shards = len(report["shards"])
    print(f"wrote {report['written']} images to {n_shards} shards in {args.out_dir} ({SIZE_INDEX} written)")
    if report["unreadable"]:
        print(f"{len(report['unreadable'])} unreadable files skipped:", file=sys.stderr)
        for path in report["unreadable"]:
            print(f"  {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
