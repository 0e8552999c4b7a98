"""consolidate / universal on real DeepSpeed checkpoints written by 2 gloo processes (ZeRO-0, 2 and 3; fp32, and
bf16 for ZeRO-0 and 2).

Run as a script, this file is the worker: ``python tests/test_convert_deepspeed.py train|resume ...``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain import convert
from pretrain.formats import load_weights_file
from tests.helpers.launch import free_port, rank_env

pytestmark = pytest.mark.slow

MODEL = {
    "img_size": 64,
    "window_size": 4,
    "embed_dim": 32,
    "depths": [2, 2, 2, 2],
    "num_heads": [1, 2, 4, 8],
    "pretrained_window_sizes": [0, 0, 0, 0],
    "drop_path_rate": 0.0,
}
STEPS = 2


# ------------------------------------------------------------------------------------------------- the worker
def _config():
    from pretrain.config import load_config

    overrides = [f"model.{k}={v}".replace(" ", "") for k, v in MODEL.items()]
    return load_config(None, ["model.size=tiny", *overrides])


def _build_model() -> torch.nn.Module:
    """The SimMIM training model (official SimMIM keys: encoder.*, encoder.mask_token, decoder.0.*)."""
    from pretrain.simmim import build_simmim

    return build_simmim(_config())


def _batch(seed: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, MODEL["img_size"], MODEL["img_size"], generator=gen)
    side = MODEL["img_size"] // 4
    mask = (torch.rand(batch, side, side, generator=gen) < 0.6).float()
    return images, mask


def _engine(stage: int, universal: bool = False, bf16: bool = False):
    import deepspeed

    torch.manual_seed(0)
    model = _build_model()
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": universal},
        "bf16": {"enabled": bf16},
    }
    if bf16:
        # The trainer's parameter groups (decay / no decay, interleaved in module order): the stage-0 optimizer
        # saves its fp32 masters per group without names, which consolidate must put back in place.
        from pretrain.simmim import simmim_param_groups

        params = simmim_param_groups(model, _config())
    else:
        params = model.parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def _train_steps(engine, first: int, count: int) -> None:
    rank = int(os.environ["RANK"])
    for step in range(first, first + count):
        images, mask = _batch(1000 * step + rank)
        if engine.bfloat16_enabled():
            images = images.to(torch.bfloat16)
        loss = engine(images, mask)
        engine.backward(loss)
        engine.step()


def _eval_output(engine) -> torch.Tensor:
    engine.eval()
    images, mask = _batch(12345)
    with torch.no_grad():
        # Through the engine: under ZeRO-3 it is what gathers the partitioned weights (calling engine.module
        # directly skips DeepSpeed's discovery of weights used outside their module's forward, like attn.qkv).
        return engine(images, mask)


def _gathered(engine) -> dict[str, torch.Tensor]:
    """The full parameters (gathered from the ZeRO-3 partitions; a no-op below stage 3), for exact comparisons."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        return {k: v.detach().clone() for k, v in engine.module.named_parameters()}


