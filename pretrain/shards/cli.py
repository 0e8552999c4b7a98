"""Pack a folder of images into webdataset tar shards with a size index.

    python -m pretrain.shards SRC OUT_DIR [--workers N] [--maxcount 1000] [--maxsize 1G] [--max-side PX
                                          [--jpeg-quality 90]] [--labels [--classes FILE]] [--force]

Every image under SRC (recursive; a local folder or an fsspec URL such as s3://bucket/images/) is checked by
decoding it; JPEG, PNG and WebP files are stored byte for byte, other formats (BMP, TIFF, GIF...) converted to 8-bit
RGB PNG by the loaders' own conversion (16-bit images scaled, transparency on white). ``--max-side`` re-encodes
images whose longer side exceeds it as JPEG (decoding full-size photos for a 192-pixel crop wastes the loader's
time); the bytes saved are reported. A file that cannot be decoded is reported and left out, never fatal. Each
sample holds the image, ``cls`` (index of its top-level subfolder in sorted order, when images sit in class
subfolders) and ``json`` (its relative path); ``--labels`` requires that layout and writes ``classes.json`` beside the
shards (``--classes`` fixes the list, e.g. the training classes for a validation set).

N worker processes decode and encode; the output is the same for any N. The new shards are written into
``OUT_DIR/.partial/`` and moved into OUT_DIR once all are complete, the index last; an interrupted pack run again
with the same arguments continues from its complete shards. An OUT_DIR that already holds files is refused unless
``--force`` is given; with it, the old shards and index are replaced at that final move. A source without a single
readable image is an error that writes nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..data import IMAGE_EXTENSIONS, SIZE_INDEX
from .writer import write_shards

__all__ = ["main"]

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([KMG]?)i?B?", text.strip(), flags=re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; accepted: bytes, or a number with K, M or G")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain.shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("src_dir", help=f"folder of images, searched recursively ({', '.join(IMAGE_EXTENSIONS)})")
    parser.add_argument("out_dir", help="where shard-NNNNNN.tar and sizes.json are written")
    parser.add_argument("--workers", type=int, default=1, help="decoding processes (default 1)")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--maxsize", type=_size, default=None, help="bytes per shard at most, e.g. 1G (default: none)")
    parser.add_argument("--max-side", type=int, default=None, help="re-encode images with a longer side above PX")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of --max-side (default 90)")
    parser.add_argument("--labels", action="store_true", help="class-folder layout: cls labels and classes.json")
    parser.add_argument("--classes", type=Path, default=None, help="JSON list of class names fixing the label order")
    parser.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``python -m pretrain.shards`` and ``swinv2-shards`` entry point; errors exit 2 with one line."""
    args = _parser().parse_args(argv)
    try:
        classes = tuple(json.loads(args.classes.read_text())) if args.classes is not None else None
        report = write_shards(
            args.src_dir,
            args.out_dir,
            args.maxcount,
            args.force,
            progress=not args.no_progress,
            workers=args.workers,
            maxsize=args.maxsize,
            max_side=args.max_side,
            jpeg_quality=args.jpeg_quality,
            labels=args.labels,
            classes=classes,
        )
    except (ValueError, OSError) as exc:  # ShardError, DataError, FileExistsError, permission or disk errors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_report(report, args.out_dir, args.max_side)
    return 0


def _print_report(report: dict, out_dir: str, max_side: int | None) -> None:
    resumed = f", {report['resumed_shards']} of them from an interrupted pack" if report["resumed_shards"] else ""
    extra = f" and {'classes.json'}" if report["classes"] is not None else ""
    print(
        f"wrote {report['written']} images to {len(report['shards'])} shards in {out_dir}{resumed} "
        f"({SIZE_INDEX}{extra} written)"
    )
    if max_side:
        saved = report["bytes_in"] - report["bytes_out"]
        print(
            f"re-encoded {report['reencoded']} images larger than {max_side} px: {report['bytes_in'] / 1e6:.1f} MB "
            f"-> {report['bytes_out'] / 1e6:.1f} MB ({saved / 1e6:.1f} MB saved)"
        )
    if report["unreadable"]:
        print(f"{len(report['unreadable'])} unreadable files skipped:", file=sys.stderr)
        for path in report["unreadable"]:
            print(f"  {path}", file=sys.stderr)
