"""Checkpoint pieces that need no engine: config comparison, the integrity check of older markers, atomic outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pretrain.atomic import atomic_output
from pretrain.checkpoint import (
    CheckpointError,
    compare_configs,
    find_damage,
    read_marker,
    remove_cut_short,
    set_aside_previous_run,
)
from pretrain.config import load_config, to_dict


# ------------------------------------------------------------------------------------------ config comparison
def test_architecture_changes_are_told_from_other_changes() -> None:
    base = to_dict(load_config(None, ["model.size=tiny"]))
    changed = to_dict(
        load_config(
            None,
            [
                "model.size=tiny",
                "model.window_size=6",
                "model.extra_norm_every=2",
                "data.batch_size=16",
                "model.drop_path_rate=0.3",
                "training.precision=fp32",
            ],
        )
    )
    diff = compare_configs(base, changed)
    assert [key for key, _, _ in diff.architecture] == ["model.extra_norm_every", "model.window_size"]
    assert ("model.window_size", [12, 12, 12, 12], [6, 6, 6, 6]) in diff.architecture
    others = {key for key, _, _ in diff.other}
    assert {"data.batch_size", "model.drop_path_rate", "training.precision"} <= others
    assert "model.window_size: [12, 12, 12, 12] -> [6, 6, 6, 6]" in diff.describe(diff.architecture)


def test_values_left_to_the_model_size_compare_as_resolved() -> None:
    implicit = to_dict(load_config(None, ["model.size=tiny"]))
    explicit = to_dict(load_config(None, ["model.size=tiny", "model.embed_dim=96", "model.depths=[2,2,6,2]"]))
    assert compare_configs(implicit, explicit).architecture == []
    small = to_dict(load_config(None, ["model.size=small"]))
    diff = compare_configs(implicit, small)
    assert diff.architecture == [("model.depths", [2, 2, 6, 2], [2, 2, 18, 2])]
    assert ("model.size", "tiny", "small") in diff.other


def test_keys_of_another_schema_version_are_listed_not_refused() -> None:
    current = to_dict(load_config(None, ["model.size=tiny"]))
    saved = json.loads(json.dumps(current))
    del saved["model"]["patch_norm"], saved["checkpoint"]["lock_stale_hours"]
    diff = compare_configs(saved, current)
    assert diff.architecture == []
    assert ("model.patch_norm", "<absent>", True) in diff.other
    assert ("checkpoint.lock_stale_hours", "<absent>", 1.0) in diff.other


# ---------------------------------------------------------------------------- integrity of older checkpoints
def _old_checkpoint(tag_dir: Path, stage: int = 2, world: int = 2) -> Path:
    """A checkpoint as DeepSpeed writes it, with the marker of before the file list (real torch files)."""
    tag_dir.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(1000)}, "step": 3}, tag_dir / "mp_rank_00_model_states.pt")
    for rank in range(world if stage else 0):
        torch.save({"state": torch.ones(1000)}, tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    (tag_dir / "COMPLETE").write_text(json.dumps({"step": 3, "world_size": world, "zero_stage": stage}))
    return tag_dir


def test_older_markers_get_a_structural_check(tmp_path: Path) -> None:
    whole = _old_checkpoint(tmp_path / "a" / "step-3")
    assert find_damage(whole) is None
    assert find_damage(_old_checkpoint(tmp_path / "stage0" / "step-3", stage=0)) is None
    bf16 = _old_checkpoint(tmp_path / "bf16" / "step-3")
    for path in bf16.glob("zero_pp_rank_*"):  # DeepSpeed's names under bf16
        path.rename(path.with_name("bf16_" + path.name))
    assert find_damage(bf16) is None

    truncated = _old_checkpoint(tmp_path / "b" / "step-3")
    shard = truncated / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(size - 10)
    assert find_damage(truncated) == (
        f"zero_pp_rank_1_mp_rank_00_optim_states.pt is not a whole torch file ({size - 10} bytes, no zip directory "
        f"at its end: cut short)"
    )
    empty = _old_checkpoint(tmp_path / "c" / "step-3")
    (empty / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert find_damage(empty) == "mp_rank_00_model_states.pt is empty (0 bytes)"
    missing = _old_checkpoint(tmp_path / "d" / "step-3")
    for path in missing.glob("*optim_states.pt"):
        path.unlink()
    assert find_damage(missing) == (
        "zero_pp_rank_0_mp_rank_00_optim_states.pt, zero_pp_rank_1_mp_rank_00_optim_states.pt are missing (ZeRO-2 "
        "at world size 2 writes one per rank)"
    )
    no_model = _old_checkpoint(tmp_path / "e" / "step-3")
    (no_model / "mp_rank_00_model_states.pt").unlink()
    assert find_damage(no_model) == "it holds no *model_states.pt file"


def test_garbled_markers(tmp_path: Path) -> None:
    cases = {
        b"": "its COMPLETE marker is empty (0 bytes)",
        b"\x00\x01garbage": "its COMPLETE marker is not a JSON record (9 bytes of something else)",
        b"[1, 2]": "its COMPLETE marker lacks step, world_size, zero_stage (garbled)",
        b'{"step": 4, "world_size": 2, "zero_stage": 2}': "its COMPLETE marker records step 4, not 3",
    }
    for i, (content, damage) in enumerate(cases.items()):
        tag_dir = _old_checkpoint(tmp_path / str(i) / "step-3")
        (tag_dir / "COMPLETE").write_bytes(content)
        assert find_damage(tag_dir) == damage, content
    with pytest.raises(CheckpointError, match=r"COMPLETE: the marker is unreadable \(9 bytes, "):
        (tag_dir / "COMPLETE").write_bytes(b"\x00\x01garbage")
        read_marker(tag_dir)


# ------------------------------------------------------------------------------------------------ start-up
def test_fresh_start_leaves_an_unused_directory_alone_and_moves_metrics_without_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "train.log").write_text("log\n")
    assert set_aside_previous_run(run) == (None, [])
    # An earlier run that never saved a checkpoint: its metrics would be trimmed away by the new run's start.
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    dest, moved = set_aside_previous_run(run)
    assert moved == ["metrics.jsonl"] and (dest / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert dest.parent == run / "previous" and (run / "checkpoints").is_dir() and (run / "train.log").is_file()


def test_cut_short_removal_keeps_complete_and_earlier_folders(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        (ckpt / f"step-{step}").mkdir(parents=True)
    for step in (2, 4):
        (ckpt / f"step-{step}" / "COMPLETE").write_text("{}")
    (ckpt / "step-4_universal").mkdir()
    assert remove_cut_short(ckpt, 2) == ["step-3"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-1", "step-2", "step-4", "step-4_universal"]


# ------------------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_atomic_directory_outputs_follow_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        with atomic_output(tmp_path / "out", directory=True) as tmp:
            (tmp / "a.txt").write_text("a")
        with atomic_output(tmp_path / "file.txt") as tmp:
            tmp.write_text("b")
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "file.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "out"]
    with pytest.raises(FileExistsError), atomic_output(tmp_path / "out", directory=True):
        pass
    with pytest.raises(RuntimeError, match="body failed"), atomic_output(tmp_path / "new") as tmp:
        tmp.write_text("half")
        raise RuntimeError("body failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "out"]
