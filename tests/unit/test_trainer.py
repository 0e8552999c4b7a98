"""The trainer in-process (one rank, gloo): the non-finite guard, the accumulation boundary, the stop flag and the
saved state. The engines are built once per module; each test drives a few real optimizer steps."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pretrain.config import load_config
from pretrain.distributed import LaunchEnv
from pretrain.stopping import EXIT_INTERRUPTED, EXIT_PREEMPTED, NonFiniteError, StopFlag
from pretrain.tasks.simmim import SimMIMTask
from pretrain.train_state import TrainState
from pretrain.trainer import Trainer
from tests.helpers.launch import read_records
from tests.helpers.tiny import TINY_MODEL


class _NonFiniteGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


class PoisonableTask(SimMIMTask):
    """SimMIM whose next losses can be made non-finite (``poison="loss"``) or their gradients (``"grads"``)."""

    poison: str | None = None

    def loss(self, engine: Any, batch: dict, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        loss = super().loss(engine, batch, device, dtype)
        if self.poison == "loss":
            return loss * float("inf")
        if self.poison == "grads":
            return _NonFiniteGradient.apply(loss)
        return loss


@pytest.fixture(scope="module")
def make_trainer(
    single_rank: LaunchEnv, image_folder: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Trainer]]:
    made: list[Trainer] = []

    def make(*overrides: str) -> Trainer:
        cfg = load_config(
            None,
            [
                *TINY_MODEL,
                "data.source=folder",
                f"data.path={image_folder(16)}",
                "data.batch_size=2",
                "data.num_workers=0",
                "training.device=cpu",
                "training.precision=fp32",
                f"training.output_dir={tmp_path_factory.mktemp('run')}",
                "logging.image_every=0",
                "logging.tensorboard=false",
                "logging.progress_bar=false",
                *overrides,
            ],
        )
        trainer = Trainer(cfg, single_rank, PoisonableTask(cfg))
        made.append(trainer)
        return trainer

    yield make
    for trainer in made:
        trainer.close()


def batches_of(trainer: Trainer) -> Iterator[dict]:
    return iter(trainer.task.batches(rank=0, world_size=1, epoch=trainer.state.epoch, start_step=0))


def weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.engine.module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("poison", ["loss", "grads"])
def test_a_non_finite_step_is_skipped_counted_and_stops_after_the_limit(
    make_trainer: Callable[..., Trainer], poison: str
) -> None:
    trainer = make_trainer("training.max_nonfinite_steps=2")
    batches = batches_of(trainer)
    trainer.finish_step(trainer.train_step(batches))  # one good step: the weights move
    before = weights(trainer)
    trainer.task.poison = poison
    stats = trainer.train_step(batches)
    assert not stats.applied and (stats.nonfinite_loss if poison == "loss" else stats.nonfinite_grads)
    trainer.finish_step(stats)
    assert same(before, weights(trainer))  # update skipped
    s = trainer.state
    assert (s.step, s.nonfinite_steps, s.images_seen, s.epoch_samples) == (2, 1, 2, 4)  # step counted, images not
    assert all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())
    with pytest.raises(NonFiniteError, match=r"2 non-finite .* in a row \(training\.max_nonfinite_steps=2\)"):
        trainer.finish_step(trainer.train_step(batches))
    trainer.task.poison = None
    stats = trainer.train_step(batches)  # a good step after the bad ones is applied again
    assert stats.applied and not same(before, weights(trainer))


def test_accumulation_applies_one_update_at_the_boundary(make_trainer: Callable[..., Trainer]) -> None:
    trainer = make_trainer("training.grad_accum_steps=3")
    consumed: list[dict] = []

    def counting() -> Iterator[dict]:
        for batch in batches_of(trainer):
            consumed.append(batch)
            yield batch

    batches = counting()
    before = weights(trainer)
    stats = trainer.train_step(batches)
    assert len(consumed) == 3 and stats.samples == 6 and stats.applied
    assert trainer.engine.global_steps == 1 and not same(before, weights(trainer))
    trainer.finish_step(stats)
    assert (trainer.state.step, trainer.state.epoch_samples, trainer.state.images_seen) == (1, 6, 6)
    # The loss of the step is the mean over its micro-batches, still on the device until a log step reads it.
    assert isinstance(stats.loss, torch.Tensor) and torch.isfinite(stats.loss)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, EXIT_PREEMPTED), (signal.SIGINT, EXIT_INTERRUPTED)])
def test_a_stop_signal_saves_at_the_step_boundary(make_trainer: Callable[..., Trainer], signum: int, code: int) -> None:
    trainer = make_trainer("checkpoint.every_steps=1000")
    batches = batches_of(trainer)
    trainer.finish_step(trainer.train_step(batches))
    os.kill(os.getpid(), signum)  # the handler only sets a flag; the step finishes
    stats = trainer.train_step(batches)
    assert stats.stop and stats.applied
    assert trainer.finish_step(stats) == code
    assert (trainer.ckpt_dir / "step-2" / "COMPLETE").is_file()


def test_a_second_sigint_interrupts_at_once() -> None:
    flag = StopFlag()
    previous = signal.getsignal(signal.SIGINT)
    flag.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.interrupt and flag.received == ["SIGINT"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGINT) is previous


def test_train_state_round_trip_and_older_formats() -> None:
    state = TrainState(step=7, epoch=1, epoch_samples=12, images_seen=40, skipped_samples=2, nonfinite_steps=1)
    saved = state.state_dict()
    assert saved["format_version"] == TrainState.FORMAT_VERSION
    loaded = TrainState()
    loaded.load_state_dict(saved)
    assert loaded == state
    # Format 1 stored the data position in per-rank batches of the saving run.
    old = {"step": 5, "epoch": 0, "data_position": 3, "config": {"data": {"batch_size": 4}}, "world_size": 2}
    loaded = TrainState()
    loaded.load_state_dict(old)
    assert (loaded.step, loaded.epoch_samples) == (5, 24)
    with pytest.raises(ValueError, match="newer than this code understands"):
        TrainState().load_state_dict({**saved, "format_version": TrainState.FORMAT_VERSION + 1})


def test_train_runs_to_max_steps_with_a_profiler_window(make_trainer: Callable[..., Trainer]) -> None:
    trainer = make_trainer(
        "training.max_steps=3",
        "training.profile.enabled=true",
        "training.profile.start_step=2",
        "training.profile.steps=1",
        "training.profile.warmup_steps=1",
    )
    assert trainer.train() == 0
    assert trainer.state.step == 3 and (trainer.ckpt_dir / "step-3" / "COMPLETE").is_file()
    traces = sorted(p.name for p in (trainer.run_dir / "profile").iterdir())
    assert traces == ["rank0.steps2-2.pt.trace.json.gz", "rank0.steps2-2.txt"]


def test_one_host_read_per_optimizer_step_whatever_the_accumulation(
    make_trainer: Callable[..., Trainer], image_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU each host read of a device value stalls the host until the device catches up: the step reads one
    small reduction at its boundary, never per micro-batch (the loss stays on the device until a log step)."""
    import sys

    trainer = make_trainer("training.grad_accum_steps=4", "logging.log_every=1000", f"data.path={image_folder(24)}")
    batches = batches_of(trainer)
    trainer.finish_step(trainer.train_step(batches))  # the first step also counts the model's FLOPs once
    ours = (str(Path(__file__).parents[2] / "pretrain"), str(Path(__file__).parents[2] / "swinv2"))
    reads: list[str] = []

    def counted(name: str) -> Callable[..., Any]:
        original = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(ours):
                reads.append(f"{name} in {caller.co_name} ({Path(caller.co_filename).name})")
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    for _ in range(2):
        trainer.finish_step(trainer.train_step(batches))
    assert len(reads) == 2, reads


