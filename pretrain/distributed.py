"""Launch environments -> (rank, world size, local rank, master) and process-group initialisation.

One entry point works unchanged under plain python, torchrun, the deepspeed launcher and srun:
- torchrun / deepspeed launcher: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and LOCAL_RANK (or the deepspeed
  launcher's ``--local_rank`` argument) are set by the launcher;
- srun (one task per GPU): SLURM_PROCID -> RANK, SLURM_STEP_NUM_TASKS/SLURM_NTASKS -> WORLD_SIZE, SLURM_LOCALID ->
  LOCAL_RANK, MASTER_ADDR = first host of the job's node list (``scontrol show hostnames``), MASTER_PORT =
  20000 + job id % 20000 (different jobs on shared nodes do not collide). Values already in the environment win;
- no launcher: a single process (rank 0 of 1) on 127.0.0.1 with a free port.
A partial launch environment is an error naming the missing variables; there is no silent fallback to localhost
for a multi-process job (each node would form its own world and hang). DeepSpeed's ``init_distributed`` reads only
the five torch variables, so they are exported for it.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import NoReturn

__all__ = [
    "LaunchEnv",
    "LaunchError",
    "finish_process",
    "free_port",
    "init_process_group",
    "leave_process_group",
    "resolve_launch_env",
]

TORCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


class LaunchError(RuntimeError):
    """The launch environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # none | torch (torchrun or deepspeed launcher) | slurm
    num_nodes: int


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for single-process runs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not an integer") from None


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True, timeout=30
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        raise LaunchError(
            f"cannot expand SLURM node list {nodelist!r} with scontrol ({exc}); set MASTER_ADDR explicitly"
        ) from None
    if not out:
        raise LaunchError(f"scontrol returned no host for node list {nodelist!r}; set MASTER_ADDR explicitly")
    return out[0]


def resolve_launch_env(
    environ: MutableMapping[str, str] | None = None, local_rank_arg: int | None = None, export: bool = True
) -> LaunchEnv:
    """Work out this process's place in the job from the environment (see module docstring).

    Args:
        environ: the environment to read (and, with ``export``, update); default ``os.environ``.
        local_rank_arg: the deepspeed launcher's ``--local_rank`` value, if given.
        export: write RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK back into ``environ``.

    Raises:
        LaunchError: naming the missing or malformed variables.
    """
    env = os.environ if environ is None else environ
    present = [v for v in TORCH_VARS if v in env]
    if local_rank_arg is not None and "LOCAL_RANK" not in env:
        env = dict(env) if not export else env
        env["LOCAL_RANK"] = str(local_rank_arg)
        present = [v for v in TORCH_VARS if v in env]
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [v for v in TORCH_VARS if v not in env]
        if missing:
            raise LaunchError(
                f"incomplete launch environment: {', '.join(present)} set but {', '.join(missing)} missing "
                f"(torchrun and the deepspeed launcher set all of {', '.join(TORCH_VARS)})"
            )
        launched = LaunchEnv(
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK"),
            master_addr=env["MASTER_ADDR"],
            master_port=_int(env, "MASTER_PORT"),
            launcher="torch",
            # torchrun sets LOCAL_WORLD_SIZE (processes per node); the deepspeed launcher does not.
            num_nodes=max(1, _int(env, "WORLD_SIZE") // max(1, int(env.get("LOCAL_WORLD_SIZE") or env["WORLD_SIZE"]))),
        )
    elif "SLURM_PROCID" in env and "SLURM_JOB_ID" in env:
        ntasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
        if ntasks is None:
            raise LaunchError("SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS; run under srun")
        if "SLURM_LOCALID" not in env:
            raise LaunchError("SLURM_LOCALID missing from the SLURM environment; launch the tasks with srun")
        master = env.get("MASTER_ADDR")
        if not master:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise LaunchError("SLURM_JOB_NODELIST missing and MASTER_ADDR not set: cannot find the master node")
            master = _first_slurm_host(nodelist)
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else 20000 + _int(env, "SLURM_JOB_ID") % 20000
        launched = LaunchEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=int(ntasks),
            local_rank=_int(env, "SLURM_LOCALID"),
            master_addr=master,
            master_port=port,
            launcher="slurm",
            num_nodes=int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1),
        )
    elif present:
        raise LaunchError(
            f"incomplete launch environment: {', '.join(present)} set but RANK and WORLD_SIZE missing "
            f"(set all of {', '.join(TORCH_VARS)}, use torchrun, or unset them for a single process)"
        )
    else:
        launched = LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "none", 1)
    if not 0 <= launched.rank < launched.world_size:
        raise LaunchError(f"rank {launched.rank} is outside world size {launched.world_size}")
    if export:
        env.update(
            RANK=str(launched.rank),
            WORLD_SIZE=str(launched.world_size),
            LOCAL_RANK=str(launched.local_rank),
            MASTER_ADDR=launched.master_addr,
            MASTER_PORT=str(launched.master_port),
        )
    return launched


def init_process_group(backend: str, timeout_minutes: float) -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPUs) with a bounded collective timeout.

    The timeout bounds how long the surviving ranks wait when one rank dies: they raise instead of hanging.
    """
    import deepspeed

    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        verbose=False,
    )


def leave_process_group() -> None:
    """The end of a rank's collective work: a barrier (no rank tears down while another still communicates), then
    every process group is destroyed."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def finish_process(exit_code: int) -> NoReturn:
    """End this process with ``exit_code``, skipping the interpreter's teardown; call it once the run's files are
    closed. Standard streams and logging handlers are flushed first.

    Why: a gloo worker thread drops its reference to a finished collective on its own schedule, after ``wait()`` has
    returned, and a barrier's work keeps the works before it (and their tensors) alive. If that drop happens while the
    interpreter is finalising, freeing a tensor that Python created makes the thread take the GIL, which ends the
    thread through a forced unwind that C++ turns into abort(): a rank that finished cleanly exits with SIGABRT
    ("terminate called without an active exception"). Seen in about 1 of 100 two-rank ZeRO-3 runs on the CPU; the
    core dump showed a gloo worker in ~AsyncBarrierWork -> ~AsyncAllgatherWork -> decref_pyobject -> take_gil ->
    pthread_exit while the main thread was in Py_FinalizeEx. destroy_process_group does not join those threads, and
    os._exit ends the process before finalisation can start.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(exit_code)
