"""What one rank writes during a DeepSpeed save: every file recorded, fsynced, and a failed write caught.

``engine.save_checkpoint`` writes through the engine's checkpoint engine and synchronises the ranks with barriers of
its own. A write that raises on one rank (a full disk) would leave that rank outside those barriers and the others
waiting in them. :class:`WriteRecorder` stands in for the checkpoint engine during one save: each file is written
and fsynced by the rank that wrote it, its name and size are recorded for the ``COMPLETE`` marker, and a failure is
recorded instead of raised, so that every rank finishes the save's collectives and then learns of the failure
together with the others.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..atomic import fsync_file

__all__ = ["WriteFailure", "WriteRecorder", "disk_full", "state_bytes"]

_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: about what saving it writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (torch's writer reports a failed write as a RuntimeError raised from it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class WriteFailure(dict):
    """A failed write, as sent to the other ranks: path, errno, text, free bytes and the bytes it needed."""

    @classmethod
    def of(cls, exc: BaseException, path: str | Path, where: Path, need: int) -> WriteFailure:
        os_error = _os_error(exc)
        text = str(os_error.strerror if os_error is not None and os_error.strerror else exc).strip()
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            free = -1
        return cls(
            path=str(path),
            errno=os_error.errno if os_error is not None else None,
            text=text.splitlines()[0] if text else type(exc).__name__,
            free=free,
            need=need,
        )


def disk_full(failure: dict[str, Any]) -> bool:
    """Whether a failure is a full disk (or quota): by its errno, or by less free space than the write needed."""
    if failure.get("errno") in _DISK_FULL:
        return True
    return 0 <= failure.get("free", -1) < failure.get("need", 0)


class WriteRecorder:
    """Stands in for ``engine.checkpoint_engine`` (and guards the recovery-script copy) during one save.

    Args:
        engine: the DeepSpeed engine.
        tag_dir: the checkpoint folder being written (file names are recorded relative to it).
    """

    def __init__(self, engine: Any, tag_dir: Path) -> None:
        self.engine = engine
        self.inner = engine.checkpoint_engine
        self.tag_dir = Path(tag_dir)
        self.files: dict[str, int] = {}
        self.failure: WriteFailure | None = None

    # ---------------------------------------------------------------------------------- checkpoint-engine protocol
    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        try:
            self.inner.makedirs(path, exist_ok=exist_ok)
        except OSError as exc:
            self.fail(exc, path, 0)

    def save(self, state_dict: Any, path: str) -> None:
        if self.failure is not None:
            return  # this save is lost already; writing more only fills the disk further
        try:
            self._write(state_dict, path)
            self.files[self._relative(path)] = os.path.getsize(path)
        except Exception as exc:
            self.fail(exc, path, state_bytes(state_dict))

    def _write(self, state_dict: Any, path: str) -> None:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        if type(self.inner) is TorchCheckpointEngine:
            # Through a Python file object, so that a full disk surfaces as OSError(ENOSPC) behind torch's error
            # (torch's own file writer reports only a position mismatch), and fsynced by the rank that wrote it.
            with open(path, "wb") as handle:
                torch.save(state_dict, handle, _use_new_zipfile_serialization=self.inner.zipfile_serialization)
                handle.flush()
                os.fsync(handle.fileno())
        else:
            self.inner.save(state_dict, path)
            if os.path.isfile(path):
                fsync_file(path)

    def _relative(self, path: str | Path) -> str:
        return Path(os.path.relpath(path, self.tag_dir)).as_posix()

    def fail(self, exc: BaseException, path: str | Path, need: int) -> None:
        """Record the first failure of this rank (later ones follow from it)."""
        if self.failure is None:
            self.failure = WriteFailure.of(exc, path, self.tag_dir.parent, need)

    # ------------------------------------------------------------------------------------------- installation
    def __enter__(self) -> WriteRecorder:
        self.engine.checkpoint_engine = self
        copy = getattr(type(self.engine), "_copy_recovery_script", None)
        if copy is not None:
            # DeepSpeed copies its zero_to_fp32.py into ZeRO checkpoints on rank 0 with plain file calls.
            def guarded(save_path: str) -> None:
                try:
                    copy(self.engine, save_path)
                except OSError as exc:
                    self.fail(exc, save_path, 0)

            self.engine._copy_recovery_script = guarded
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.checkpoint_engine = self.inner
        self.engine.__dict__.pop("_copy_recovery_script", None)
