"""Host memory of a multi-process run, per rank and per data worker, against the size of the model states.

Runs ``python -m pretrain`` as N ranks on this machine (gloo, CPU) with a recipe, on the sample photos packed into
shards, until ``--steps`` optimizer steps are logged, while a sampler reads every 0.2 s, from /proc, the resident
memory (RSS) and the anonymous memory (RssAnon: what the process allocated, without file-backed pages such as the
mapped shared libraries) of each rank and of each of its child processes (the data workers). The run is then killed:
the figure is the memory of training steps, not of the final save.

Model states per rank under ZeRO-3 in bf16 with fp32 masters and AdamW: 16 bytes per parameter (bf16 parameter 2,
bf16 gradient 2, fp32 master 4, two fp32 moments 8), divided by the world size.

    python bench/host_memory.py [--config configs/simmim_swinv2_huge_192_w12.yaml] [--ranks 2] [--steps 3]
        [--workers 1] [extra section.key=value overrides]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from any directory

GIB = 2**30


def _status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(c) for c in text.split()]


class Sampler:
    """Peaks of RSS and anonymous memory of each rank and of its descendants (the data workers)."""

    def __init__(self, ranks: list[subprocess.Popen]) -> None:
        self.ranks = ranks
        self.rank_peak = [{"rss": 0, "anon": 0} for _ in ranks]
        self.worker_peak = [{"rss": 0, "anon": 0} for _ in ranks]
        self.total_peak = 0

    def sample(self) -> None:
        total = 0
        for r, proc in enumerate(self.ranks):
            rss, anon = _status_kib(proc.pid, "VmRSS"), _status_kib(proc.pid, "RssAnon")
            self.rank_peak[r]["rss"] = max(self.rank_peak[r]["rss"], rss)
            self.rank_peak[r]["anon"] = max(self.rank_peak[r]["anon"], anon)
            total += anon
            pending = _children(proc.pid)
            while pending:
                child = pending.pop()
                pending += _children(child)
                c_rss, c_anon = _status_kib(child, "VmRSS"), _status_kib(child, "RssAnon")
                self.worker_peak[r]["rss"] = max(self.worker_peak[r]["rss"], c_rss)
                self.worker_peak[r]["anon"] = max(self.worker_peak[r]["anon"], c_anon)
                total += c_anon
        self.total_peak = max(self.total_peak, total)
        self.last_rank_anon = [_status_kib(proc.pid, "RssAnon") for proc in self.ranks]


def _parameters(config: str, overrides: list[str]) -> int:
    """Parameters of the SimMIM model of the config (built on the meta device: no memory)."""
    import torch

    from pretrain.config import load_config
    from pretrain.simmim import build_simmim

    cfg = load_config(config, overrides)
    with torch.device("meta"):
        model = build_simmim(cfg)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/simmim_swinv2_huge_192_w12.yaml")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from pretrain.distributed import free_port
    from pretrain.sample_data import write_sample_shards

    with tempfile.TemporaryDirectory(prefix="host-memory-") as tmp:
        shards = Path(tmp) / "shards"
        write_sample_shards(shards)
        overrides = [
            f"data.path={shards}",
            "data.batch_size=1",
            f"data.num_workers={args.workers}",
            "data.samples_per_epoch=64",
            "data.shuffle_buffer=8",
            f"training.output_dir={Path(tmp) / 'run'}",
            "training.device=cpu",
            "logging.log_every=1",
            "logging.image_every=0",
            "logging.tensorboard=false",
            "checkpoint.every_steps=100000",
            *args.overrides,
        ]
        params = _parameters(args.config, overrides)
        states = 16 * params / args.ranks
        port = free_port()
        log_dir = Path(tmp) / "logs"
        log_dir.mkdir()
        ranks = []
        for rank in range(args.ranks):
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(args.ranks),
                "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.ranks)),
            }
            out = open(log_dir / f"rank{rank}.log", "w")  # noqa: SIM115 - owned by the process
            command = [sys.executable, "-m", "pretrain", "--config", args.config, *overrides]
            ranks.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
        sampler = Sampler(ranks)
        start, done = time.time(), f"step={args.steps}/"
        first_step_s = None
        # Rank 0's anonymous memory at phase boundaries: the engine built (its "peak ... TFLOP/s" line comes right
        # before the first step), and the peak up to the first logged step (AdamW allocates its moments there).
        phases: dict[str, float] = {}
        try:
            while time.time() - start < args.timeout_s:
                sampler.sample()
                text = (log_dir / "rank0.log").read_text()
                if "built" not in phases and "TFLOP/s per device" in text:
                    phases["built"] = sampler.last_rank_anon[0]
                if first_step_s is None and "step=1/" in text:
                    first_step_s = time.time() - start
                    phases["first step (peak)"] = sampler.rank_peak[0]["anon"]
                if done in text or any(p.poll() is not None for p in ranks):
                    break
                time.sleep(0.2)
        finally:
            for proc in ranks:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                proc.wait()
        text = (log_dir / "rank0.log").read_text()
        if done not in text:
            print(text[-4000:])
            raise SystemExit(f"the run did not reach step {args.steps} (exit codes {[p.returncode for p in ranks]})")

    print(f"{args.config}: {params / 1e6:.1f} M parameters, {args.ranks} ranks, batch 1, {args.workers} worker(s)")
    print(f"model states per rank (16 B/parameter / {args.ranks}): {states / GIB:.2f} GiB")
    print(f"reached step {args.steps} in {time.time() - start:.0f} s (first step after {first_step_s:.0f} s)")
    print("| process | peak RSS GiB | peak anonymous GiB | anonymous / model states per rank |")
    print("|---|---|---|---|")
    for r in range(args.ranks):
        rank, worker = sampler.rank_peak[r], sampler.worker_peak[r]
        print(
            f"| rank {r} | {rank['rss'] * 1024 / GIB:.2f} | {rank['anon'] * 1024 / GIB:.2f} | "
            f"{rank['anon'] * 1024 / states:.2f}x |"
        )
        print(
            f"| rank {r} data workers (largest) | {worker['rss'] * 1024 / GIB:.2f} | "
            f"{worker['anon'] * 1024 / GIB:.2f} | |"
        )
    print(f"peak anonymous memory of all processes together: {sampler.total_peak * 1024 / GIB:.2f} GiB")
    print("rank 0 anonymous memory by phase: " + ", ".join(f"{k} {v * 1024 / GIB:.2f} GiB" for k, v in phases.items()))


if __name__ == "__main__":
    main()
