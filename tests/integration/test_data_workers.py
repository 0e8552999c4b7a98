"""DataLoader worker processes: they ignore the job's signals (SLURM and Ctrl-C signal the whole process group),
and forkserver workers do not carry the parent's memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SIGNALLED = textwrap.dedent(
    """
    import os, signal, sys, time
    from pretrain.config import load_config
    from pretrain.data import build_pretrain_loader, resolve_source
    got = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, lambda number, frame: got.append(number))  # the main process decides: here, go on
    cfg = load_config(None, ["model.img_size=64", "model.window_size=4", "simmim.mask_patch_size=16",
                             "data.source=folder", f"data.path={sys.argv[1]}", "data.batch_size=2",
                             "data.num_workers=2", "data.samples_per_epoch=48"])
    batches = iter(build_pretrain_loader(cfg, resolve_source(cfg.data, 1), rank=0, world_size=1))
    next(batches)
    print("ready", flush=True)
    while len(got) < 3:
        time.sleep(0.05)
    print("done", 1 + sum(1 for _ in batches), sorted(got), flush=True)
    """
)


@pytest.mark.slow
def test_workers_ignore_sigterm_sigint_sigusr1_sent_to_the_process_group(image_folder) -> None:
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-c", SIGNALLED, str(image_folder(24))],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a job step's
    )
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        group = os.getpgid(proc.pid)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "pt_data_worker"]
        assert len(workers) == 2 and all(os.getpgid(w.pid) == group for w in workers)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            os.killpg(group, sig)
            time.sleep(0.2)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    # The handler receives plain ints (the enum's repr would differ from what the child prints).
    assert out.strip() == f"done 24 {sorted(int(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1))}", err
    assert "killed by signal" not in err


WORKER_MEMORY = textwrap.dedent(
    """
    import json, sys, psutil, torch
    from pretrain.config import load_config
    from pretrain.data import build_pretrain_loader, resolve_source
    big = torch.ones(1024 ** 3 // 4)  # 1 GiB in the parent, every page touched (as an engine's weights)
    report = {}
    for start in ("fork", "forkserver"):
        cfg = load_config(None, ["model.img_size=64", "model.window_size=4", "simmim.mask_patch_size=16",
                                 "data.source=folder", f"data.path={sys.argv[1]}", "data.batch_size=2",
                                 "data.num_workers=1", f"data.worker_start={start}"])
        batches = iter(build_pretrain_loader(cfg, resolve_source(cfg.data, 1), rank=0, world_size=1))
        next(batches)
        (worker,) = [p for p in psutil.Process().children(recursive=True) if p.name() == "pt_data_worker"]
        report[start] = worker.memory_full_info().rss
        del batches
    print(json.dumps(report))
    """
)


@pytest.mark.slow
def test_forkserver_workers_do_not_carry_the_parents_memory(image_folder) -> None:
    run = subprocess.run(
        [sys.executable, "-c", WORKER_MEMORY, str(image_folder(24))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    gib = 1024**3
    # A forked worker maps the parent's resident pages; one from the forkserver holds only its own (torch & co).
    assert rss["fork"] > gib and rss["forkserver"] < 0.6 * gib, rss
    print(f"worker RSS after a 1 GiB tensor in the parent: {rss}")