def _fp32_masters(engine) -> dict[str, torch.Tensor]:
    """The optimizer's fp32 master weights by parameter name, read from the live engine (collective below ZeRO-3)."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    optimizer = engine.optimizer
    if engine.zero_optimization_stage() == 0:
        # FP16_UnfusedOptimizer: fp16_groups[i][j] is the module parameter whose master is fp32_groups[i][j].
        return {
            names[id(low)]: high.detach().clone()
            for lows, highs in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True)
            for low, high in zip(lows, highs, strict=True)
        }
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}


def _train_bf16(stage: int, out: Path, client: dict) -> None:
    """bf16 training (the module holds bf16 copies, the optimizer the fp32 masters), saved under ``out``."""
    from pretrain.checkpoint import save_checkpoint

    engine = _engine(stage, bf16=True)
    _train_steps(engine, 0, STEPS)
    save_checkpoint(engine, out / "checkpoints", STEPS, client, keep_last=3)
    reference = {
        "masters": _fp32_masters(engine),
        "module": {k: v.detach().clone() for k, v in engine.module.state_dict().items()},
    }
    if int(os.environ["RANK"]) == 0:
        torch.save(reference, out / "reference.pt")


def worker(argv: list[str]) -> None:
    import deepspeed

    mode, stage, out = argv[0], int(argv[1]), Path(argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if mode == "train":
        engine = _engine(stage)
        _train_steps(engine, 0, STEPS)
        # The trainer's own save: <run>/checkpoints/step-<N>/, COMPLETE written last by rank 0 after a barrier.
        from pretrain.checkpoint import save_checkpoint
        from pretrain.config import to_dict

        client = {"step": STEPS, "config": to_dict(_config()), "world_size": world, "zero_stage": stage}
        save_checkpoint(engine, out / "checkpoints", STEPS, client, keep_last=3)
        # Collective calls under ZeRO-3: every rank takes part, rank 0 keeps the result.
        reference = {"output": _eval_output(engine), "weights": _gathered(engine)}
        if rank == 0:
            torch.save(reference, out / "reference.pt")
        # A later save that never completes (no marker): consolidate must refuse it.
        engine.train()
        _train_steps(engine, STEPS, 1)
        engine.save_checkpoint(str(out / "checkpoints"), tag=f"step-{STEPS + 1}", client_state=client)
        if "bf16" in argv[3:]:
            # In the same processes: a second launch would cost more than the training itself.
            _train_bf16(stage, out / "bf16", client)
    elif mode == "resume":
        engine = _engine(stage, universal=True)
        load_dir, client = engine.load_checkpoint(str(out.parent), tag=out.name)
        if load_dir is None:
            raise RuntimeError(f"DeepSpeed did not load {out}")
        result = {"output": _eval_output(engine), "weights": _gathered(engine), "step": client["step"]}
        engine.train()
        _train_steps(engine, client["step"], 1)
        if rank == 0:
            torch.save(result, out.parent / "resumed.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------ the tests
def _launch(mode: str, stage: int, out: Path, world: int, *extra: str) -> None:
    """This file's worker in ``world`` gloo processes."""
    _run_ranks([__file__, mode, str(stage), str(out), *extra], world)


