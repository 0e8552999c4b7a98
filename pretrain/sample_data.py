"""Sample data for the demo and the tests: the photos that ship inside scikit-image, packed into shards.

    python -m pretrain.sample_data OUT_DIR [--maxcount 8] [--force]

Nothing is downloaded: the images are read from the installed ``skimage/data`` folder. Photos smaller than
``--min-side`` pixels are left out; grayscale ones are converted to RGB by the pipeline at load time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image

from .shards import write_shards

__all__ = ["main", "sample_image_files", "write_sample_shards"]


def sample_image_files(min_side: int = 128) -> list[Path]:
    """The photos in the installed skimage/data folder whose shorter side is at least ``min_side``."""
    try:
        import skimage
    except ImportError:
        raise SystemExit(
            "the sample photos come with scikit-image, which is not installed: `pip install -e .[demo]` "
            "(scripts/demo.sh installs it)"
        ) from None

    data_dir = Path(skimage.__file__).parent / "data"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.sample_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="where the shards and sizes.json are written")
    parser.add_argument("--maxcount", type=int, default=8, help="samples per shard (default 8)")
    parser.add_argument("--min-side", type=int, default=128, help="leave out photos smaller than this (pixels)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    args = parser.parse_args(argv)
    try:
        report = write_sample_shards(args.out_dir, args.maxcount, args.force, args.min_side)
    except (ValueError, OSError) as exc:  # shard-writer refusals, missing sample photos, filesystem errors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {report['written']} sample photos to {len(report['shards'])} shards in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
