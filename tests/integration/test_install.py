"""Installing the project into an environment that already has a torch keeps that torch (as on a GPU cluster, where
the site's container or module provides torch and `pip install -e .` must not replace it).

The environment is a new venv that sees the project venv's packages (its torch among them) through a .pth file, the
way a site's packages sit beside a user's; pip installs the project into it offline, from the package metadata."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from tests.helpers.launch import REPO

pytestmark = pytest.mark.slow


def _site_env(root: Path) -> Path:
    """A venv at ``root`` (no pip of its own) whose sys.path ends with this interpreter's site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "site_packages_of_the_cluster.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_pip_install_keeps_the_torch_already_there(tmp_path: Path) -> None:
    python = _site_env(tmp_path / "env")
    report = tmp_path / "report.json"
    # Offline and without pip's configuration (indexes, find-links, constraints): only the metadata decides.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    proc = subprocess.run(
        [python, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--report", str(report), "-e", "."],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    installed = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert installed == ["swinv2-pretrain"]  # nothing else: torch, torchvision and DeepSpeed were kept

    probe = (
        "import importlib.metadata as md, json, torch, pretrain; "
        "print(json.dumps([torch.__version__, torch.__file__, pretrain.__file__, md.requires('swinv2-pretrain')]))"
    )
    out = subprocess.run([python, "-c", probe], cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    version, torch_file, pretrain_file, requires = json.loads(out.stdout)
    assert (version, torch_file) == (torch.__version__, torch.__file__)  # the same build from the same place
    assert Path(pretrain_file).parent == REPO / "pretrain"  # the editable install of this checkout

    # The declared range admits the torch builds a cluster brings: NGC's pre-release builds, local CUDA/ROCm builds
    # and later releases; no exact pin.
    torch_req = next(Requirement(r) for r in requires if Requirement(r).name == "torch")
    for site_build in ("2.13.0", "2.13.0a0+ecf3bae40a.nv26.01", "2.14.1+cu130", "2.14.1+rocm7.1", "2.16.0"):
        assert torch_req.specifier.contains(site_build, prereleases=True), (str(torch_req), site_build)
    assert not torch_req.specifier.contains("2.12.1")
    extras = {Requirement(r).marker and str(Requirement(r).marker) for r in requires} - {None}
    assert 'extra == "demo"' in extras and 'extra == "wandb"' in extras and 'extra == "mlflow"' in extras
    scikit = [Requirement(r) for r in requires if Requirement(r).name == "scikit-image"]
    assert [str(req.marker) for req in scikit] == ['extra == "demo"']  # the demo's photos only