def _run_ranks(argv: list[str], world: int) -> list[str]:
    """Run ``python ARGV`` as ranks 0..world-1 of one job (torchrun-style environment); returns their logs."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = rank_env(rank, world, port, LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
        procs.append(
            subprocess.Popen(
                [sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-4000:]
    return logs


@pytest.fixture(scope="module", params=[0, 2, 3], ids=["zero0", "zero2", "zero3"])
def run_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"zero{request.param}")
    # ZeRO-0 and 2 also train in bf16 (ZeRO-3 consolidates through the same zero_to_fp32 path as ZeRO-2).
    _launch("train", request.param, out, 2, *(["bf16"] if request.param in (0, 2) else []))
    return request.param, out


def _strict_model_output(weights: Path) -> torch.Tensor:
    state, _, _ = load_weights_file(weights)
    model = _build_model()
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.eval()
    images, mask = _batch(12345)
    with torch.no_grad():
        return model(images, mask)


def test_consolidate_reproduces_training_model(run_dir, tmp_path, capsys):
    stage, out = run_dir
    # The newest checkpoint (step-3) has no COMPLETE marker: the run directory resolves to step-2.
    weights = tmp_path / "simmim.safetensors"
    assert convert.main(["consolidate", str(out), "-o", str(weights)]) == 0
    state, meta, _ = load_weights_file(weights)
    assert meta["step"] == STEPS and meta["zero_stage"] == stage and meta["world_size"] == 2
    assert meta["model"]["img_size"] == 64 and meta["kind"] == "simmim"
    assert not any("relative_position_index" in k or "attn_mask" in k for k in state)
    reference = torch.load(out / "reference.pt")
    for key, value in reference["weights"].items():
        assert torch.equal(state[key], value), key
    assert (_strict_model_output(weights) - reference["output"]).abs().max().item() <= 1e-5

    bf16 = tmp_path / "simmim_bf16.pth"
    assert (
        convert.main(["consolidate", str(out / "checkpoints"), "--tag", "step-2", "-o", str(bf16), "--dtype", "bf16"])
        == 0
    )
    state16, _, _ = load_weights_file(bf16)
    assert all(v.dtype == torch.bfloat16 for v in state16.values())
    assert torch.equal(state16["decoder.0.weight"], state["decoder.0.weight"].to(torch.bfloat16))

    # Straight on to fine-tuning weights.
    backbone = tmp_path / "backbone.safetensors"
    assert convert.main(["backbone", str(weights), "-o", str(backbone)]) == 0
    assert load_weights_file(backbone)[1]["model"]["pretrained_window_sizes"] == [4, 4, 4, 2]

    assert convert.main(["inspect", str(out)]) == 0
    listing = capsys.readouterr().out
    assert "step-2: complete" in listing and "step-3: INCOMPLETE" in listing


def test_consolidate_refuses_incomplete(run_dir, tmp_path, capsys):
    stage, out = run_dir
    target = tmp_path / "x.safetensors"
    assert convert.main(["consolidate", str(out / "checkpoints" / "step-3"), "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert "no COMPLETE marker" in err and "step-3" in err
    assert convert.main(["consolidate", str(out), "--tag", "step-9", "-o", str(target)]) == 2
    assert "no DeepSpeed checkpoint with tag 'step-9'" in capsys.readouterr().err
    assert not target.exists()
    if stage > 0:
        # A complete-looking ZeRO checkpoint that lost one rank's optimizer shard.
        broken = tmp_path / "broken" / "step-2"
        shutil.copytree(out / "checkpoints" / "step-2", broken)
        sorted(broken.glob("*optim_states.pt"))[-1].unlink()
        assert convert.main(["consolidate", str(broken), "-o", str(target)]) == 2
        err = capsys.readouterr().err
        assert "DeepSpeed cannot consolidate it" in err and "optim_states.pt" in err
    # Pieces of a DeepSpeed checkpoint handed to the single-file subcommands name `consolidate`.
    tag_dir = out / "checkpoints" / "step-2"
    states = sorted(tag_dir.glob("*model_states.pt"))[0]
    for source in (tag_dir, states):
        assert convert.main(["export", "--to", "timm", str(source), "-o", str(target)]) == 2
        assert "use `consolidate`" in capsys.readouterr().err


@pytest.mark.parametrize("run_dir", [0, 2], ids=["zero0", "zero2"], indirect=True)
def test_consolidate_bf16_training_recovers_fp32_masters(run_dir, tmp_path):
    """bf16 training: the fp32 output holds the optimizer's fp32 masters, not the bf16 module copies widened."""
    stage, out = run_dir
    run = out / "bf16"
    reference = torch.load(run / "reference.pt")
    masters, module = reference["masters"], reference["module"]
    assert all(v.dtype == torch.bfloat16 for v in module.values())
    # Not vacuous: the masters carry more than bf16 precision.
    assert any(not torch.equal(v, v.to(torch.bfloat16).float()) for v in masters.values())
    if stage == 0:
        # The case the masters must be matched by value: groups interleave in module order and some bf16 copies
        # coincide (one-head logit scales start equal and move less than a bf16 step).
        copies = [(tuple(v.shape), tuple(v.view(torch.int16).flatten().tolist())) for v in module.values()]
        assert len(set(copies)) < len(copies)

    fp32 = tmp_path / "fp32.safetensors"
    assert convert.main(["consolidate", str(run), "-o", str(fp32)]) == 0
    state, meta, _ = load_weights_file(fp32)
    assert meta["zero_stage"] == stage and meta["dtype"] == "fp32"
    assert sorted(state) == sorted(masters)
    for key, value in masters.items():
        assert state[key].dtype == torch.float32 and torch.equal(state[key], value.float()), key

    bf16 = tmp_path / "bf16.safetensors"
    assert convert.main(["consolidate", str(run), "-o", str(bf16), "--dtype", "bf16"]) == 0
    state16, _, _ = load_weights_file(bf16)
    for key, value in module.items():
        assert torch.equal(state16[key], value), key


