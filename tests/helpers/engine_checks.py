"""Run as each rank of a 2-process gloo job: checks of the ZeRO-3 parameter groups, the rank-0 resume decision and
the stale-marker handling of checkpoint saves, on real DeepSpeed objects. Prints ``CHECK <name> ok`` per check;
a failed check raises (non-zero exit code).

    python -m tests.helpers.engine_checks WORK_DIR [section.key=value ...]   (RANK, WORLD_SIZE, ... set)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def _sizes(groups: list[dict]) -> list[tuple[float, int, int]]:
    """(weight decay, parameters, elements) per group; ZeRO-3 partitions count by their full size (ds_numel)."""
    return [
        (g["weight_decay"], len(g["params"]), sum(int(getattr(p, "ds_numel", p.numel())) for p in g["params"]))
        for g in groups
    ]


def check_zero3_param_groups(overrides: list[str]) -> None:
    """Under zero.Init every parameter is an empty 1-D partition: the groups must still split by the full shape."""
    from pretrain.config import load_config
    from pretrain.engine import build_model, deepspeed_config
    from pretrain.simmim import simmim_param_groups
    from pretrain.tasks.simmim import SimMIMTask

    plain_cfg = load_config(None, [*overrides, "distributed.zero_stage=0"])
    zero3_cfg = load_config(None, [*overrides, "distributed.zero_stage=3"])
    plain_model = build_model(plain_cfg, deepspeed_config(plain_cfg, 2), SimMIMTask(plain_cfg))
    plain = _sizes(simmim_param_groups(plain_model, plain_cfg))
    model = build_model(zero3_cfg, deepspeed_config(zero3_cfg, 2), SimMIMTask(zero3_cfg))
    partitioned = [p for p in model.parameters() if p.ndim == 1 and p.numel() == 0 and len(p.ds_shape) > 1]
    assert partitioned, "the ZeRO-3 model is not partitioned: the check would not cover the bug"
    zero3 = _sizes(simmim_param_groups(model, zero3_cfg))
    assert zero3 == plain, f"ZeRO-3 groups {zero3} != stage-0 groups {plain}"
    assert any(decay > 0 and n > 0 for decay, n, _ in zero3), zero3


def zero_engine(cfg: object, stage: int = 2) -> object:
    """A DeepSpeed engine of the config's SimMIM model with AdamW at ZeRO ``stage`` (fp32, CPU), built directly with
    ``deepspeed.initialize``: what checkpoint saving and loading need, independent of the trainer's engine options."""
    import deepspeed

    from pretrain.simmim import build_simmim

    torch.manual_seed(0)
    model = build_simmim(cfg)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def _fake_checkpoint(tag_dir: Path, step: int) -> None:
    """A whole-looking stage-0 tag folder: rank 0's model states (no weights) and a marker listing it. Enough for the
    resume decision, which reads markers, file sizes and the client state, not weights."""
    tag_dir.mkdir(parents=True)
    states = tag_dir / "mp_rank_00_model_states.pt"
    torch.save({"step": step, "world_size": 2, "zero_stage": 0}, states)
    marker = {"step": step, "world_size": 2, "zero_stage": 0, "files": {states.name: states.stat().st_size}}
    (tag_dir / "COMPLETE").write_text(json.dumps(marker))


def check_resume_decision_is_rank0s(work: Path, overrides: list[str]) -> None:
    """Ranks that see different checkpoint folders still resume from the one rank 0 chose; rank 0's error reaches
    every rank instead of leaving the others waiting in a collective."""
    from pretrain.checkpoint import CheckpointError
    from pretrain.checkpoint import resume_target as _resume_target
    from pretrain.config import load_config

    rank = dist.get_rank()
    # Rank 1's view holds a newer checkpoint than rank 0's (as a lagging shared-filesystem cache can make it look).
    views = {0: work / "view0" / "checkpoints", 1: work / "view1" / "checkpoints"}
    if rank == 0:
        _fake_checkpoint(views[0] / "step-2", 2)
        _fake_checkpoint(views[1] / "step-2", 2)
        _fake_checkpoint(views[1] / "step-5", 5)
    dist.barrier()
    cfg = load_config(None, [*overrides, "checkpoint.resume=auto"])
    path, universal = _resume_target(cfg, views[rank], 2, say=lambda _: None)
    assert path == views[0] / "step-2" and not universal, (rank, path)

    # An explicit checkpoint.resume: rank 0's is unmarked, rank 1's complete. Only rank 0's answer may count.
    own = views[rank] / "step-2"
    if rank == 0:
        (own / "COMPLETE").unlink()
    dist.barrier()
    cfg = load_config(None, [*overrides, f"checkpoint.resume={own}"])
    try:
        _resume_target(cfg, views[rank], 2, say=lambda _: None)
    except CheckpointError as exc:
        expected = "has no COMPLETE marker" if rank == 0 else "rank 0 could not choose the checkpoint"
        assert expected in str(exc), str(exc)
    else:
        raise AssertionError(f"rank {rank}: no error for an unmarked checkpoint.resume")


