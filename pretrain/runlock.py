"""The run lock of an output directory: one run at a time writes its checkpoints and metrics there.

Two runs started on one ``training.output_dir`` (a job submitted twice, a requeue racing a manual restart) would log
every step twice and overwrite each other's checkpoints. Rank 0 takes ``<output_dir>/run.lock`` on start: a JSON
record of the holder (host, pid, SLURM job id and restart count, start time), created atomically with
``O_CREAT | O_EXCL`` so that of two runs racing for it exactly one succeeds. A second run gets :class:`RunLockError`
naming the holder. The holder refreshes the file's modification time every few minutes from a background thread.

A lock is stale, and is taken over with a log line, when its holder cannot be running any more: on this host, its
process is gone (or the pid now belongs to another process, or the machine rebooted since); on another host, it is a
previous run of the same SLURM job (requeued jobs keep their id and count their restarts), or it was not refreshed
for longer than ``checkpoint.lock_stale_hours``. Taking over renames the stale file away first and checks that what
was renamed is what was judged stale, so two runs taking over at once still end with one holder.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .atomic import fsync_dir

__all__ = ["LOCK_NAME", "LockHolder", "RunLock", "RunLockError", "acquire_run_lock"]

LOCK_NAME = "run.lock"
# A lock file still empty or unparsable after this long was left by a creator that died mid-write.
_CREATING_S = 60.0


class RunLockError(RuntimeError):
    """The output directory is in use by another run (the trainer exits with code 2, like for other start-up errors
    the user must fix). Kept free of torch imports, so that checking a lock costs nothing."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux); tells a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@dataclass
class LockHolder:
    """Who holds a run lock (the lock file's JSON record)."""

    host: str
    pid: int
    job_id: str | None
    restart_count: int
    started: str
    boot_id: str | None = None
    process_start: int | None = None
    token: str = ""

    @classmethod
    def this_process(cls) -> LockHolder:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            job_id=os.environ.get("SLURM_JOB_ID"),
            restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            boot_id=_boot_id(),
            process_start=_process_start(os.getpid()),
            token=uuid.uuid4().hex,
        )

    @classmethod
    def from_json(cls, data: bytes) -> LockHolder | None:
        try:
            record = json.loads(data)
            return cls(**{k: record[k] for k in cls.__dataclass_fields__ if k in record})
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self) -> str:
        job = f", SLURM job {self.job_id} (restart {self.restart_count})" if self.job_id else ""
        return f"host {self.host}, pid {self.pid}{job}, started {self.started}"


def _age(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def _stale_reason(holder: LockHolder | None, age_s: float, stale_after_s: float, me: LockHolder) -> str | None:
    """Why the lock's holder cannot be running any more, or None when it may be."""
    if holder is None:
        return f"the lock file is empty or garbled ({_age(age_s)} old)" if age_s > _CREATING_S else None
    if holder.host == me.host:
        if holder.pid == me.pid:
            return None  # this very process: a second acquire is an error, not a takeover
        if holder.boot_id and me.boot_id and holder.boot_id != me.boot_id:
            return "this machine has rebooted since it was taken"
        if not _alive(holder.pid):
            return f"its process {holder.pid} is gone"
        start = _process_start(holder.pid)
        if holder.process_start is not None and start is not None and start != holder.process_start:
            return f"pid {holder.pid} now belongs to another process"
        return None
    if holder.job_id and holder.job_id == me.job_id and holder.restart_count < me.restart_count:
        return f"it was taken by an earlier run of this SLURM job {me.job_id} (restart {holder.restart_count})"
    if age_s > stale_after_s:
        return f"it was not refreshed for {_age(age_s)} (checkpoint.lock_stale_hours={stale_after_s / 3600:g})"
    return None


class RunLock:
    """A held run lock; :meth:`release` it when the run ends (also done at interpreter exit).

    Args:
        path: the lock file.
        holder: this process's record in it.
        heartbeat_s: how often the file's modification time is refreshed.
    """

    def __init__(self, path: Path, holder: LockHolder, heartbeat_s: float) -> None:
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), name="run-lock", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            # Only while it is ours: a run that took it over (judging this one stale) must not be kept alive by it.
            with contextlib.suppress(OSError):  # a filesystem hiccup: the next beat tries again
                if self.held():
                    self.refresh()

    def refresh(self) -> None:
        """Mark the lock as alive now (done by the background thread; callable at any time)."""
        os.utime(self.path)

    def held(self) -> bool:
        """Whether the lock file is still this process's (a run that judged it stale may have taken it over)."""
        try:
            current = LockHolder.from_json(self.path.read_bytes())
        except OSError:
            return False
        return current is not None and current.token == self.holder.token

    def release(self) -> None:
        """Stop refreshing and remove the lock file if it is still ours; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.held():
            self.path.unlink(missing_ok=True)
            fsync_dir(self.path.parent)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _create(path: Path, holder: LockHolder) -> None:
    """Create the lock file with ``holder``'s record; FileExistsError when it exists."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, json.dumps(asdict(holder), indent=1).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def _read(path: Path) -> tuple[bytes, float] | None:
    """(the lock file's bytes, seconds since it was last refreshed), or None when it vanished meanwhile."""
    try:
        data = path.read_bytes()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    return data, max(0.0, age)


