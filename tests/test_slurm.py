"""`sbatch slurm/pretrain.sh` on real SLURM daemons (slurmctld, slurmd, munge from Debian) started on this machine.

tests/slurm/cluster.sh brings the cluster up (installing the packages when missing, as root) and the fixtures stop
exactly the daemons it started. Outside CI the tests skip when the cluster cannot be had (not root, no packages).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.launch import REPO, make_image_folder, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
PYTHON = str(Path(os.sys.executable))


def _start_cluster(workdir: Path, nodes: int) -> dict[str, str]:
    if os.geteuid() != 0 and shutil.which("slurmctld") is None:
        if os.environ.get("CI"):
            pytest.fail("SLURM is not installed and this is not root: CI must be able to install it")
        pytest.skip("SLURM tests need root (to install slurm-wlm and munge) or an installed SLURM")
    proc = subprocess.run(
        ["bash", str(CLUSTER), "start", str(workdir), str(nodes)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    conf = re.search(r"export SLURM_CONF=(\S+)", proc.stdout)
    assert conf, proc.stdout
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(SLURM_CONF=conf.group(1), PYTHON=PYTHON, OMP_NUM_THREADS="1")
    return env


def _stop_cluster(workdir: Path) -> None:
    subprocess.run(["bash", str(CLUSTER), "stop", str(workdir)], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), 32)


# Work dirs of the clusters that are up, so that one shape can be stopped before the other starts.
_RUNNING: list[Path] = []


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    workdir = tmp_path_factory.mktemp("slurm1")
    _RUNNING.append(workdir)
    try:
        yield _start_cluster(workdir, 1)
    finally:
        _stop_cluster(workdir)  # idempotent: a no-op when stop_other_clusters already stopped it


@pytest.fixture(scope="class")
def stop_other_clusters() -> None:
    """Stop the one-node cluster, if it is up, so both shapes never share the 2 cores."""
    while _RUNNING:
        _stop_cluster(_RUNNING.pop())


def _sbatch(env: dict[str, str], log: Path, sbatch_args: list[str], job_args: list[str], wait: bool = False) -> str:
    cmd = [
        "sbatch",
        "--parsable",
        f"--output={log}",
        f"--error={log}",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=15",
        f"--chdir={REPO}",
        *sbatch_args,
    ]
    if wait:
        cmd.append("--wait")
    proc = subprocess.run(
        [*cmd, str(REPO / "slurm" / "pretrain.sh"), *job_args], env=env, capture_output=True, text=True, timeout=900
    )
    if not wait:
        assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job(env: dict[str, str], job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait_state(env: dict[str, str], job_id: str, states: tuple[str, ...], timeout: float = 600) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = _job(env, job_id)
        if info.get("JobState") in states:
            return info
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not reach {states}: {_job(env, job_id)}")


def test_one_node_two_tasks_trains_and_checkpoints(one_node: dict[str, str], images: Path, tmp_path: Path) -> None:
    log = tmp_path / "job.out"
    job_args = [
        "--config",
        "configs/demo_cpu.yaml",
        *tiny_overrides(tmp_path / "run", images, **{"training.max_steps": 3, "distributed.zero_stage": 2}),
    ]
    job_id = _sbatch(one_node, log, ["--nodes=1", "--ntasks-per-node=2"], job_args)
    # The conversion runs as a dependent job, as the README recommends.
    convert_log = tmp_path / "convert.out"
    convert = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--dependency=afterok:{job_id}",
            f"--output={convert_log}",
            f"--error={convert_log}",
            "--cpus-per-task=1",
            "--time=10",
            f"--chdir={REPO}",
            str(REPO / "slurm" / "convert.sh"),
            str(tmp_path / "run"),
        ],
        env=one_node,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert convert.returncode == 0, convert.stderr
    info = _wait_state(one_node, job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    convert_info = _wait_state(one_node, convert.stdout.strip().split(";")[0], ("COMPLETED", "FAILED", "CANCELLED"))
    assert convert_info["JobState"] == "COMPLETED", convert_log.read_text()[-3000:]
    assert (tmp_path / "run" / "export" / "simmim-step-3.safetensors").is_file()
    assert (tmp_path / "run" / "export" / "backbone-step-3.safetensors").is_file()
    assert "rank=0 local_rank=0 world_size=2 nodes=1" in text and "rank=1 local_rank=1 world_size=2 nodes=1" in text
    assert "launcher=slurm" in text and "step=3/3" in text
    assert "training finished (exit 0); not requeued" in text
    assert (tmp_path / "run" / "checkpoints" / "step-3" / "COMPLETE").is_file()


def test_preemption_saves_requeues_and_resumes(one_node: dict[str, str], images: Path, tmp_path: Path) -> None:
    log = tmp_path / "job.out"
    job_args = [
        "--config",
        "configs/demo_cpu.yaml",
        *tiny_overrides(tmp_path / "run", images, **{"training.max_steps": 60, "distributed.zero_stage": 2}),
    ]
    job_id = _sbatch(one_node, log, ["--nodes=1", "--ntasks-per-node=2"], job_args)
    deadline = time.time() + 600
    while time.time() < deadline and not (log.exists() and "step=3/" in log.read_text()):
        time.sleep(0.3)
    assert "step=3/" in log.read_text(), log.read_text()[-3000:]
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=one_node, check=True)
    # The job is requeued and held (BeginTime) by SLURM: release it at once.
    deadline = time.time() + 300
    while time.time() < deadline:
        info = _job(one_node, job_id)
        if info.get("Restarts", "0") != "0" or info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.3)
    assert info.get("Restarts") == "1", log.read_text()[-3000:]
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=one_node, check=True)
    info = _wait_state(one_node, job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    assert "received SIGUSR1" in text and "requeueing job" in text
    saved = int(re.search(r"preempted \(SIGUSR1\): complete checkpoint saved at step=(\d+)", text).group(1))
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'step-{saved}'} at step={saved}" in text
    second_run = text.split("resumed from", 1)[1]
    first_step = int(re.search(r"step=(\d+)/60", second_run).group(1))
    assert first_step == saved + 1
    assert "step=60/60" in second_run and "training finished (exit 0); not requeued" in second_run


def test_bad_config_fails_fast_and_is_not_requeued(one_node: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "job.out"
    job_id = _sbatch(
        one_node,
        log,
        ["--nodes=1", "--ntasks-per-node=1"],
        ["--config", "configs/demo_cpu.yaml", "model.window_size=5"],
    )
    info = _wait_state(one_node, job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", text
    assert "config error: model.img_size=96 with model.window_size=5" in text
    assert "configuration or data error (exit 2, message above); not requeued" in text


def test_deepspeed_launcher_preemption_saves_and_requeues(
    one_node: dict[str, str], images: Path, tmp_path: Path
) -> None:
    """slurm/pretrain_deepspeed.sh: hostfile from the allocation, 2 ranks by the launcher; USR1 reaches them."""
    log = tmp_path / "job.out"
    env = {**one_node, "SLOTS_PER_NODE": "2", "DEEPSPEED": str(Path(PYTHON).parent / "deepspeed")}
    job_args = [
        "--config",
        "configs/demo_cpu.yaml",
        *tiny_overrides(tmp_path / "run", images, **{"training.max_steps": 60, "distributed.zero_stage": 2}),
    ]
    cmd = [
        "sbatch",
        "--parsable",
        f"--output={log}",
        f"--error={log}",
        "--gpus-per-node=0",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=2",
        "--time=15",
        f"--chdir={REPO}",
        str(REPO / "slurm" / "pretrain_deepspeed.sh"),
        *job_args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (log.exists() and "step=3/" in log.read_text()):
            time.sleep(0.3)
        assert "step=3/" in log.read_text(), log.read_text()[-3000:]
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=one_node, check=True)
        deadline = time.time() + 300
        while time.time() < deadline and "requeueing job" not in log.read_text():
            time.sleep(0.3)
        text = log.read_text()
        assert "hostfile" in text and "1 nodes x 2 processes" in text, text[-3000:]
        assert "rank=1 local_rank=1 world_size=2 nodes=1" in text, text[-3000:]
        assert "received SIGUSR1: sending USR1 to the training processes on this node" in text, text[-3000:]
        saved = int(re.search(r"complete checkpoint saved at step=(\d+)", text).group(1))
        assert (tmp_path / "run" / "checkpoints" / f"step-{saved}" / "COMPLETE").is_file()
        assert f"requeueing job {job_id}" in text
        assert _job(one_node, job_id).get("Restarts") == "1"
    finally:
        subprocess.run(["scancel", job_id], env=one_node, capture_output=True)


@pytest.fixture(scope="class")
def two_nodes(stop_other_clusters: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    workdir = tmp_path_factory.mktemp("slurm2")
    try:
        yield _start_cluster(workdir, 2)
    finally:
        _stop_cluster(workdir)


class TestTwoNodes:
    """Runs after the one-node tests; the one-node cluster is stopped first so both never share the 2 cores."""

    def test_two_nodes_one_task_each(self, images: Path, tmp_path: Path, two_nodes: dict[str, str]) -> None:
        log = tmp_path / "job.out"
        job_args = [
            "--config",
            "configs/demo_cpu.yaml",
            *tiny_overrides(tmp_path / "run", images, **{"training.max_steps": 3, "distributed.zero_stage": 2}),
        ]
        _sbatch(two_nodes, log, ["--nodes=2", "--ntasks-per-node=1"], job_args, wait=True)
        text = log.read_text()
        assert "rank=0 local_rank=0 world_size=2 nodes=2 host=n1" in text, text[-3000:]
        assert "rank=1 local_rank=0 world_size=2 nodes=2 host=n2" in text
        assert "master=n1:" in text and "step=3/3" in text and "not requeued" in text
        assert (tmp_path / "run" / "checkpoints" / "step-3" / "COMPLETE").is_file()