def test_a_mixture_logs_its_samples_per_source(
    make_trainer: Callable[..., Trainer], image_folder: Callable[..., Path], tmp_path: Path
) -> None:

    from pretrain.shards import write_shards

    write_shards(image_folder(16), tmp_path / "a", maxcount=4, progress=False)
    write_shards(image_folder(24), tmp_path / "b", maxcount=4, progress=False)
    big, small = tmp_path / "a", tmp_path / "b"
    sources = f"[{{path: '{big}', weight: 3, name: big}}, {{path: '{small}', weight: 1, name: small}}]"
    trainer = make_trainer(
        "data.source=webdataset",
        "data.path=''",
        f"data.sources={sources}",
        "data.batch_size=4",
        "data.shuffle_buffer=4",
        "training.max_steps=2",
        "logging.log_every=2",
    )
    assert trainer.train() == 0
    records = read_records(trainer.run_dir)
    (record,) = [r for r in records if "loss" in r]
    assert record["source_samples/big"] + record["source_samples/small"] == 8  # two steps of 4
    assert record["source_samples/big"] == 6  # the 3:1 plan, to within one sample per step


def test_non_finite_weights_are_never_saved(make_trainer: Callable[..., Trainer]) -> None:
    trainer = make_trainer("distributed.zero_stage=0")
    batches = batches_of(trainer)
    trainer.finish_step(trainer.train_step(batches))
    trainer.save()
    with torch.no_grad():
        next(iter(trainer.engine.module.parameters())).fill_(float("nan"))  # as a bad update would leave them
    trainer.finish_step(trainer.train_step(batches))  # the step sees a non-finite loss and skips its update
    with pytest.raises(NonFiniteError, match=r"weights are non-finite at step=2: no checkpoint is written"):
        trainer.save()
    complete = sorted(p.parent.name for p in trainer.ckpt_dir.glob("step-*/COMPLETE"))
    assert complete == ["step-1"] and not (trainer.ckpt_dir / "step-2").exists()
    with pytest.raises(NonFiniteError, match="the weights became non-finite in the update of step=2"):
        trainer.finish_step(trainer.train_step(batches))  # the next step's reduction carries the flag to every rank


@pytest.mark.parametrize(
    "setting",
    [
        ("distributed.zero_stage=0",),
        ("distributed.zero_stage=2", "training.precision=bf16"),
        ("distributed.zero_stage=3",),
    ],
)
def test_the_second_step_logs_measured_against_predicted_memory(
    make_trainer: Callable[..., Trainer], setting: tuple[str, ...]
) -> None:
    """Every run calibrates the planner: its predicted peak at start, the measured peak of step 2 (the first steady
    one) after it, within the planner's 10%."""
    trainer = make_trainer("training.max_steps=2", *setting)
    assert trainer.train() == 0
    log = (trainer.run_dir / "train.log").read_text()
    records = read_records(trainer.run_dir)
    (memory,) = [r for r in records if "memory/measured_peak_gib" in r]
    assert memory["step"] == 2
    assert f"memory: predicted peak {memory['memory/predicted_peak_gib']:.3f} GiB per rank" in log
    assert f"memory: measured peak {memory['memory/measured_peak_gib']:.3f} GiB in step 2" in log
    ratio = memory["memory/measured_peak_gib"] / memory["memory/predicted_peak_gib"]
    assert memory["memory/measured_over_predicted"] == pytest.approx(ratio)
    assert 0.9 <= ratio <= 1.1, log
