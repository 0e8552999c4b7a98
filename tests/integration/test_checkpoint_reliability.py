"""Checkpoint reliability on real DeepSpeed engines (2 gloo processes, ZeRO-2) and real files: durable saves, a
damaged newest checkpoint, saves cut short, a full disk, a changed config, and a fresh start in a used directory.

Run as a script, this file is the worker, as each rank:
``python tests/integration/test_checkpoint_reliability.py WORK_DIR``.
Every check runs in both processes; rank 0 prints ``RESULT <check> <json>`` with what the tests below assert on
(messages as the log would show them), and a failed check inside the worker raises (non-zero exit code).
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------- the worker
class Rank:
    """What every check needs: the config, the engine, the rank, and rank 0's log."""

    def __init__(self, work: Path) -> None:
        import torch.distributed as dist

        from pretrain.config import load_config
        from tests.helpers.engine_checks import zero_engine
        from tests.helpers.launch import tiny_overrides

        self.dist = dist
        self.work = work
        self.rank = dist.get_rank()
        self.overrides = tiny_overrides(work / "run", work)
        self.cfg = load_config(None, self.overrides)
        self.engine = zero_engine(self.cfg, stage=2)
        self.log: list[str] = []
        self.step = 0

    def config(self, **extra: object) -> Any:
        from pretrain.config import load_config

        return load_config(None, [*self.overrides, *(f"{k}={v}" for k, v in extra.items())])

    def say(self, message: str) -> None:
        self.log.append(message)

    def train(self) -> None:
        """One optimizer step on a fixed batch (the weights change between saves)."""
        gen = torch.Generator().manual_seed(100 * self.step + self.rank)
        images = torch.randn(2, 3, 32, 32, generator=gen)
        mask = (torch.rand(2, 8, 8, generator=gen) < 0.6).float()
        self.engine.backward(self.engine(images, mask))
        self.engine.step()
        self.step += 1

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.engine.module.state_dict().items()}

    def save(self, ckpt_dir: Path, step: int, cfg: Any = None, keep_last: int = 10) -> Path:
        from pretrain.checkpoint import save_checkpoint
        from pretrain.config import to_dict

        client = {"step": step, "config": to_dict(cfg or self.cfg), "world_size": 2, "zero_stage": 2}
        return save_checkpoint(self.engine, ckpt_dir, step, client, keep_last)

    def loads_as(self, tag_dir: Path, expected: dict[str, torch.Tensor]) -> None:
        """DeepSpeed loads ``tag_dir`` on every rank and the weights are the ones saved there."""
        load_dir, _ = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        assert load_dir is not None, f"DeepSpeed did not load {tag_dir}"
        for key, value in self.weights().items():
            assert torch.equal(value, expected[key]), (tag_dir, key)

    def result(self, name: str, **data: Any) -> None:
        self.dist.barrier()
        if self.rank == 0:
            print(f"RESULT {name} " + json.dumps({**data, "log": self.log}, default=str), flush=True)
        self.log = []