# ZeRO-1/2 checkpoints also reload at another world size natively; ZeRO-3 is the stage that needs the conversion.
@pytest.mark.parametrize("run_dir", [0, 3], ids=["zero0", "zero3"], indirect=True)
def test_universal_resumes_at_world_size_1(run_dir, capsys):
    """Saved by 2 processes, resumed by 1 (ZeRO-3 cannot do that from its native checkpoint)."""
    stage, out = run_dir
    if stage == 0:
        assert convert.main(["universal", str(out)]) == 2
        assert "resumes at any world size as it is" in capsys.readouterr().err
        return
    # Default output: <tag>_universal next to the tag, where the trainer looks when the world size changed.
    assert convert.main(["universal", str(out)]) == 0
    universal = out / "checkpoints" / "step-2_universal"
    assert convert.main(["universal", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (universal / "COMPLETE").exists() and (universal / "zero").is_dir()
    _launch("resume", stage, universal, world=1)
    resumed = torch.load(universal.parent / "resumed.pt")
    assert resumed["step"] == STEPS
    reference = torch.load(out / "reference.pt")
    for key, value in reference["weights"].items():
        assert torch.equal(resumed["weights"][key], value), key
    assert (resumed["output"] - reference["output"]).abs().max().item() <= 1e-5


def _error_line(err: str) -> str:
    """The tool's one error line (DeepSpeed's own progress bars may come before it on stderr)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _copy_of(out: Path, tmp_path: Path, name: str) -> Path:
    """A copy of the run's complete step-2, to damage."""
    copy = tmp_path / name / "checkpoints" / "step-2"
    shutil.copytree(out / "checkpoints" / "step-2", copy)
    return copy


@pytest.mark.parametrize("run_dir", [2], ids=["zero2"], indirect=True)
def test_damaged_deepspeed_checkpoints_are_named_not_misread(run_dir, tmp_path, capsys):
    """A truncated or garbled shard, optimizer shards deleted from a ZeRO-2 checkpoint (new marker and a marker from
    before the file list), and a checkpoint pruned while it is converted: one line naming the file, exit 2."""
    _, out = run_dir
    target = tmp_path / "x.safetensors"
    shard = "zero_pp_rank_1_mp_rank_00_optim_states.pt"

    truncated = _copy_of(out, tmp_path, "truncated")
    size = (truncated / shard).stat().st_size
    with open(truncated / shard, "r+b") as handle:
        handle.truncate(size - 1000)
    for argv in (["consolidate", str(truncated), "-o", str(target)], ["universal", str(truncated)]):
        assert convert.main(argv) == 2
        err = _error_line(capsys.readouterr().err)
        assert f"{shard} is {size - 1000} bytes, the COMPLETE marker records {size} (cut short or overwritten)" in err
        assert str(truncated) in err

    # Same size, garbled content (its zip directory overwritten): found when DeepSpeed fails to read it.
    garbled = _copy_of(out, tmp_path, "garbled")
    with open(garbled / shard, "r+b") as handle:
        handle.seek(size - 300)
        handle.write(b"\x00" * 300)
    assert convert.main(["consolidate", str(garbled), "-o", str(target)]) == 2
    assert f"{garbled}: {shard} is damaged (BadZipFile" in _error_line(capsys.readouterr().err)

    # ZeRO-2 whose optimizer shards (the fp32 weights) were deleted: not read as a stage-0 checkpoint.
    for name, old_marker in (("no-shards", False), ("no-shards-old-marker", True)):
        tag_dir = _copy_of(out, tmp_path, name)
        for path in tag_dir.glob("*optim_states.pt"):
            path.unlink()
        if old_marker:  # the marker as written before it listed the files: checked structurally
            meta = json.loads((tag_dir / "COMPLETE").read_text())
            (tag_dir / "COMPLETE").write_text(json.dumps({k: meta[k] for k in ("step", "world_size", "zero_stage")}))
        for argv in (["consolidate", str(tag_dir), "-o", str(target)], ["universal", str(tag_dir)]):
            assert convert.main(argv) == 2
            err = _error_line(capsys.readouterr().err)
            assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in err and "missing" in err, err
            if old_marker:
                assert "are missing (ZeRO-2 at world size 2 writes one per rank)" in err
            assert "stage 0" not in err
    assert not target.exists()


@pytest.mark.parametrize("run_dir", [2], ids=["zero2"], indirect=True)
def test_checkpoint_pruned_while_converted_says_so(run_dir, tmp_path, capsys, monkeypatch):
    """The training run prunes the checkpoint (marker first, then the folder) while consolidate reads it."""
    _, out = run_dir
    tag_dir = _copy_of(out, tmp_path, "pruned")
    real_load = torch.load
    pruned = []

    def load_then_prune(*args, **kwargs):
        if not pruned:  # the prune lands after the conversion started reading
            (tag_dir / "COMPLETE").unlink()
            shutil.rmtree(tag_dir)
            pruned.append(True)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load_then_prune)
    target = tmp_path / "x.safetensors"
    assert convert.main(["consolidate", str(tag_dir), "-o", str(target)]) == 2
    err = _error_line(capsys.readouterr().err)
    assert pruned and f"{tag_dir} was removed while consolidating it: its COMPLETE marker is gone" in err
    assert "pruned it (it keeps checkpoint.keep_last checkpoints)" in err and not target.exists()


def test_real_trainer_checkpoint_lifecycle(tmp_path, capsys):
    """`python -m pretrain` at ZeRO-3 in 2 processes -> consolidate -> universal -> resumed by 1 process -> its
    checkpoint consolidates too, and both load strictly into the SimMIM model."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = torch.Generator().manual_seed(0)
    for i in range(8):
        pixels = (torch.rand(80, 80, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{i}.png")
    run = tmp_path / "run"
    overrides = [f"model.{k}={v}".replace(" ", "") for k, v in MODEL.items()] + [
        "model.size=tiny",
        "simmim.mask_patch_size=16",
        "data.source=folder",
        f"data.path={images}",
        "data.batch_size=2",
        "data.num_workers=0",
        f"training.output_dir={run}",
        "training.precision=fp32",
        "training.device=cpu",
        "distributed.zero_stage=3",
        "checkpoint.every_steps=2",
        "logging.tensorboard=false",
        "logging.image_every=0",
        "schedule.name=cosine",
        "schedule.epochs=3",
        "schedule.warmup_epochs=0",
    ]
    _run_ranks(["-m", "pretrain", "training.max_steps=2", *overrides], world=2)

    first = tmp_path / "step2.safetensors"
    assert convert.main(["consolidate", str(run), "-o", str(first)]) == 0
    state, meta, _ = load_weights_file(first)
    assert (meta["step"], meta["world_size"], meta["zero_stage"]) == (2, 2, 3)
    assert meta["config"]["distributed"]["zero_stage"] == 3 and meta["model_size"] == "tiny"
    _build_model().load_state_dict(state, strict=True)

    assert convert.main(["universal", str(run)]) == 0
    logs = _run_ranks(["-m", "pretrain", "training.max_steps=4", *overrides], world=1)
    assert "step-2_universal at step=2" in logs[0]
    second = tmp_path / "step4.safetensors"
    assert convert.main(["consolidate", str(run), "-o", str(second)]) == 0
    state4, meta4, _ = load_weights_file(second)
    assert (meta4["step"], meta4["world_size"]) == (4, 1)
    _build_model().load_state_dict(state4, strict=True)
    assert not torch.equal(state4["decoder.0.weight"], state["decoder.0.weight"])


if __name__ == "__main__":
    worker(sys.argv[1:])
