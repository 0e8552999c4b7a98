"""The run lock of an output directory: real processes, real files, real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.checkpoint import CheckpointConfig
from pretrain.checks import ConfigError
from pretrain.runlock import LOCK_NAME, RunLockError, acquire_run_lock
from tests.helpers.launch import REPO

# A second process that tries to take the lock: prints "ACQUIRED" (and holds it until stdin closes) or the error.
CONTENDER = """
import sys
from pretrain.runlock import RunLockError, acquire_run_lock
try:
    lock = acquire_run_lock(sys.argv[1], float(sys.argv[2]), say=lambda m: print("SAY", m, flush=True))
except RunLockError as exc:
    print("REFUSED", exc, flush=True)
    sys.exit(2)
print("ACQUIRED", flush=True)
sys.stdin.read()
lock.release()
"""


def _contender(run_dir: Path, stale_after_s: float = 3600.0, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CONTENDER, str(run_dir), str(stale_after_s)],
        cwd=REPO,
        env={**os.environ, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _first_line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    assert line, proc.stdout.read()
    return line.strip()


def _foreign_lock(run_dir: Path, age_s: float, **fields: object) -> Path:
    """A lock file as a run on another host wrote it, last refreshed ``age_s`` ago."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"host": "node-elsewhere", "pid": 4242, "job_id": None, "restart_count": 0, "started": "earlier"}
    record.update(fields)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(record))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_second_run_is_refused_naming_the_holder(tmp_path: Path) -> None:
    messages: list[str] = []
    lock = acquire_run_lock(tmp_path / "run", 3600, messages.append)
    record = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["started"]
    other = _contender(tmp_path / "run")
    line = _first_line(other)
    assert other.wait(timeout=60) == 2
    assert line.startswith("REFUSED") and "is in use by another run" in line
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in line and str(tmp_path / "run" / LOCK_NAME) in line
    # Within this process too (the holder is this very process: not stale).
    with pytest.raises(RunLockError, match=f"pid {os.getpid()}"):
        acquire_run_lock(tmp_path / "run", 3600)
    lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists() and not messages
    lock.release()  # idempotent
    # Released: the next run takes it.
    again = _contender(tmp_path / "run")
    assert _first_line(again) == "ACQUIRED"
    again.communicate("", timeout=60)
    assert again.returncode == 0 and not (tmp_path / "run" / LOCK_NAME).exists()


def test_lock_of_a_killed_process_on_this_host_is_taken_over(tmp_path: Path) -> None:
    holder = _contender(tmp_path / "run")
    assert _first_line(holder) == "ACQUIRED"
    holder.send_signal(signal.SIGKILL)  # no release: the file stays
    holder.wait(timeout=60)
    assert (tmp_path / "run" / LOCK_NAME).is_file()
    messages: list[str] = []
    lock = acquire_run_lock(tmp_path / "run", 3600, messages.append)
    assert len(messages) == 1
    assert f"took over the stale lock of host {socket.gethostname()}, pid {holder.pid}" in messages[0]
    assert f"its process {holder.pid} is gone" in messages[0]
    assert lock.held()
    lock.release()


def test_other_hosts_lock_is_stale_only_when_not_refreshed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _foreign_lock(run, age_s=600)
    with pytest.raises(RunLockError, match=r"host node-elsewhere, pid 4242, started earlier .*refreshed 600 s ago"):
        acquire_run_lock(run, 3600)
    assert json.loads((run / LOCK_NAME).read_text())["host"] == "node-elsewhere"  # untouched
    _foreign_lock(run, age_s=2 * 3600)
    messages: list[str] = []
    lock = acquire_run_lock(run, 3600, messages.append)
    assert "took over the stale lock of host node-elsewhere, pid 4242" in messages[0]
    assert "it was not refreshed for 2.0 h (checkpoint.lock_stale_hours=1)" in messages[0]
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_requeued_slurm_job_takes_over_its_earlier_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _foreign_lock(run, age_s=5, job_id="777", restart_count=0)
    # Another job: refused even though the lock is of a SLURM job.
    refused = _contender(run, SLURM_JOB_ID="778", SLURM_RESTART_COUNT="1")
    assert _first_line(refused).startswith("REFUSED") and refused.wait(timeout=60) == 2
    requeued = _contender(run, SLURM_JOB_ID="777", SLURM_RESTART_COUNT="1")
    lines = [_first_line(requeued), _first_line(requeued)]
    assert "an earlier run of this SLURM job 777 (restart 0)" in lines[0] and lines[1] == "ACQUIRED"
    requeued.communicate("", timeout=60)


def test_garbled_lock_waits_for_its_creator_then_is_stale(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_bytes(b"")
    with pytest.raises(RunLockError, match="a run that is creating it right now"):
        acquire_run_lock(run, 3600)
    then = time.time() - 120
    os.utime(run / LOCK_NAME, (then, then))
    messages: list[str] = []
    acquire_run_lock(run, 3600, messages.append).release()
    assert "the lock file is empty or garbled (120 s old)" in messages[0]


def test_heartbeat_refreshes_and_a_taken_over_lock_is_left_alone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lock = acquire_run_lock(run, 3600, heartbeat_s=0.05)
    path = run / LOCK_NAME
    old = time.time() - 1000
    os.utime(path, (old, old))
    deadline = time.time() + 10
    while time.time() - path.stat().st_mtime > 100 and time.time() < deadline:
        time.sleep(0.02)
    assert time.time() - path.stat().st_mtime < 100, "the heartbeat did not refresh the lock"
    # Another run judged it stale and took it over: this one must neither refresh nor remove that run's lock.
    _foreign_lock(run, age_s=1000)
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime > 900
    assert not lock.held()
    lock.release()
    assert json.loads(path.read_text())["host"] == "node-elsewhere"


def test_racing_takeovers_leave_exactly_one_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _foreign_lock(run, age_s=10 * 3600)
    racers = [_contender(run) for _ in range(4)]
    outcomes = []
    for proc in racers:
        lines = []
        while not lines or not lines[-1].startswith(("ACQUIRED", "REFUSED")):
            lines.append(_first_line(proc))
        outcomes.append(lines[-1].split()[0])
    assert outcomes.count("ACQUIRED") == 1, outcomes
    for proc in racers:
        proc.communicate("", timeout=60)
    assert not (run / LOCK_NAME).exists()


def test_lock_stale_hours_is_checked() -> None:
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match=r"checkpoint\.lock_stale_hours"):
            CheckpointConfig(lock_stale_hours=bad).check()
    CheckpointConfig(lock_stale_hours=0.5).check()