def check_durable_save(r: Rank) -> None:
    """Item 7: each rank fsyncs what it wrote, the folder is fsynced, then the marker, then the checkpoints folder;
    the marker lists every file with its size."""
    from pretrain.checkpoint import MARKER, list_files, read_marker

    events: list[tuple[float, str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append((time.time(), "fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        events.append((time.time(), "replace", str(dst)))

    ckpt = r.work / "durable" / "checkpoints"
    r.train()
    os.fsync, os.replace = fsync, replace
    try:
        tag_dir = r.save(ckpt, 1)
    finally:
        os.fsync, os.replace = real_fsync, real_replace
    everyone: list[Any] = [None, None]
    r.dist.all_gather_object(everyone, events)
    if r.rank == 0:
        merged = sorted(e for rank_events in everyone for e in rank_events)
        marker_at = next(t for t, kind, path in merged if kind == "replace" and path == str(tag_dir / MARKER))
        synced_before = {path for t, kind, path in merged if kind == "fsync" and t < marker_at}
        files = read_marker(tag_dir)["files"]
        assert files == list_files(tag_dir), (files, list_files(tag_dir))
        assert any(name.endswith("optim_states.pt") for name in files)
        unsynced = [name for name in files if str(tag_dir / name) not in synced_before]
        assert not unsynced, f"not fsynced before the marker: {unsynced}"
        assert str(tag_dir) in synced_before, "the checkpoint folder was not fsynced before the marker"
        after = [path for t, kind, path in merged if kind == "fsync" and t > marker_at]
        assert str(tag_dir) in after and str(ckpt) in after, f"marker or checkpoints folder not fsynced: {after}"
        writers = {
            rank: sorted(p for _, k, p in events_ if k == "fsync" and ".pt" in p)
            for rank, events_ in enumerate(everyone)
        }
        r.result("durable", files=sorted(files), writers=writers)
    else:
        r.result("durable")


def check_damaged_newest(r: Rank) -> None:
    """Item 6: damaged checkpoints are moved to corrupt/ with the reason, the run resumes from the next newest
    whole one (which loads); with none left, an error on every rank."""
    from pretrain.checkpoint import CheckpointError, resume_target

    ckpt = r.work / "damaged" / "checkpoints"
    saved, size = {}, 0
    for step in (1, 2, 3):
        r.train()
        saved[step] = r.weights()
        r.save(ckpt, step)
    if r.rank == 0:
        states = ckpt / "step-3" / "mp_rank_00_model_states.pt"
        size = states.stat().st_size
        with open(states, "r+b") as handle:
            handle.truncate(size // 2)
        (ckpt / "step-2" / "COMPLETE").write_text("")
    r.dist.barrier()
    point = resume_target(r.config(), ckpt, 2, r.say)
    assert point.path == ckpt / "step-1" and not point.universal, point
    r.loads_as(point.path, saved[1])
    moved = sorted(p.name for p in (ckpt / "corrupt").iterdir()) if r.rank == 0 else []
    r.result("damaged", moved=moved, size=size)

    if r.rank == 0:
        (ckpt / "step-1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    r.dist.barrier()
    try:
        resume_target(r.config(), ckpt, 2, r.say)
    except CheckpointError as exc:
        error = str(exc)
    else:
        raise AssertionError("no error with every checkpoint damaged")
    errors: list[Any] = [None, None]
    r.dist.all_gather_object(errors, error)
    r.result("none_left", errors=errors)


def check_cut_short(r: Rank) -> None:
    """Item 8, on start: marker-less step folders newer than the resume point (saves cut short) are removed."""
    from pretrain.checkpoint import resume_target

    ckpt = r.work / "cut" / "checkpoints"
    r.train()
    r.save(ckpt, 2)
    # Saves cut short: DeepSpeed wrote the files, no marker followed (a crash or a full disk in between).
    r.engine.save_checkpoint(str(ckpt), tag="step-1", client_state={}, save_latest=False)
    r.engine.save_checkpoint(str(ckpt), tag="step-5", client_state={}, save_latest=False)
    if r.rank == 0:
        (ckpt / ".step-2_universal.abc123.tmp").mkdir()  # an interrupted conversion's temporary folder
    r.dist.barrier()
    point = resume_target(r.config(), ckpt, 2, r.say)
    assert point.path == ckpt / "step-2", point
    left = sorted(p.name for p in ckpt.iterdir() if p.is_dir()) if r.rank == 0 else []
    r.result("cut_short", left=left)


def check_config_changes(r: Rank) -> None:
    """Item 4: an architecture change is refused naming each key; other changes are listed and the resume goes on."""
    from pretrain.checkpoint import CheckpointError, resume_target

    ckpt = r.work / "config" / "checkpoints"
    r.train()
    weights = r.weights()
    r.save(ckpt, 1)
    try:
        resume_target(r.config(**{"model.embed_dim": 32, "model.depths": "[1,1,2,1]"}), ckpt, 2, r.say)
    except CheckpointError as exc:
        error = str(exc)
    else:
        raise AssertionError("an architecture change was not refused")
    assert (ckpt / "step-1" / "COMPLETE").is_file(), "a refused resume must leave the checkpoint as it is"
    point = resume_target(r.config(**{"data.batch_size": 8, "optimizer.base_lr": 1e-3}), ckpt, 2, r.say)
    assert point.path == ckpt / "step-1"
    r.loads_as(point.path, weights)
    r.result("config", error=error)


def check_fresh_start(r: Rank) -> None:
    """Item 2: checkpoint.resume=none in a used directory moves the earlier run's checkpoints and metrics aside
    (loadable there), and auto-resume afterwards continues the new run only."""
    from pretrain.checkpoint import resume_target

    run_dir = r.work / "fresh"
    ckpt = run_dir / "checkpoints"
    old = {}
    for step in (1, 2, 3):
        r.train()
        old[step] = r.weights()
        r.save(ckpt, step)
    if r.rank == 0:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
        (run_dir / "tb").mkdir()
        (run_dir / "tb" / "events.out.tfevents.1").write_bytes(b"old run")
        (run_dir / "images").mkdir()
        (run_dir / "images" / "step-00000003.png").write_bytes(b"png")
        (run_dir / "train.log").write_text("old run's log\n")
    r.dist.barrier()
    point = resume_target(r.config(**{"checkpoint.resume": "none"}), ckpt, 2, r.say)
    assert point.path is None
    r.train()
    new = r.weights()
    r.save(ckpt, 1)  # the new run's first checkpoint; then a preemption and a requeue with resume=auto
    point = resume_target(r.config(), ckpt, 2, r.say)
    assert point.path == ckpt / "step-1", point
    r.loads_as(point.path, new)
    (previous,) = (run_dir / "previous").iterdir()
    r.loads_as(previous / "checkpoints" / "step-3", old[3])  # nothing of the earlier run is lost
    listing = {}
    if r.rank == 0:
        listing = {
            "previous": previous.name,
            "moved": sorted(p.name for p in previous.iterdir()),
            "old_checkpoints": sorted(p.name for p in (previous / "checkpoints").iterdir() if p.is_dir()),
            "old_metrics": (previous / "metrics.jsonl").read_text(),
            "run_dir": sorted(p.name for p in run_dir.iterdir()),
            "train_log": (run_dir / "train.log").read_text(),
        }
    r.result("fresh", **listing)


def _mount_small_disk(r: Rank, disk: Path, size: int) -> str:
    """A tmpfs of ``size`` bytes at ``disk`` (rank 0 mounts it; same mount namespace for both ranks); "tmpfs", or
    "injected" when mounting is not allowed here (then writes under step-2 fail with ENOSPC at the file layer)."""
    mode = [None]
    if r.rank == 0:
        disk.mkdir(parents=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True)
        mode[0] = "tmpfs" if done.returncode == 0 else "injected"
    r.dist.broadcast_object_list(mode, src=0)
    if mode[0] == "injected":
        real_open = builtins.open

        class FullDisk:
            def __init__(self, handle: Any) -> None:
                self.handle, self.written = handle, 0

            def write(self, data: Any) -> int:
                self.written += len(data)
                if self.written > 4096:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return self.handle.write(data)

            def __getattr__(self, name: str) -> Any:
                return getattr(self.handle, name)

            def __enter__(self) -> FullDisk:
                return self

            def __exit__(self, *exc: object) -> None:
                self.handle.close()

        def full_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            handle = real_open(file, mode, *args, **kwargs)
            return FullDisk(handle) if "w" in mode and "/step-2/" in str(file) else handle

        builtins.open = full_open
    return mode[0]


def check_disk_full(r: Rank) -> None:
    """Item 8: a full disk during a save: an error on every rank naming the path, the free space and the size of the
    last complete checkpoint, which stays usable; the cut-short folder is removed on the next start."""
    from pretrain.checkpoint import CheckpointError, checkpoint_bytes, find_damage, resume_target

    r.train()
    size = checkpoint_bytes(r.save(r.work / "measure" / "checkpoints", 1))
    disk = r.work / "disk"
    mode = _mount_small_disk(r, disk, int(size * 1.5) // 4096 * 4096)
    ckpt = disk / "checkpoints"
    try:
        weights = r.weights()
        r.save(ckpt, 1)
        r.train()
        try:
            r.save(ckpt, 2)
        except CheckpointError as exc:
            error = str(exc)
        else:
            raise AssertionError(f"no error for a save on a full disk ({mode})")
        errors: list[Any] = [None, None]
        r.dist.all_gather_object(errors, error)
        assert find_damage(ckpt / "step-1") is None
        r.loads_as(ckpt / "step-1", weights)
        cut_short = (ckpt / "step-2").is_dir()
        free_before = shutil.disk_usage(disk).free
        point = resume_target(r.config(), ckpt, 2, r.say)
        assert point.path == ckpt / "step-1", point
        freed = shutil.disk_usage(disk).free - free_before
        r.result("disk_full", mode=mode, errors=errors, size=size, cut_short=cut_short, freed=freed)
    finally:
        r.dist.barrier()
        if r.rank == 0 and mode == "tmpfs":
            subprocess.run(["umount", str(disk)], check=False)


def worker(work: Path) -> None:
    from pretrain.distributed import init_process_group

    init_process_group("gloo", 2)
    r = Rank(work)
    for check in (check_durable_save, check_damaged_newest, check_cut_short, check_config_changes, check_fresh_start):
        check(r)
    check_disk_full(r)  # last: it may replace open() for the rest of the process


# ------------------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    from tests.helpers.launch import free_port, rank_env

    work = tmp_path_factory.mktemp("checkpoint")
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(work)],
            cwd=REPO,
            env=rank_env(rank, 2, port, LOCAL_WORLD_SIZE="2", DS_ACCELERATOR="cpu"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
        if os.path.ismount(work / "disk"):
            subprocess.run(["umount", str(work / "disk")], check=False)
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-5000:]
    found = {}
    for line in logs[0].splitlines():
        if line.startswith("RESULT "):
            _, name, data = line.split(" ", 2)
            found[name] = json.loads(data)
    found["work"] = {"path": str(work)}
    return found


def test_save_is_durable_before_its_marker(results: dict[str, dict[str, Any]]) -> None:
    durable = results["durable"]
    # Rank 0 writes the model states and its optimizer shard, rank 1 its own shard: each fsyncs what it wrote.
    assert any(p.endswith("zero_pp_rank_0_mp_rank_00_optim_states.pt") for p in durable["writers"]["0"])
    assert any(p.endswith("zero_pp_rank_1_mp_rank_00_optim_states.pt") for p in durable["writers"]["1"])
    assert "mp_rank_00_model_states.pt" in durable["files"]


def test_damaged_newest_checkpoints_are_moved_aside_and_the_next_one_resumes(
    results: dict[str, dict[str, Any]],
) -> None:
    damaged = results["damaged"]
    assert damaged["moved"] == ["step-2", "step-3"]
    log = "\n".join(damaged["log"])
    ckpt = Path(results["work"]["path"]) / "damaged" / "checkpoints"
    assert (
        f"checkpoint {ckpt / 'step-3'} is damaged: mp_rank_00_model_states.pt is {damaged['size'] // 2} bytes, the "
        f"COMPLETE marker records {damaged['size']} (cut short or overwritten). Moved it to {ckpt / 'corrupt'}"
    ) in log
    assert f"checkpoint {ckpt / 'step-2'} is damaged: its COMPLETE marker is empty (0 bytes)" in log
    errors = results["none_left"]["errors"]
    assert f"no usable checkpoint left in {ckpt}: every complete one was damaged (step-1" in errors[0]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in "\n".join(results["none_left"]["log"])
    assert errors[1].startswith("rank 0 could not choose the checkpoint to resume from: no usable checkpoint left")


def test_saves_cut_short_after_the_resume_point_are_removed_on_start(results: dict[str, dict[str, Any]]) -> None:
    cut = results["cut_short"]
    # step-5 (newer than the resume point) and the temporary folder go; step-1 (older) is left to the next save.
    assert cut["left"] == ["step-1", "step-2"]
    log = "\n".join(cut["log"])
    assert "removed step-5, .step-2_universal.abc123.tmp from " in log and "saves (or conversions) cut short" in log


def test_architecture_change_is_refused_and_other_changes_are_listed(results: dict[str, dict[str, Any]]) -> None:
    config = results["config"]
    error = config["error"]
    assert "was saved by a run of another architecture" in error
    assert "model.depths: [1, 1, 1, 1] -> [1, 1, 2, 1]" in error and "model.embed_dim: 16 -> 32" in error
    assert "data.batch_size" not in error
    (listed,) = [line for line in config["log"] if line.startswith("resuming ")]
    assert "saved with another config (same architecture): data.batch_size: 4 -> 8" in listed
    assert "optimizer.base_lr: 0.0002 -> 0.001" in listed


def test_fresh_start_moves_the_earlier_run_aside_and_auto_resume_continues_the_new_run(
    results: dict[str, dict[str, Any]],
) -> None:
    fresh = results["fresh"]
    assert fresh["previous"].startswith("run-")
    assert fresh["moved"] == ["checkpoints", "images", "metrics.jsonl", "tb"]
    assert fresh["old_checkpoints"] == ["step-1", "step-2", "step-3"]
    assert [json.loads(line)["step"] for line in fresh["old_metrics"].splitlines()] == [1, 2, 3]
    # Left in the run directory: the new run's checkpoints, the appended train.log, the place the old run went.
    assert fresh["run_dir"] == ["checkpoints", "previous", "train.log"] and fresh["train_log"] == "old run's log\n"
    run_dir = Path(results["work"]["path"]) / "fresh"
    (moved_line,) = [line for line in fresh["log"] if line.startswith("checkpoint.resume=none")]
    moved = "which an earlier run used: moved its checkpoints, metrics.jsonl, tb, images to "
    assert f"in {run_dir}, {moved}" in moved_line
    assert str(run_dir / "previous" / fresh["previous"]) in moved_line


def test_full_disk_names_path_free_space_and_last_checkpoint_which_stays_usable(
    results: dict[str, dict[str, Any]],
) -> None:
    full = results["disk_full"]
    disk = Path(results["work"]["path"]) / "disk" / "checkpoints"
    for error in full["errors"]:  # the same error on both ranks
        assert error.startswith(f"saving checkpoint {disk / 'step-2'} failed: rank ")
        assert f"could not write {disk / 'step-2'}/" in error and "No space left on device" in error
        assert "The disk is full: " in error and f"free on the filesystem of {disk}" in error
        assert f"the last complete checkpoint {disk / 'step-1'} (" in error and ") stays usable" in error
    if full["mode"] == "tmpfs":  # the real thing: the free space reported is what the small disk had left
        free, need = re.search(r"full: ([\d.]+) MiB free .* needed about ([\d.]+) MiB", full["errors"][0]).groups()
        assert float(free) < float(need) and float(free) < full["size"] / 2**20
        assert full["freed"] > 0, "removing the cut-short save gave no space back"
    assert full["cut_short"]
    assert any(line.startswith("removed step-2 from ") for line in full["log"]), full["log"]


if __name__ == "__main__":
    from tests.helpers.launch import finish_rank

    worker(Path(sys.argv[1]))
    finish_rank()
