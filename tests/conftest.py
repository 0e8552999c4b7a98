"""Fixtures shared by the unit and integration tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.launch import make_image_folder


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