def _take_over(path: Path, seen: bytes) -> bool:
    """Remove the stale lock file ``path`` whose content was ``seen``; False when another run replaced it first."""
    aside = path.with_name(f".{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # another run removed it: race for the creation
    if aside.read_bytes() == seen:
        aside.unlink()
        return True
    with contextlib.suppress(FileExistsError):  # a fresh lock was renamed by mistake: put it back unless a newer one is
        os.link(aside, path)  # there already
    aside.unlink()
    return False


def acquire_run_lock(
    run_dir: str | Path,
    stale_after_s: float,
    say: Callable[[str], None] = print,
    *,
    heartbeat_s: float | None = None,
) -> RunLock:
    """Take the run lock of ``run_dir`` (created when missing) for this process; rank 0 of a run calls it.

    Args:
        run_dir: the run's output directory.
        stale_after_s: a lock of another host not refreshed for this long is stale
            (``checkpoint.lock_stale_hours * 3600``).
        say: where the takeover of a stale lock is reported (the console and train.log).
        heartbeat_s: refresh period of the held lock (default: a quarter of ``stale_after_s``, at most 5 minutes).

    Returns:
        The held lock; call :meth:`RunLock.release` when the run ends.

    Raises:
        RunLockError: another run holds the lock, naming it and the lock file.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    me = LockHolder.this_process()
    for _ in range(5):
        try:
            _create(path, me)
        except FileExistsError:
            pass
        else:
            return RunLock(path, me, heartbeat_s or max(0.05, min(300.0, stale_after_s / 4)))
        found = _read(path)
        if found is None:
            continue  # released meanwhile
        data, age = found
        holder = LockHolder.from_json(data)
        reason = _stale_reason(holder, age, stale_after_s, me)
        if reason is None:
            raise _held_error(run_dir, path, holder, age, stale_after_s)
        if _take_over(path, data):
            who = holder.describe() if holder is not None else "an unknown holder"
            say(f"run lock {path}: took over the stale lock of {who}: {reason}")
    raise RunLockError(f"could not take the run lock {path}: other runs keep taking it; is {run_dir} shared by them?")


def _held_error(run_dir: Path, path: Path, holder: LockHolder | None, age: float, stale_after_s: float) -> RunLockError:
    who = holder.describe() if holder is not None else "a run that is creating it right now"
    return RunLockError(
        f"training.output_dir={str(run_dir)!r} is in use by another run: {who} (lock file {path}, refreshed "
        f"{_age(age)} ago). Two runs in one directory would overwrite each other's checkpoints and mix their "
        f"metrics: stop that run, or use another training.output_dir. The lock counts as stale, and is taken over, "
        f"once its process is gone on this host or, for a run on another host, when it was not refreshed for "
        f"checkpoint.lock_stale_hours={stale_after_s / 3600:g}"
    )
