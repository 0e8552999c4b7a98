"""The torch.profiler window of training.profile: a tiny model doing real optimizer steps on the CPU, traced only
inside the configured window and on the configured ranks."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain.checks import ConfigError
from pretrain.profiling import ProfileConfig, ProfileWindow


def _train(window: ProfileWindow, steps: range) -> None:
    """Real optimizer steps of a small MLP; each step is labelled ``test_step_N`` so a trace shows which ran in it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in steps:
        with torch.profiler.record_function(f"test_step_{step}"):
            loss = model(torch.randn(16, 32)).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        window.step(step)
    window.close()


def _labels(trace: Path) -> set[str]:
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    return {e["name"] for e in events if e.get("name", "").startswith("test_step_")}


def test_trace_holds_exactly_the_window(tmp_path: Path) -> None:
    cfg = ProfileConfig(enabled=True, start_step=3, steps=2, warmup_steps=1, ranks=[0])
    window = ProfileWindow(cfg, tmp_path, rank=0)
    assert window.note == f"profiler: steps 3-4 traced into {tmp_path / 'profile'}"
    _train(window, range(1, 8))
    trace = tmp_path / "profile" / "rank0.steps3-4.pt.trace.json.gz"
    assert window.trace_files == [trace]
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == [trace.name, "rank0.steps3-4.txt"]
    assert _labels(trace) == {"test_step_3", "test_step_4"}  # not the warm-up step 2, nothing after step 4
    table = (tmp_path / "profile" / "rank0.steps3-4.txt").read_text()
    assert table.startswith("optimizer steps 3-4, rank 0") and "aten::addmm" in table


def test_window_from_the_first_step_and_a_run_that_stops_inside_it(tmp_path: Path) -> None:
    cfg = ProfileConfig(enabled=True, start_step=1, steps=5, warmup_steps=0, ranks=[])
    window = ProfileWindow(cfg, tmp_path, rank=3)  # [] = every rank
    _train(window, range(1, 3))  # the run ends (preempted) after step 2, inside the window
    trace = tmp_path / "profile" / "rank3.steps1-2.pt.trace.json.gz"
    assert window.trace_files == [trace] and _labels(trace) == {"test_step_1", "test_step_2"}
    # A later start tracing the same steps again (resumed from an earlier checkpoint) never replaces the trace.
    window = ProfileWindow(cfg, tmp_path, rank=3)
    _train(window, range(1, 3))
    assert window.trace_files == [tmp_path / "profile" / "rank3.steps1-2.1.pt.trace.json.gz"]
    assert len(list((tmp_path / "profile").glob("*.pt.trace.json.gz"))) == 2


def test_no_trace_off_window_off_ranks_or_when_disabled(tmp_path: Path) -> None:
    cfg = ProfileConfig(enabled=True, start_step=3, steps=2, ranks=[0, 2])
    other_rank = ProfileWindow(cfg, tmp_path / "a", rank=1)
    assert other_rank.note == "profiler: rank 1 is not in training.profile.ranks=[0, 2]"
    _train(other_rank, range(1, 6))
    resumed = ProfileWindow(cfg, tmp_path / "b", rank=0, start_step=2)  # warm-up at step 2 is behind the run
    assert "not ahead of step=2 where this run continues: nothing traced" in resumed.note
    _train(resumed, range(3, 6))
    disabled = ProfileWindow(ProfileConfig(), tmp_path / "c", rank=0)
    _train(disabled, range(1, 12))
    before = ProfileWindow(cfg, tmp_path / "d", rank=0)
    _train(before, range(1, 2))  # the run ends before the window: nothing traced
    assert not any(tmp_path.rglob("*.json.gz")) and not any(tmp_path.rglob("*.txt"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("start_step", 0, "training.profile.start_step=0; accepted: 1 or more"),
        ("steps", 0, "training.profile.steps=0; accepted: 1 or more"),
        ("warmup_steps", 3, "training.profile.warmup_steps=3 with start_step=3; accepted: 0 <= warmup_steps"),
        ("warmup_steps", -1, "training.profile.warmup_steps=-1 with start_step=3"),
        ("ranks", [0, 0], r"training.profile.ranks=\[0, 0\]; accepted: distinct ranks >= 0"),
        ("ranks", [-1], r"training.profile.ranks=\[-1\]"),
    ],
)
def test_profile_config_check(field: str, value: object, message: str) -> None:
    cfg = ProfileConfig(enabled=True, start_step=3)
    setattr(cfg, field, value)
    with pytest.raises(ConfigError, match=message):
        cfg.check()
    ProfileConfig().check()
