"""Fixtures shared by the unit and integration tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers.launch import make_image_folder

if TYPE_CHECKING:
    from pretrain.distributed import LaunchEnv


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``image_folder(count, corrupt=0)``: a folder of ``count`` random RGB images in two class subfolders, plus
    ``corrupt`` unreadable files; made once per session for each (count, corrupt) and shared read-only."""
    made: dict[tuple[int, int], Path] = {}

    def make(count: int, corrupt: int = 0) -> Path:
        if (count, corrupt) not in made:
            root = make_image_folder(tmp_path_factory.mktemp(f"images-{count}-{corrupt}"), count)
            for i in range(corrupt):
                (root / f"class{i % 2}" / f"broken{i}.jpg").write_bytes(b"not an image " * (i + 1))
            made[(count, corrupt)] = root
        return made[(count, corrupt)]

    return make


@pytest.fixture(scope="session")
def single_rank() -> Iterator[LaunchEnv]:
    """This test process as rank 0 of a world of one (gloo): the environment a trainer built in-process needs.

    Session-wide: DeepSpeed keeps its communication object across trainers, so the process group is created once
    (by the first trainer) and destroyed at the end of the session only."""
    from pretrain.distributed import LaunchEnv, free_port

    port = free_port()
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield LaunchEnv(0, 1, 0, "127.0.0.1", port, "none", 1)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
