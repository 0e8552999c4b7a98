"""Packing a folder of images into webdataset tar shards with a size index: in parallel, deterministic, resumable.

Source files are listed and sorted; worker processes decode and (re-)encode them (:mod:`pretrain.shards.encode`) and
this process writes the results in source order, so the output is byte for byte the same for any number of workers
(tar entries carry a fixed modification time). A new shard set is written into ``OUT_DIR/.partial/``: each shard as
``shard-NNNNNN.tar.tmp``, fsynced and renamed when complete, then ``progress.json`` records it. An interrupted pack
run again with the same arguments on the same source continues after the last complete shard; other arguments or a
changed source start over. When every shard is complete, the set moves into OUT_DIR (the index last), replacing an
old set only then.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing.pool
import os
import shutil
import signal
import sys
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from ..atomic import fsync_dir, fsync_file, write_text_atomic
from ..data import SIZE_INDEX
from ..data.images import IMAGE_EXTENSIONS
from ..data.labelled import CLASS_INDEX
from ..data.loader import worker_context
from ..data.source import list_relative
from ..data.urls import filesystem, url_kind
from . import encode
from .encode import Encoded, EncodeOptions

__all__ = ["STAGING", "PackOptions", "ShardError", "ShardReport", "write_shards"]

STAGING = ".partial"  # OUT_DIR's subfolder where a new shard set is written before it replaces the old one
PROGRESS = "progress.json"
_FORMAT = 2  # of progress.json; a change starts packs over
_TAR_MTIME = 0  # fixed integer entry time: the same bytes for the same source, and no PAX header per entry


class ShardReport(dict):
    """Result of :func:`write_shards`: {"shards": {name: count}, "written": n, "unreadable": [paths], "classes":
    [names] or None, "reencoded": n, "bytes_in"/"bytes_out": of the re-encoded images, "resumed_shards": n}."""


class ShardError(ValueError):
    """The shards cannot be written (bad option, output path is a file, nothing readable...); nothing was written."""


@dataclass(frozen=True)
class PackOptions:
    """Options of :func:`write_shards` (see the CLI's help for each)."""

    maxcount: int = 1000
    maxsize: int | None = None
    workers: int = 1
    max_side: int | None = None
    jpeg_quality: int = 90
    labels: bool = False
    classes: tuple[str, ...] | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        for ok, message in (
            (self.maxcount >= 1, f"maxcount={self.maxcount}; accepted: a positive number of samples per shard"),
            (
                self.maxsize is None or self.maxsize >= tarfile.RECORDSIZE,
                f"maxsize={self.maxsize}; accepted: at least {tarfile.RECORDSIZE} bytes (one tar record)",
            ),
            (self.workers >= 1, f"workers={self.workers}; accepted: 1 or more processes"),
            (self.max_side is None or self.max_side >= 16, f"max_side={self.max_side}; accepted: 16 pixels or more"),
            (1 <= self.jpeg_quality <= 100, f"jpeg_quality={self.jpeg_quality}; accepted: 1 to 100"),
            (self.classes is None or self.labels, "classes needs labels=True (--classes needs --labels)"),
        ):
            if not ok:
                raise ShardError(message)


# ----------------------------------------------------------------------------------------------------- source
@dataclass
class _Source:
    relative: list[str]
    locations: list[str]
    labels: list[int | None]
    classes: list[str] | None
    stamp: list[Any]


def _list_remote(src: str, storage_options: dict[str, Any]) -> tuple[list[str], list[str], list[Any]]:
    fs = filesystem(src, storage_options)
    root = fs._strip_protocol(src).rstrip("/")
    found = fs.find(root, detail=True)
    entries = sorted(
        (path[len(root) :].lstrip("/"), path, info.get("size"))
        for path, info in found.items()
        if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS
    )
    entries.sort(key=lambda e: e[0].replace("/", "\0"))
    if not entries:
        raise ShardError(f"source {src!r} holds no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return [e[0] for e in entries], [fs.unstrip_protocol(e[1]) for e in entries], [e[2] for e in entries]


def _list_source(src: str, options: PackOptions) -> _Source:
    if url_kind(src) == "local":
        relative = [r.replace(os.sep, "/") for r in list_relative(src, "source folder")]
        locations = [os.path.join(src, r) for r in relative]
        stamp: list[Any] = [(s.st_size, s.st_mtime_ns) for s in map(os.stat, locations)]
    else:
        relative, locations, stamp = _list_remote(src, options.storage_options)
    tops = [r.split("/", 1)[0] if "/" in r else None for r in relative]
    if options.labels:
        outside = [r for r, top in zip(relative, tops, strict=True) if top is None]
        if outside:
            raise ShardError(f"--labels: {len(outside)} images lie outside class folders (e.g. {outside[0]})")
        classes = list(options.classes) if options.classes else sorted(set(tops))  # type: ignore[arg-type]
    else:
        classes = sorted({t for t in tops if t is not None})
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({t for t in tops if t is not None and t not in index})
    if unknown:
        raise ShardError(f"--classes: the class folder {unknown[0]!r} is not in the given class list")
    labels = [index[t] if t is not None else None for t in tops]
    return _Source(relative, locations, labels, classes if options.labels else None, stamp)


def _fingerprint(src: _Source, options: PackOptions) -> str:
    described = {
        "format": _FORMAT,
        "maxcount": options.maxcount,
        "maxsize": options.maxsize,
        "max_side": options.max_side,
        "jpeg_quality": options.jpeg_quality if options.max_side else None,
        "labels": options.labels,
        "classes": src.classes,
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for relative, stamp in zip(src.relative, src.stamp, strict=True):
        digest.update(f"{relative}\0{stamp}\n".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------ output
def _check_out_dir(out: Path, force: bool) -> None:
    """Refuse an output path that cannot become a shard folder, before any image is read."""
    if out.exists() and not out.is_dir():
        raise ShardError(f"output folder {str(out)!r} is a file; give the path of a folder (created when missing)")
    # The first existing ancestor must be a folder too, or creating ``out`` fails with NotADirectoryError later.
    ancestor = next((parent for parent in out.absolute().parents if parent.exists()), None)
    if not out.exists() and ancestor is not None and not ancestor.is_dir():
        raise ShardError(f"output folder {str(out)!r} cannot be created: {str(ancestor)!r} is a file")
    # The staging folder of an interrupted pack does not count: running the same pack again continues it.
    if out.is_dir() and any(p.name != STAGING for p in out.iterdir()) and not force:
        raise FileExistsError(f"output folder {str(out)!r} is not empty; pass --force to replace its shards")


def _install(stage: Path, out: Path, shard_names: list[str], labelled: bool) -> None:
    """Move the complete staged shard set into ``out``, replacing a previous one.

    The old index goes first and the new one comes last: a crash during the moves leaves shards without an index,
    which the loader refuses, never an index that lists shards of another set. ``*.partial`` files are leftovers of
    interrupted runs of earlier versions of this tool.
    """
    for old in [
        out / SIZE_INDEX,
        out / CLASS_INDEX,
        *out.glob("shard-*.tar"),
        *out.glob("shard-*.tar.partial"),
        out / (SIZE_INDEX + ".partial"),
    ]:
        old.unlink(missing_ok=True)
    for name in shard_names:
        os.replace(stage / name, out / name)
    if labelled:
        os.replace(stage / CLASS_INDEX, out / CLASS_INDEX)
    os.replace(stage / SIZE_INDEX, out / SIZE_INDEX)
    fsync_dir(out)
    shutil.rmtree(stage)


class _ShardSink:
    """The shard being written: rotates by ``maxcount`` and ``maxsize``; a complete shard is fsynced, renamed and
    recorded in ``progress.json`` with the index of the first source file after it."""

    def __init__(self, stage: Path, options: PackOptions, state: dict[str, Any]) -> None:
        self.stage, self.options, self.state = stage, options, state
        self.stream: Any = None
        self.writer: wds.TarWriter | None = None
        self.count = self.size = 0
        self.name = ""

    def _open(self) -> None:
        self.name = f"shard-{len(self.state['shards']):06d}.tar"
        self.stream = open(self.stage / (self.name + ".tmp"), "wb")  # noqa: SIM115 - closed in complete()/abort()
        self.writer = wds.TarWriter(self.stream, mtime=_TAR_MTIME)
        self.count = self.size = 0

    def add(self, sample: dict[str, Any]) -> None:
        size = _sample_size(sample)
        if self.writer is not None:
            full = self.count >= self.options.maxcount
            if self.options.maxsize is not None:
                # Closing adds two zero blocks and pads the archive to tarfile's record size.
                closed = -(-(self.size + size + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
                full = full or closed > self.options.maxsize
            if full:
                self.complete(self.state["next_file"])
        if self.writer is None:
            self._open()
        self.writer.write(sample)  # type: ignore[union-attr]
        self.count += 1
        self.size += size

    def complete(self, next_file: int) -> None:
        """Finish the open shard: every source file before ``next_file`` is in this or an earlier shard."""
        if self.writer is None:
            return
        self.writer.close()
        self.stream.close()
        fsync_file(self.stage / (self.name + ".tmp"))
        os.replace(self.stage / (self.name + ".tmp"), self.stage / self.name)
        fsync_dir(self.stage)
        self.state["shards"][self.name] = self.count
        self.state["done_file"] = next_file
        self.state["done_written"] = self.state["written"]
        write_text_atomic(self.stage / PROGRESS, json.dumps(self.state, indent=1))
        self.writer = self.stream = None

    def abort(self) -> None:
        if self.writer is not None:
            # Flush tarfile's buffer into the file now: left to garbage collection it would write to a closed file.
            with contextlib.suppress(Exception):
                self.writer.close()
            self.stream.close()
            (self.stage / (self.name + ".tmp")).unlink(missing_ok=True)
            self.writer = self.stream = None


def _resume_state(stage: Path, fingerprint: str) -> dict[str, Any] | None:
    """The progress of an interrupted pack with the same fingerprint whose complete shards are all there."""
    try:
        state = json.loads((stage / PROGRESS).read_text())
        if state.get("fingerprint") == fingerprint and all((stage / n).is_file() for n in state["shards"]):
            return state
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _sample_size(sample: dict[str, Any]) -> int:
    """Bytes a sample adds to a tar: a 512-byte header per entry plus its data padded to 512 (as TarWriter encodes
    it: bytes as they are, dicts as JSON, numbers as text)."""
    total = 0
    for key, value in sample.items():
        if key.startswith("__"):
            continue
        data = value if isinstance(value, bytes) else (json.dumps(value) if isinstance(value, dict) else str(value))
        total += 512 + -(-len(data.encode() if isinstance(data, str) else data) // 512) * 512
    return total


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides what Ctrl-C means


def _results(src: _Source, start: int, options: PackOptions) -> Iterator[Encoded]:
    eo = EncodeOptions(options.max_side, options.jpeg_quality, dict(options.storage_options))
    tasks: Iterable[tuple[int, str, EncodeOptions]] = (
        (i, src.locations[i], eo) for i in range(start, len(src.locations))
    )
    if options.workers == 1:
        yield from (encode.encode_file(task) for task in tasks)
        return
    context = worker_context("forkserver")
    with multiprocessing.pool.Pool(options.workers, initializer=_ignore_sigint, context=context) as pool:
        yield from pool.imap(encode.encode_file, tasks, chunksize=4)


def _pack(source: _Source, options: PackOptions, state: dict[str, Any], sink: _ShardSink, progress: bool) -> None:
    """Encode (in workers) and write every source file from ``state["done_file"]`` on, in source order."""
    start = state["done_file"]
    with tqdm(total=len(source.locations), initial=start, desc="packing", unit="img", disable=not progress) as bar:
        for result in _results(source, start, options):
            i = result.index
            state["next_file"] = i
            if result.error:
                state["unreadable"].append(source.relative[i])
                tqdm.write(f"unreadable, skipped: {source.locations[i]} ({result.error})", file=sys.stderr)
            else:
                sink.stage.mkdir(parents=True, exist_ok=True)  # created with the first readable image only
                sample: dict[str, Any] = {
                    "__key__": f"{state['written']:09d}",
                    result.key: result.data,
                    "json": {"path": source.relative[i]},
                }
                if source.labels[i] is not None:
                    sample["cls"] = source.labels[i]
                sink.add(sample)
                state["written"] += 1
                if result.reencoded:
                    state["reencoded"] += 1
                    state["bytes_in"] += result.bytes_in
                    state["bytes_out"] += len(result.data)
            state["next_file"] = i + 1
            bar.update(1)
    if state["written"]:
        sink.complete(len(source.locations))


def write_shards(
    src_dir: str | Path,
    out_dir: str | Path,
    maxcount: int = 1000,
    force: bool = False,
    progress: bool = True,
    **options: Any,
) -> ShardReport:
    """Write ``out_dir/shard-000000.tar ...`` and ``out_dir/sizes.json`` from the images under ``src_dir``.

    Args:
        src_dir: folder searched recursively for images, or an fsspec URL of one (``s3://bucket/images/``).
        out_dir: destination folder (created); must be empty (an interrupted pack's staging folder aside) unless
            ``force``: then its old shards and index are replaced once the new set is complete; other files stay.
        maxcount: samples per shard.
        progress: show a progress bar over all workers.
        **options: the other fields of :class:`PackOptions` (workers, maxsize, max_side, jpeg_quality, labels,
            classes, storage_options).

    Raises:
        DataError: ``src_dir`` is not a folder or holds no image files.
        FileExistsError: ``out_dir`` is not empty and ``force`` is off.
        ShardError: a bad option, ``out_dir`` is (or lies under) a file, or no image could be read (nothing written).
    """
    pack = PackOptions(maxcount=maxcount, **options)
    pack.check()
    out = Path(out_dir)
    source = _list_source(str(src_dir), pack)
    _check_out_dir(out, force)
    stage, created_out = out / STAGING, not out.exists()
    fingerprint = _fingerprint(source, pack)
    state = _resume_state(stage, fingerprint)
    resumed = len(state["shards"]) if state else 0
    if state is None:
        shutil.rmtree(stage, ignore_errors=True)  # another pack's leftovers (other arguments or source)
        state = {"format": _FORMAT, "fingerprint": fingerprint, "shards": {}, "done_file": 0, "done_written": 0}
        state.update(unreadable=[], reencoded=0, bytes_in=0, bytes_out=0)
    state.update(written=state["done_written"], next_file=state["done_file"])
    sink = _ShardSink(stage, pack, state)
    try:
        _pack(source, pack, state, sink, progress)
    except BaseException:
        # Interrupted (Ctrl-C, disk full...): complete shards stay staged for a rerun; an old set is untouched.
        sink.abort()
        if not state["shards"]:
            shutil.rmtree(stage, ignore_errors=True)
            if created_out:
                with contextlib.suppress(OSError):
                    out.rmdir()
        raise
    if not state["written"]:
        raise ShardError(
            f"none of the {len(source.relative)} image files under {str(src_dir)!r} could be read (e.g. "
            f"{state['unreadable'][0]}); nothing was written"
        )
    write_text_atomic(stage / SIZE_INDEX, json.dumps(state["shards"], indent=1, sort_keys=True))
    if source.classes is not None:
        write_text_atomic(stage / CLASS_INDEX, json.dumps(source.classes, indent=1))
    _install(stage, out, list(state["shards"]), source.classes is not None)
    return ShardReport(
        shards=dict(state["shards"]),
        written=state["written"],
        unreadable=[str(Path(str(src_dir)) / r) for r in state["unreadable"]],
        classes=source.classes,
        reencoded=state["reencoded"],
        bytes_in=state["bytes_in"],
        bytes_out=state["bytes_out"],
        resumed_shards=resumed,
    )
