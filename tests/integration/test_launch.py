"""Launch environments: the SLURM/torch variable mapping (unit) and real launches with torchrun and the deepspeed
launcher (2 local processes each; 2 torchrun "nodes" on 127.0.0.1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.__main__ import main
from pretrain.distributed import LaunchError, resolve_launch_env
from tests.helpers.launch import REPO, free_port, losses, tiny_overrides

BIN = Path(sys.executable).parent


def test_single_process_without_launcher() -> None:
    env: dict[str, str] = {}
    launch = resolve_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (0, 1, 0, "none")
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["MASTER_ADDR"] == "127.0.0.1"


def test_torch_launcher_variables_and_deepspeed_local_rank_argument() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "node1", "MASTER_PORT": "1234", "LOCAL_WORLD_SIZE": "2"}
    launch = resolve_launch_env(env, local_rank_arg=1)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.num_nodes) == (
        3,
        4,
        1,
        "node1",
        2,
    )


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "LOCAL_RANK": "0"}, "MASTER_PORT"),
        ({"RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1", "LOCAL_RANK": "0"}, "WORLD_SIZE"),
        ({"MASTER_ADDR": "a"}, "RANK and WORLD_SIZE missing"),
        ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1", "LOCAL_RANK": "0"}, "RANK='x'"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1", "LOCAL_RANK": "0"}, "outside"),
        ({"SLURM_PROCID": "0", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "MASTER_ADDR": "a"}, "SLURM_LOCALID"),
    ],
)
def test_partial_environments_name_what_is_missing(env: dict[str, str], missing: str) -> None:
    with pytest.raises(LaunchError, match=missing):
        resolve_launch_env(dict(env))


def test_slurm_mapping_with_explicit_master() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "123456",
        "SLURM_NNODES": "4",
        "SLURM_JOB_NODELIST": "gpu[01-04]",
        "MASTER_ADDR": "gpu01",
    }
    launch = resolve_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher, launch.num_nodes) == (
        5,
        8,
        1,
        "slurm",
        4,
    )
    assert launch.master_port == 20000 + 123456 % 20000
    assert env["RANK"] == "5" and env["MASTER_PORT"] == str(20000 + 123456 % 20000)


def test_slurm_without_scontrol_says_to_set_master(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_ID": "1",
        "SLURM_JOB_NODELIST": "n[1-2]",
    }
    with pytest.raises(LaunchError, match="set MASTER_ADDR"):
        resolve_launch_env(env)


def test_overrides_before_and_after_options(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m pretrain a=1 --config X b=2`: overrides on both sides of the options are all applied, in order."""
    recipe = "configs/demo_cpu.yaml"
    code = main(["training.seed=7", "--config", recipe, "training.max_steps=2", "--print-config", "data.hflip=0.25"])
    out = capsys.readouterr().out
    assert code == 0
    assert "seed: 7" in out and "max_steps: 2" in out and "hflip: 0.25" in out
    assert "size: tiny" in out  # from the YAML recipe in between
    assert main(["training.max_steps=2", "--config", recipe, "training.max_steps=3", "--print-config"]) == 0
    assert "max_steps: 3" in capsys.readouterr().out  # the later override wins


@pytest.fixture(scope="module")
def images(image_folder) -> Path:
    return image_folder(16)


def _clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")
    }
    env["OMP_NUM_THREADS"] = "1"
    return env


def _check_run(run_dir: Path, proc: subprocess.CompletedProcess, world: int) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert f"world_size={world}" in output
    assert sorted(losses(run_dir)) == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh"])
def test_launch_scripts_two_local_processes(script: str, tmp_path: Path, images: Path) -> None:
    """launch/torchrun.sh and launch/deepspeed.sh (which passes --local_rank) each run 2 ZeRO-2 steps, 2 processes."""
    args = tiny_overrides(tmp_path / "run", images, **{"training.max_steps": 2, "distributed.zero_stage": 2})
    env = {
        **_clean_env(),
        "NPROC": "2",
        "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "DEEPSPEED": str(BIN / "deepspeed"),
    }
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    _check_run(tmp_path / "run", proc, 2)


@pytest.mark.slow
def test_two_torchrun_nodes_on_loopback(tmp_path: Path, images: Path) -> None:
    args = tiny_overrides(tmp_path / "run", images, **{"training.max_steps": 2, "distributed.zero_stage": 1})
    port = str(free_port())
    procs = [
        subprocess.Popen(
            ["bash", str(REPO / "launch" / "torchrun.sh"), *args],
            cwd=REPO,
            env={
                **_clean_env(),
                "NNODES": "2",
                "NODE_RANK": str(node),
                "NPROC": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "PYTHON": sys.executable,
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "nodes=2" in outputs[0] and "world_size=2" in outputs[0]
    assert sorted(losses(tmp_path / "run")) == [1, 2]


@pytest.mark.slow
def test_plain_python_without_any_launcher_variable(tmp_path: Path, images: Path) -> None:
    """`python -m pretrain` in an environment holding no launcher variable at all trains as world size 1."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("training:\n  precision: fp32\n  device: cpu\n")
    args = tiny_overrides(tmp_path / "run", images, **{"training.max_steps": 2})
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path)), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", *args[:3], "--config", str(recipe), *args[3:]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    _check_run(tmp_path / "run", proc, 1)
    assert "launcher=none" in proc.stdout
    log = (tmp_path / "run" / "train.log").read_text()
    assert "world_size=1" in log and "step=2/2" in log


def test_finish_process_flushes_output_and_skips_interpreter_teardown(tmp_path: Path) -> None:
    """finish_process exits with the given code after flushing buffered stdout and logging files, and no teardown code
    runs after it (an atexit handler and a finaliser stand for the interpreter's teardown, where a gloo worker thread
    can abort a finished rank); a failing run's code reaches the caller the same way."""
    log_file, teardown_file = tmp_path / "run.log", tmp_path / "teardown-ran"
    script = f"""
import atexit, logging, sys
from pathlib import Path
from pretrain.distributed import finish_process

class Finaliser:
    def __del__(self):
        Path({str(teardown_file)!r}).write_text("finaliser")

keep = Finaliser()
atexit.register(Path({str(teardown_file)!r}).write_text, "atexit")
logging.basicConfig(filename={str(log_file)!r}, level=logging.INFO)
logging.info("logged before leaving")
sys.stdout.write("buffered, no newline")
finish_process(int(sys.argv[1]))
"""
    for code in (0, 3):
        proc = subprocess.run(
            [sys.executable, "-c", script, str(code)], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == code, proc.stderr
        assert proc.stdout == "buffered, no newline"
        assert "logged before leaving" in log_file.read_text()
        assert not teardown_file.exists()


def test_entry_point_unexpected_error_prints_traceback_and_exits_1() -> None:
    """An error that main() does not turn into an exit code still ends the process through finish_process: the
    traceback on stderr, exit code 1."""
    script = "import pretrain.__main__ as entry\nentry.main = lambda: 1 / 0\nentry.cli()\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr


def test_console_script_runs_the_entry_point(tmp_path: Path) -> None:
    """The installed ``swinv2-pretrain`` script is the same entry point as ``python -m pretrain``."""
    script = Path(sys.executable).parent / "swinv2-pretrain"
    proc = subprocess.run(
        [str(script), "--print-config", "training.max_steps=7", f"training.output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 7" in proc.stdout
    bad = subprocess.run([str(script), "--print-config", "training.max_step=7"], capture_output=True, text=True)
    assert bad.returncode == 2 and "training.max_step" in bad.stderr