def check_overwrite_removes_stale_marker(work: Path, overrides: list[str]) -> None:
    """Saving into a step folder that already holds a complete checkpoint: a save cut short must not leave the old
    marker (nor the universal copy converted from the old content) in place."""
    from pretrain.checkpoint import find_latest_complete, is_complete, list_complete, save_checkpoint, universal_dir
    from pretrain.config import load_config

    rank = dist.get_rank()
    cfg = load_config(None, [*overrides, "distributed.zero_stage=2"])
    engine = zero_engine(cfg)
    ckpt_dir = work / "ckpt"
    tag_dir = save_checkpoint(engine, ckpt_dir, 1, {"step": 1}, keep_last=5)
    assert is_complete(tag_dir)
    stale_shard = tag_dir / "zero_pp_rank_7_mp_rank_00_optim_states.pt"  # as an earlier save at world size 8 left
    if rank == 0:  # and a universal copy, as left by an automatic conversion (resume at another world size)
        stale_shard.write_bytes(b"old shard")
        universal_dir(tag_dir).mkdir()
        (universal_dir(tag_dir) / "UNIVERSAL").write_text("old\n")
        (universal_dir(tag_dir) / "COMPLETE").write_text((tag_dir / "COMPLETE").read_text())
    dist.barrier()

    real_save = engine.save_checkpoint
    seen_marker: list[bool] = []

    def crashing_save(save_dir: str, tag: str, client_state: dict, **options: object) -> None:
        seen_marker.append(is_complete(Path(save_dir) / tag))
        real_save(save_dir, tag=tag, client_state=client_state, **options)  # the new shards land...
        raise RuntimeError("simulated crash before the marker")  # ...and the job dies before the marker

    engine.save_checkpoint = crashing_save
    try:
        save_checkpoint(engine, ckpt_dir, 1, {"step": 1}, keep_last=5)
    except RuntimeError as exc:
        assert "simulated crash" in str(exc)
    else:
        raise AssertionError("the simulated crash did not happen")
    engine.save_checkpoint = real_save
    dist.barrier()
    assert seen_marker == [False], f"rank {rank} wrote while the old marker was still there: {seen_marker}"
    assert not is_complete(tag_dir), "a save cut short left the old COMPLETE marker: it would be resumed from"
    assert not universal_dir(tag_dir).exists(), "the universal copy of the old content survived the overwrite"
    assert not stale_shard.exists(), "a shard of the old save is mixed with the new ones"
    assert any(tag_dir.glob("*model_states.pt")), "the new save did not write"
    assert find_latest_complete(ckpt_dir) is None
    dist.barrier()  # every rank has looked at the cut-short folder before the next save removes it

    # Complete saves again, with pruning to the newest 2 (the oldest's universal copy goes with it). A folder that an
    # interrupted prune left (marker removed, files still there) goes at the next save.
    if rank == 0:
        (ckpt_dir / "step-0").mkdir()
        (ckpt_dir / "step-0" / "mp_rank_00_model_states.pt").write_bytes(b"left by a prune cut short")
    dist.barrier()
    for step in (1, 2, 3):
        save_checkpoint(engine, ckpt_dir, step, {"step": step}, keep_last=2)
        if step == 1 and rank == 0:
            universal_dir(ckpt_dir / "step-1").mkdir()
        dist.barrier()
    kept = [p.name for p in list_complete(ckpt_dir)]
    assert kept == ["step-2", "step-3"], (rank, kept)
    assert not (ckpt_dir / "step-1").exists() and not universal_dir(ckpt_dir / "step-1").exists()
    assert not (ckpt_dir / "step-0").exists(), "an incomplete folder of an earlier step was left behind"
    dist.barrier()  # every rank has listed the folder before rank 0 adds to it

    # After an explicit resume from an older checkpoint, later checkpoints of the abandoned run neither push this
    # run's fresh save out of the newest 2 nor get deleted by it.
    if rank == 0:
        _fake_checkpoint(ckpt_dir / "step-100", 100)
        _fake_checkpoint(ckpt_dir / "step-200", 200)
    dist.barrier()
    save_checkpoint(engine, ckpt_dir, 4, {"step": 4}, keep_last=2)
    kept = [p.name for p in list_complete(ckpt_dir)]
    assert kept == ["step-3", "step-4", "step-100", "step-200"], (rank, kept)


def main() -> None:
    from pretrain.distributed import init_process_group, resolve_launch_env

    work, overrides = Path(sys.argv[1]), sys.argv[2:]
    launch = resolve_launch_env()
    init_process_group("gloo", 2)
    torch.manual_seed(0)
    checks = [
        ("zero3_param_groups", lambda: check_zero3_param_groups(overrides)),
        ("resume_decision_is_rank0s", lambda: check_resume_decision_is_rank0s(work / "resume", overrides)),
        ("overwrite_removes_stale_marker", lambda: check_overwrite_removes_stale_marker(work / "save", overrides)),
    ]
    for name, check in checks:
        check()
        dist.barrier()
        print(f"CHECK {name} ok (rank {launch.rank})", flush=True)
    if launch.rank == 0:
        shutil.rmtree(work / "save", ignore_errors=True)


if __name__ == "__main__":
    from tests.helpers.launch import finish_rank

    main()
    finish_rank()
