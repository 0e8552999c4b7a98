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

from tests.helpers.launch import REPO, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
PYTHON = str(Path(os.sys.executable))
GRACE_TIME = 60  # seconds a preempted job has to save (the `debug` partition's GraceTime)


def _start_cluster(workdir: Path, nodes: int) -> dict[str, str]:
    if os.geteuid() != 0 and shutil.which("slurmctld") is None:
        if os.environ.get("CI"):
            pytest.fail("SLURM is not installed and this is not root: CI must be able to install it")
        pytest.skip("SLURM tests need root (to install slurm-wlm and munge) or an installed SLURM")
    proc = subprocess.run(
        ["bash", str(CLUSTER), "start", str(workdir), str(nodes)],
        env={**os.environ, "GRACE_TIME": str(GRACE_TIME)},
        capture_output=True,
        text=True,
        timeout=600,
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
def images(image_folder) -> Path:
    return image_folder(32)


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


def _sbatch_cmd(log: Path, sbatch_args: list[str], script: str = "pretrain.sh") -> list[str]:
    return [
        "sbatch",
        "--parsable",
        f"--output={log}",
        f"--error={log}",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=15",
        f"--chdir={REPO}",
        *sbatch_args,
        str(REPO / "slurm" / script),
    ]


def _sbatch(env: dict[str, str], log: Path, sbatch_args: list[str], job_args: list[str]) -> str:
    """Submit slurm/pretrain.sh; returns the job id."""
    proc = subprocess.run(
        [*_sbatch_cmd(log, sbatch_args), *job_args], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _sbatch_wait(
    env: dict[str, str], log: Path, sbatch_args: list[str], job_args: list[str], script: str = "pretrain.sh"
) -> tuple[str, int]:
    """`sbatch --wait`: (job id, sbatch's exit code, which is the job's)."""
    proc = subprocess.run(
        [*_sbatch_cmd(log, ["--wait", *sbatch_args], script), *job_args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    job_id = proc.stdout.strip().split(";")[0]
    assert job_id.isdigit(), proc.stdout + proc.stderr
    return job_id, proc.returncode


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


DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def _tiny_job(run: Path, images: Path, steps: int) -> list[str]:
    return [
        "--config",
        "configs/demo_cpu.yaml",
        *tiny_overrides(run, images, **{"training.max_steps": steps, "distributed.zero_stage": 2}),
    ]


def _wait_for_step(log: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not (log.exists() and f"step={step}/" in log.read_text()):
        time.sleep(0.3)
    assert log.exists() and f"step={step}/" in log.read_text(), log.read_text()[-3000:] if log.exists() else "no log"


def _seconds(stamp: str) -> float:
    return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))


def _release_requeued(env: dict[str, str], job_id: str, log: Path) -> None:
    """Wait until the job has been requeued once, then release it from SLURM's hold (reason BeginTime)."""
    deadline = time.time() + 300
    info = _job(env, job_id)
    while time.time() < deadline:
        info = _job(env, job_id)
        if info.get("Restarts", "0") != "0" or info.get("JobState") in DONE:
            break
        time.sleep(0.3)
    assert info.get("Restarts") == "1", log.read_text()[-3000:]
    # Not at once: slurmd revokes the old run's job credential with one-second resolution, and a restart within the
    # same second is refused ("Job credential revoked") and fails the job. SLURM's own BeginTime hold avoids this.
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True)


def _resumed_after_signal(env: dict[str, str], job_id: str, log: Path, run: Path) -> tuple[str, str]:
    """After a stop signal: checks that the first run saved a complete checkpoint, that every rank exited 75 (none
    killed, no data loader worker dead of the signal) and that the job was requeued; releases it, waits for the
    requeued run to resume from that checkpoint and take the next step, then cancels the job, which must not be
    requeued (the runs are long so that no signal can come too late; the rest would prove nothing new). Returns (the
    signals the trainer reported, the first run's output)."""
    _release_requeued(env, job_id, log)
    deadline = time.time() + 300
    pattern = re.compile(r"resumed from .* at step=(\d+).*?\nstep=(\d+)/", re.S)
    while time.time() < deadline and not pattern.search(log.read_text()):
        time.sleep(0.3)
    subprocess.run(["scancel", job_id], env=env, check=True)
    info = _wait_state(env, job_id, DONE)
    text = log.read_text()
    # A plain scancel sends SIGTERM too (the ranks may save again), but the job stays cancelled.
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "1", text[-4000:]
    assert "not requeued" in text.rsplit("resumed from", 1)[1] and "SLURM is already ending the job" in text
    saved = re.search(r"preempted \(([A-Z0-9, ]+)\): complete checkpoint saved at step=(\d+)", text)
    assert saved, text[-4000:]
    step = int(saved.group(2))
    assert (run / "checkpoints" / f"step-{step}" / "COMPLETE").is_file()
    assert f"resumed from {run / 'checkpoints' / f'step-{step}'} at step={step}" in text, text[-4000:]
    first_run, second_run = text.split("resumed from", 1)
    assert int(re.search(r"\nstep=(\d+)/", second_run).group(1)) == step + 1, second_run[:3000]
    # srun reports the two tasks on one line ("tasks 0-1") when they end together, else one line each.
    both = "tasks 0-1: Exited with exit code 75" in first_run
    assert both or all(f"task {t}: Exited with exit code 75" in first_run for t in (0, 1)), first_run[-3000:]
    assert "forcing job termination" not in first_run and "killed by signal" not in first_run, first_run[-3000:]
    assert f"requeueing job {job_id} (checkpoint saved after " in first_run, first_run[-3000:]
    return saved.group(1), first_run


def test_launch_wait_keeps_exit_code_when_signal_and_exit_coincide() -> None:
    """slurm/common.sh's slurm_launch: a USR1 that arrives just as the launcher exits 75 must not turn into 138.

    The child signals the batch shell and exits at once, the race of a preempted job that saved and exited while the
    shell's trap ran; bash's own `wait` then returns 138 and sometimes loses the status. No SLURM daemons needed.
    """
    script = r"""
        SCRIPT_NAME=test SLURM_JOB_ID=1
        forward_signal() { return 0; }
        source slurm/common.sh
        wrong=0
        for i in $(seq 60); do
            signalled=""; _child=""
            slurm_launch bash -c 'kill -USR1 "$1"; exit 75' _ $$ > /dev/null
            [[ $rc == 75 ]] || { wrong=$((wrong + 1)); echo "exit 75 read as $rc"; }
            signalled=""; _child=""
            slurm_launch bash -c 'kill -TERM "$1"; sleep 0.02; exit 3' _ $$ > /dev/null
            [[ $rc == 3 ]] || { wrong=$((wrong + 1)); echo "exit 3 read as $rc"; }
        done
        signalled=""; _child=""
        slurm_launch true; [[ $rc == 0 ]] || { wrong=$((wrong + 1)); echo "exit 0 read as $rc"; }
        echo "wrong=$wrong"
    """
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "wrong=0" in proc.stdout, proc.stdout + proc.stderr


def test_launch_session_and_requeue_decisions() -> None:
    """slurm/common.sh without SLURM daemons. The launcher runs outside the batch shell's process group, which
    `scancel --full` signals (srun would kill its tasks). Exit 143 (ranks ended by a SIGTERM that reached the steps
    only, during start-up) is requeued, another crash is not. A job SLURM is already ending is requeued only after its
    time limit: a plain `scancel` sends SIGTERM too, the ranks save and exit 75, and the job must stay cancelled."""
    script = r"""
        SCRIPT_NAME=test SLURM_JOB_ID=7
        forward_signal() { return 0; }
        scontrol() { # `show job`: the state set below; `requeue`: recorded
            [[ $1 == show ]] && echo "   JobState=$STATE Reason=$REASON Dependency=(null)" || echo "scontrol $*"
        }
        source slurm/common.sh
        batch_group="$(ps -o pgid= -p $$)"
        slurm_launch bash -c '[[ "$(ps -o sid= -p $$)" -eq $$ && "$(ps -o pgid= -p $$)" -ne "$1" ]]' _ "$batch_group"
        echo "own session rc=$rc"
        STATE=RUNNING REASON=None
        (slurm_finish 143); echo "finish 143 exit=$?"
        (slurm_finish 1); echo "finish 1 exit=$?"
        STATE=COMPLETING REASON=None
        (slurm_finish 75); echo "cancelled exit=$?"
        STATE=COMPLETING REASON=TimeLimit
        (slurm_finish 75); echo "time limit exit=$?"
    """
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert "own session rc=0" in out, out
    assert "requeueing job 7 (the ranks were ended by SIGTERM (exit 143) before they could save" in out, out
    assert "finish 143 exit=0" in out, out
    assert "training failed with exit code 1; not requeued" in out and "finish 1 exit=1" in out, out
    assert "SLURM is already ending the job (JobState=COMPLETING Reason=None: cancelled" in out, out
    assert "cancelled exit=75" in out and "time limit exit=0" in out, out
    assert out.count("scontrol requeue 7") == 2, out


def test_one_node_two_tasks_trains_and_checkpoints(one_node: dict[str, str], images: Path, tmp_path: Path) -> None:
    log = tmp_path / "job.out"
    cmd = [*_sbatch_cmd(log, ["--wait", "--nodes=1", "--ntasks-per-node=2"]), *_tiny_job(tmp_path / "run", images, 3)]
    train = subprocess.Popen(cmd, env=one_node, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job_id = train.stdout.readline().strip().split(";")[0]
        assert job_id.isdigit(), train.stderr.read()
        # The conversion runs as a dependent job, as the README recommends.
        convert_log = tmp_path / "convert.out"
        convert = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--wait",
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
            timeout=900,
        )
        train_rc = train.wait(timeout=900)
    finally:
        if train.poll() is None:
            train.kill()
    text = log.read_text()
    assert train_rc == 0, text[-3000:]
    assert _job(one_node, job_id)["JobState"] == "COMPLETED"
    assert convert.returncode == 0, convert.stderr + convert_log.read_text()[-3000:]
    assert (tmp_path / "run" / "export" / "simmim-step-3.safetensors").is_file()
    assert (tmp_path / "run" / "export" / "backbone-step-3.safetensors").is_file()
    assert "rank=0 local_rank=0 world_size=2 nodes=1" in text and "rank=1 local_rank=1 world_size=2 nodes=1" in text
    assert "cpus/task=1 " in text  # SRUN_CPUS_PER_TASK: srun (22.05+) gets the job's --cpus-per-task
    assert "launcher=slurm" in text and "step=3/3" in text
    assert "training finished (exit 0); not requeued" in text
    assert (tmp_path / "run" / "checkpoints" / "step-3" / "COMPLETE").is_file()


def test_preemption_saves_requeues_and_resumes(one_node: dict[str, str], images: Path, tmp_path: Path) -> None:
    log = tmp_path / "job.out"
    # checkpoint.resume=none applies to the first start only: the requeued run must still resume.
    job_args = [*_tiny_job(tmp_path / "run", images, 60), "checkpoint.resume=none"]
    job_id = _sbatch(one_node, log, ["--nodes=1", "--ntasks-per-node=2"], job_args)
    _wait_for_step(log, 3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=one_node, check=True)
    _release_requeued(one_node, job_id, log)
    info = _wait_state(one_node, job_id, DONE)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    assert "received SIGUSR1" in text and "requeueing job" in text
    assert "requeued run: checkpoint.resume=auto added" in text
    saved = int(re.search(r"preempted \(SIGUSR1\): complete checkpoint saved at step=(\d+)", text).group(1))
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'step-{saved}'} at step={saved}" in text
    second_run = text.split("resumed from", 1)[1]
    first_step = int(re.search(r"step=(\d+)/60", second_run).group(1))
    assert first_step == saved + 1
    assert "step=60/60" in second_run and "training finished (exit 0); not requeued" in second_run


def test_sigterm_saves_and_restart_cap_stops_requeue(one_node: dict[str, str], images: Path, tmp_path: Path) -> None:
    """SIGTERM to the batch shell is handled like USR1 (checkpoint, exit 75); MAX_RESTARTS=0 forbids the requeue."""
    log = tmp_path / "job.out"
    env = {**one_node, "MAX_RESTARTS": "0"}
    job_id = _sbatch(env, log, ["--nodes=1", "--ntasks-per-node=1"], _tiny_job(tmp_path / "run", images, 60))
    _wait_for_step(log, 2)
    subprocess.run(["scancel", "--signal=TERM", "--batch", job_id], env=one_node, check=True)
    info = _wait_state(one_node, job_id, DONE, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0" and info["ExitCode"] == "75:0", text[-3000:]
    assert "received SIGTERM: asking every rank to save a checkpoint" in text, text[-3000:]
    saved = int(re.search(r"complete checkpoint saved at step=(\d+)", text).group(1))
    assert (tmp_path / "run" / "checkpoints" / f"step-{saved}" / "COMPLETE").is_file()
    assert (
        "not requeued: checkpoint saved after SIGTERM (exit 75), but the job has already been requeued 0 times "
        "(MAX_RESTARTS=0)" in text
    ), text[-3000:]
    assert "requeueing job" not in text


def test_sigterm_to_every_step_process_saves_requeues_and_resumes(
    one_node: dict[str, str], images: Path, tmp_path: Path
) -> None:
    """`scancel --signal=TERM <job>` sends SIGTERM to every process of the job's steps at once, each rank and its two
    data loader workers, but not to the batch shell: the ranks save and exit 75 on their own, srun returns 75 and the
    script requeues; the requeued run resumes from that checkpoint."""
    log, run = tmp_path / "job.out", tmp_path / "run"
    job_id = _sbatch(
        one_node, log, ["--nodes=1", "--ntasks-per-node=2"], [*_tiny_job(run, images, 500), "data.num_workers=2"]
    )
    _wait_for_step(log, 2)
    subprocess.run(["scancel", "--signal=TERM", job_id], env=one_node, check=True)
    signals, first_run = _resumed_after_signal(one_node, job_id, log, run)
    assert signals == "SIGTERM", first_run[-3000:]
    assert "received SIG" not in first_run  # the batch shell was not signalled
    assert f"requeueing job {job_id} (checkpoint saved after a signal (exit 75)" in first_run, first_run[-3000:]


def test_sigterm_to_batch_shell_and_steps_at_once_saves_requeues_and_resumes(
    one_node: dict[str, str], images: Path, tmp_path: Path
) -> None:
    """SIGTERM to every process of the job at once: `scancel --full` (the batch shell's process group: the shell, the
    launcher's wrapper and, were it there, srun) together with the steps (every rank and its data loader worker). srun
    must not get it (it would kill its tasks): the shell passes USR1 on through srun while the ranks have their own
    SIGTERM, both mean "save"; the ranks exit 75 and the job is requeued and resumes."""
    log, run = tmp_path / "job.out", tmp_path / "run"
    job_id = _sbatch(
        one_node, log, ["--nodes=1", "--ntasks-per-node=2"], [*_tiny_job(run, images, 500), "data.num_workers=1"]
    )
    _wait_for_step(log, 2)
    subprocess.run(["scancel", "--full", "--signal=TERM", job_id], env=one_node, check=True)
    subprocess.run(["scancel", "--signal=TERM", job_id], env=one_node, check=True)
    signals, first_run = _resumed_after_signal(one_node, job_id, log, run)
    assert "SIGTERM" in signals and set(signals.split(", ")) <= {"SIGTERM", "SIGUSR1"}, first_run[-3000:]
    assert "received SIGTERM: asking every rank to save a checkpoint" in first_run, first_run[-3000:]
    assert f"requeueing job {job_id} (checkpoint saved after SIGTERM (exit 75)" in first_run, first_run[-3000:]


def test_preemption_by_urgent_partition_saves_within_grace_time(
    one_node: dict[str, str], images: Path, tmp_path: Path
) -> None:
    """A real preemption (tests/slurm/cluster.sh: partition `urgent` preempts `debug`, PreemptMode=REQUEUE, GraceTime
    60 s): the processes of the running job's steps get SIGCONT + SIGTERM at once, its ranks save and exit 75 well
    within the grace time, the script requeues it, the urgent job runs, and the requeued job resumes from the
    checkpoint."""
    log, run = tmp_path / "job.out", tmp_path / "run"
    job_id = _sbatch(
        one_node, log, ["--nodes=1", "--ntasks-per-node=2"], [*_tiny_job(run, images, 500), "data.num_workers=1"]
    )
    _wait_for_step(log, 2)
    urgent_log = tmp_path / "urgent.out"
    urgent_cmd = ["sbatch", "--parsable", "--partition=urgent", "--exclusive", "--time=5", f"--output={urgent_log}"]
    urgent = subprocess.run(
        [*urgent_cmd, "--wrap", "echo urgent job ran"],
        env=one_node,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert urgent.returncode == 0, urgent.stderr
    urgent_id = urgent.stdout.strip().split(";")[0]
    urgent_info = _wait_state(one_node, urgent_id, DONE, timeout=300)
    assert urgent_info["JobState"] == "COMPLETED" and "urgent job ran" in urgent_log.read_text(), urgent_info
    # The urgent job got the node when the preempted job had saved and ended, not when SLURM killed it at the end
    # of the grace time.
    waited = _seconds(urgent_info["StartTime"]) - _seconds(urgent_info["SubmitTime"])
    assert waited < GRACE_TIME, (urgent_info, log.read_text()[-3000:])
    signals, first_run = _resumed_after_signal(one_node, job_id, log, run)
    # SIGTERM straight to the ranks; SLURM 22.05 leaves the batch shell out (SIGUSR1 would mean the shell had it too).
    assert "SIGTERM" in signals, first_run[-3000:]


def test_bad_config_fails_fast_and_is_not_requeued(one_node: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "job.out"
    job_id, rc = _sbatch_wait(
        one_node, log, ["--nodes=1", "--ntasks-per-node=1"], ["--config=configs/demo_cpu.yaml", "model.window_size=5"]
    )
    text = log.read_text()
    info = _job(one_node, job_id)
    assert rc == 2 and info["JobState"] == "FAILED" and info["Restarts"] == "0", text
    # Checked once in the batch shell before any rank starts: seconds, not the minutes of a collective timeout.
    assert _seconds(info["EndTime"]) - _seconds(info["StartTime"]) <= 60, info
    assert "config error: model.img_size=96 with model.window_size=5" in text
    assert "nothing was started; not requeued" in text and "srun" not in text.split("config error", 1)[1]
    # No config at all: refused before anything runs.
    log2 = tmp_path / "none.out"
    job_id, rc = _sbatch_wait(one_node, log2, ["--nodes=1", "--ntasks-per-node=1"], ["training.max_steps=1"])
    assert rc == 2 and _job(one_node, job_id)["Restarts"] == "0", log2.read_text()
    assert "no config given: pass --config FILE (or --config=FILE) or set CONFIG=FILE; not requeued" in log2.read_text()


def test_deepspeed_launcher_preemption_saves_and_requeues(
    one_node: dict[str, str], images: Path, tmp_path: Path
) -> None:
    """slurm/pretrain_deepspeed.sh: hostfile from the allocation, 2 ranks by the launcher; USR1 reaches them."""
    log = tmp_path / "job.out"
    env = {**one_node, "SLOTS_PER_NODE": "2", "DEEPSPEED": str(Path(PYTHON).parent / "deepspeed")}
    proc = subprocess.run(
        [
            *_sbatch_cmd(log, ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2"], "pretrain_deepspeed.sh"),
            *_tiny_job(tmp_path / "run", images, 60),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    try:
        _wait_for_step(log, 3)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=one_node, check=True)
        deadline = time.time() + 300
        while time.time() < deadline and "requeueing job" not in log.read_text():
            time.sleep(0.3)
        text = log.read_text()
        assert "hostfile" in text and "1 nodes x 2 processes" in text, text[-3000:]
        assert "rank=1 local_rank=1 world_size=2 nodes=1" in text, text[-3000:]
        assert "received SIGUSR1: asking every rank to save" in text, text[-3000:]
        assert "sending USR1 to the training processes on this node" in text, text[-3000:]
        saved = int(re.search(r"complete checkpoint saved at step=(\d+)", text).group(1))
        assert (tmp_path / "run" / "checkpoints" / f"step-{saved}" / "COMPLETE").is_file()
        assert f"requeueing job {job_id} (checkpoint saved after SIGUSR1 (exit 75)" in text
        assert _job(one_node, job_id).get("Restarts") == "1"
    finally:
        subprocess.run(["scancel", job_id], env=one_node, capture_output=True)
        (REPO / "logs" / f"hostfile-{job_id}").unlink(missing_ok=True)


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
        job_args = _tiny_job(tmp_path / "run", images, 3)
        job_args[:2] = ["--config=configs/demo_cpu.yaml"]  # the --config=FILE form
        job_id, rc = _sbatch_wait(two_nodes, log, ["--nodes=2", "--ntasks-per-node=1"], job_args)
        text = log.read_text()
        assert rc == 0 and _job(two_nodes, job_id)["JobState"] == "COMPLETED", text[-3000:]
        assert "rank=0 local_rank=0 world_size=2 nodes=2 host=n1" in text, text[-3000:]
        assert "rank=1 local_rank=0 world_size=2 nodes=2 host=n2" in text
        assert "master=n1:" in text and "step=3/3" in text and "training finished (exit 0); not requeued" in text
        assert (tmp_path / "run" / "checkpoints" / "step-3" / "COMPLETE").is_file()

    def test_deepspeed_launcher_on_two_nodes_uses_the_hostfile(
        self, images: Path, tmp_path: Path, two_nodes: dict[str, str]
    ) -> None:
        """The multi-node deepspeed launch needs ssh between nodes, so a stand-in launcher records what it was given:
        the hostfile of the real 2-node allocation, the master, and the environment file for the other nodes."""
        stub = tmp_path / "deepspeed"
        stub.write_text(
            "#!/usr/bin/env bash\n"
            'echo "launcher args: $*"\n'
            'hostfile="$2"; echo "hostfile lines: $(paste -sd, "$hostfile")"\n'
            'echo "env file: $(paste -sd, "$DS_ENV_FILE")"\n'
        )
        stub.chmod(0o755)
        log = tmp_path / "job.out"
        env = {**two_nodes, "DEEPSPEED": str(stub), "SLOTS_PER_NODE": "1", "MASTER_PORT": "23456"}
        job_id, rc = _sbatch_wait(
            env,
            log,
            ["--nodes=2", "--ntasks-per-node=1"],
            _tiny_job(tmp_path / "run", images, 3),
            "pretrain_deepspeed.sh",
        )
        try:
            text = log.read_text()
            assert rc == 0, text
            assert f"launcher args: --hostfile logs/hostfile-{job_id} --master_addr n1 --master_port 23456 " in text
            assert "--module pretrain --config configs/demo_cpu.yaml" in text
            assert "hostfile lines: n1 slots=1,n2 slots=1" in text, text
            assert "OMP_NUM_THREADS=1" in text.split("env file:", 1)[1], text
            assert "training finished (exit 0); not requeued" in text
        finally:
            for name in (f"hostfile-{job_id}", f"deepspeed_env-{job_id}"):
                (REPO / "logs" / name).unlink(missing_ok=True)
