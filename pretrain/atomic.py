"""Atomic, durable file writes: the one implementation every writer of the project uses.

A file is written under a temporary name in the same folder, flushed and fsynced, then renamed over the target, and
the folder is fsynced so that the rename itself survives a crash of the node. A reader (or a restart after a crash)
therefore sees either the old content or the whole new content, never a torn file. This is the order torch's
distributed checkpoint writer uses too: data first, then the name that vouches for it.

:func:`atomic_output` does the same for outputs that a tool writes itself (a weights file, a model directory): the
body writes into a temporary path, whose files are fsynced before it takes the output's name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_output",
    "current_umask",
    "fsync_dir",
    "fsync_file",
    "fsync_tree",
    "replace_path",
    "write_bytes_atomic",
    "write_text_atomic",
]


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make the entries of folder ``path`` (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> int:
    """Fsync every file and folder under ``root`` (``root`` included); returns the number of files."""
    files = 0
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                fsync_file(path)
                files += 1
        fsync_dir(folder)
    return files


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see the module docstring)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically and durably."""
    write_bytes_atomic(path, text.encode("utf-8"))


def current_umask() -> int:
    """The process's umask (read from /proc on Linux; elsewhere set and restored, which is not thread-safe)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(output: str | Path, *, replace: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``output``; it takes ``output``'s place only when the body succeeds.

    Before the rename every file written under the temporary path is fsynced, and after it the parent folder, so a
    crash leaves either the old output or the whole new one. Nothing of an unsuccessful body stays behind.

    Args:
        output: final file or directory.
        replace: replace an existing output; without it an existing output raises FileExistsError before any work.
        directory: the temporary path is a fresh directory (model directories, universal checkpoints), created with
            the permissions of a plain ``mkdir`` (the umask applies), not the private ones of a temporary folder.
    """
    output = Path(output)
    if (output.exists() or output.is_symlink()) and not replace:
        raise FileExistsError(f"{output} exists")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    target = tmp if directory else tmp / output.name
    try:
        if directory:
            os.chmod(tmp, 0o777 & ~current_umask())
        yield target
        if target.is_dir():
            fsync_tree(target)
        elif target.exists():
            fsync_file(target)
        replace_path(target, output)
        fsync_dir(output.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_path(new: Path, output: Path) -> None:
    """Put ``new`` at ``output``, never leaving a moment where a crash loses both.

    A file over a file is one atomic os.replace. A directory (or anything over one) cannot be swapped in one step:
    the old output is renamed aside first, the new one renamed into place, and only then is the old one deleted. A
    crash in between leaves the old output whole under ``.<name>.*.old/``.
    """
    if not (output.exists() or output.is_symlink()) or (not new.is_dir() and not output.is_dir()):
        os.replace(new, output)
        return
    aside_dir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
    aside = aside_dir / output.name
    os.replace(output, aside)
    try:
        os.replace(new, output)
    except BaseException:
        os.replace(aside, output)  # put the old output back
        shutil.rmtree(aside_dir, ignore_errors=True)
        raise
    shutil.rmtree(aside_dir, ignore_errors=True)  # removes a symlink inside, never what it points to
