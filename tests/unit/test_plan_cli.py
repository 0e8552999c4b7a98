"""The planner's command line, FLOP counting on the meta device, time model and search (pretrain/plan/)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import load_config, to_yaml
from pretrain.metrics import GPU_PEAK_TFLOPS, count_forward_flops
from pretrain.plan.cli import main
from pretrain.plan.devices import GIB, GPU_MEMORY_GIB, lookup_device
from pretrain.plan.memory import MemoryEstimate
from pretrain.plan.search import largest_fitting, search, with_choice
from pretrain.plan.throughput import (
    best_measured_mfu,
    count_images,
    estimate_time,
    flop_profile,
    offload_seconds,
)
from pretrain.simmim import build_simmim
from swinv2 import MODEL_SIZES, parse_checkpointing
from tests.helpers.tiny import TINY_MODEL

REPO = Path(__file__).resolve().parents[2]
BASE = str(REPO / "configs" / "simmim_swinv2_base_192_w12.yaml")
IMAGENET = "1281167"
MEMORY_KEYS = ("parameters", "gradients", "optimizer_states", "master_weights", "activations", "deepspeed_buffers")


def _run(capsys: pytest.CaptureFixture[str], *argv: str, estimator=None) -> tuple[int, str, str]:
    code = main(list(argv), estimator=estimator)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------ a stand-in estimator
def _stand_in(cfg, *, world_size: int, micro_batch: int | None = None) -> MemoryEstimate:
    """Memory that depends on the ZeRO stage, offload and checkpointing, and grows faster than linearly in the batch
    (so a search that assumed linearity would miss)."""
    batch = cfg.data.batch_size if micro_batch is None else micro_batch
    params, stage, offload = 10**9, cfg.distributed.zero_stage, cfg.distributed.offload_optimizer
    share = {"none": 1.0, "every:2": 0.55, "all": 0.1}[cfg.model.activation_checkpointing]
    return MemoryEstimate(
        parameters=2 * params // (world_size if stage >= 3 else 1),
        gradients=2 * params // (world_size if stage >= 2 else 1),
        optimizer_states=0 if offload else 8 * params // (world_size if stage >= 1 else 1),
        master_weights=0 if offload else 4 * params // (world_size if stage >= 1 else 1),
        activations=int(share * (3e8 * batch + 2e6 * batch**2)),
        deepspeed_buffers=5 * 10**8 if stage else 0,
        host_offloaded=12 * params // world_size if offload else 0,
    )


# -------------------------------------------------------------------------------------------------- the command
def test_json_plan_of_the_base_recipe_has_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    from pretrain.plan.memory import estimate_memory

    code, out, err = _run(capsys, "--config", BASE, "--gpus", "8", "--gpu", "H100", "--images", IMAGENET, "--json")
    assert code == 0, err
    plan = json.loads(out)
    memory = plan["memory"]
    for key in (*MEMORY_KEYS, "host_offloaded", "total", "headroom_bytes"):
        assert isinstance(memory[key], int), key
    assert memory["total"] == sum(memory[k] for k in MEMORY_KEYS) - memory.get("overlap", 0)
    expected = estimate_memory(load_config(BASE), world_size=8, micro_batch=128)
    assert memory["total"] == expected.total
    device = plan["device"]
    assert device["memory_bytes"] == 80 * GIB and device["usable_bytes"] == int(0.9 * 80 * GIB)
    assert memory["fits"] == (memory["total"] <= device["usable_bytes"])
    flops = plan["flops"]
    assert flops["forward_per_image"] > 0 and flops["recompute_per_image"] == 0  # the recipe checkpoints nothing
    assert flops["train_per_image"] == 3 * flops["forward_per_image"]
    time = plan["time"]
    assert time["mfu"] == 0.40 and "default" in time["mfu_source"]
    assert time["step_s"] == pytest.approx(flops["train_per_image"] * 128 / (0.40 * 989e12))
    assert time["images_per_s_total"] == pytest.approx(8 * time["images_per_s_per_gpu"])
    assert time["steps"] == 800 * (1281167 // (128 * 8))
    assert time["wall_clock_s"] == pytest.approx(time["steps"] * time["step_s"])
    assert plan["config"]["global_batch"] == 128 * 8
    assert plan["world"] == {"world_size": 8, "nodes": 1, "gpus_per_node": 8}
    loading = plan["data_loading"]
    assert loading["workers_per_gpu"] == 8
    assert loading["needed_images_per_s_per_worker"] == pytest.approx(time["images_per_s_per_gpu"] / 8)
    assert loading["keeps_up"] == (loading["needed_images_per_s_per_worker"] <= 415.0)
    assert len(plan["assumptions"]) >= 5 and all(isinstance(a, str) for a in plan["assumptions"])
    assert "search" not in plan


def test_table_output_names_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(
        capsys, "--config", BASE, "--gpus", "64", "--gpu", "h100", "--images", IMAGENET, estimator=_stand_in
    )
    assert code == 0, err
    for row in (
        "parameters",
        "gradients",
        "optimizer states",
        "fp32 master weights",
        "activations",
        "DeepSpeed",
        "total",
        "fits",
        "forward FLOPs per image",
        "step time",
        "images/s per GPU",
        "images/s total (64 GPUs)",
        "wall-clock",
        "Assumptions",
        "8 node(s) x 8",
    ):
        assert row in out, row


def test_overrides_and_print_config_load_as_python_m_pretrain(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys,
        "--config",
        BASE,
        "data.batch_size=32",
        "--gpus",
        "1",
        "--gpu",
        "H100",
        "model.activation_checkpointing=all",
        "--print-config",
    )
    assert code == 0
    assert out == to_yaml(load_config(BASE, ["data.batch_size=32", "model.activation_checkpointing=all"]))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--gpus", "8", "--gpu", "H1000"], ["'H1000'", "H100 PCIe", "A100 80GB", "--gpu-memory"]),
        (["--gpus", "8", "--gpu", "A100"], ["A100 40GB, A100 80GB"]),
        (["--gpus", "0", "--gpu", "H100"], ["--gpus 0", "1 or more"]),
        (["--gpus", "12", "--gpu", "H100", "--nodes", "5"], ["--nodes 5", "1, 2, 3, 4, 6, 12"]),
        (["--gpus", "12", "--gpu", "H100"], ["--gpus 12", "--nodes"]),
        (["--gpus", "8", "--gpu", "H100", "--margin", "1"], ["--margin 1.0", "0 <= margin < 1"]),
        (["--gpus", "8", "--gpu", "H100", "--margin", "-0.1"], ["--margin -0.1", "0 <= margin < 1"]),
        (["--gpus", "8", "--gpu", "H100", "--mfu", "0"], ["--mfu 0.0", "0 < mfu <= 1"]),
        (["--gpus", "8", "--gpu", "H100", "--mfu", "1.2"], ["--mfu 1.2", "0 < mfu <= 1"]),
        (["--gpus", "8", "--gpu-memory", "0"], ["--gpu-memory 0.0", "positive"]),
        (["--gpus", "8", "--gpu", "H100", "--images", "0"], ["--images 0", "1 or more"]),
        (["--gpus", "8", "--gpu", "H100"], ["matches no shard files", "--images N"]),
        (["--gpus", "8", "--gpu", "H100", "--from-run", "/nonexistent/run"], ["no metrics.jsonl", "/nonexistent/run"]),
        (["--gpus", "8", "--gpu", "H100", "model.size=gigantic"], ["config error", "'gigantic'", "giant"]),
    ],
)
def test_bad_input_is_one_clear_line(capsys: pytest.CaptureFixture[str], argv: list[str], expected: list[str]) -> None:
    def never(*args, **kwargs):
        raise AssertionError("the estimator ran before the input was checked")

    code, out, err = _run(capsys, "--config", BASE, *argv, estimator=never)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    for text in expected:
        assert text in err, (text, err)


# ------------------------------------------------------------------------------------------------------- devices
def test_device_table_matches_the_peak_table() -> None:
    for name, (gib, peak_key) in GPU_MEMORY_GIB.items():
        assert gib > 0 and (peak_key is None or peak_key in GPU_PEAK_TFLOPS), name
    assert lookup_device("h100-pcie").name == "H100 PCIe"
    assert lookup_device("a100_80gb").memory_bytes == 80 * GIB
    assert lookup_device("H200").peak_tflops == GPU_PEAK_TFLOPS["H200"]
    assert lookup_device("RTX 4090").peak_tflops is None


def test_device_without_peak_plans_memory_but_no_time(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "--config", BASE, "--gpus", "8", "--gpu-memory", "24", "--json", estimator=_stand_in)
    assert code == 0, err
    plan = json.loads(out)
    assert plan["time"] is None and plan["device"]["memory_bytes"] == 24 * GIB
    code, out, _ = _run(
        capsys,
        "--config",
        BASE,
        "--gpus",
        "8",
        "--gpu-memory",
        "24",
        "logging.peak_tflops=165",
        "--images",
        IMAGENET,
        "--json",
        estimator=_stand_in,
    )
    assert json.loads(out)["time"]["step_s"] > 0


# --------------------------------------------------------------------------------------------------------- FLOPs
def _train_flops(cfg, checkpointing: str, chunk: int) -> float:
    """Forward + backward FLOPs of one image on a real CPU model, counted by FlopCounterMode (recomputation
    included)."""
    cfg = with_choice(cfg, zero_stage=0, checkpointing="none", offload=False, micro_batch=1, accum=1)
    cfg.model.window_chunk_size = chunk
    torch.manual_seed(0)
    model = build_simmim(cfg)
    model.encoder.set_grad_checkpointing(**parse_checkpointing(checkpointing))
    size = cfg.model.img_size
    images = torch.randn(1, 3, size, size)
    mask = torch.zeros(1, size // 4, size // 4, dtype=torch.int64)
    mask[:, ::2] = 1
    with FlopCounterMode(display=False) as counter:
        model(images, mask).backward()
    return float(counter.get_total_flops())


def test_meta_flops_equal_the_trainers_count_on_a_real_model_and_recompute_is_measured() -> None:
    cfg = load_config(None, [*TINY_MODEL, "model.attn_impl=explicit"])
    profile = flop_profile(cfg)
    torch.manual_seed(0)
    model = build_simmim(cfg)
    images = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 16, 16, dtype=torch.int64)
    assert profile.forward == count_forward_flops(model, images, mask)  # the trainer's counter, real tensors
    assert profile.parameters == sum(p.numel() for p in model.parameters())
    assert profile.block_windows == (16, 4, 1, 1)
    assert profile.checkpointed("every:2") == [True, False, True, False]
    # What the time model adds for recomputation is what torch counts in a real forward + backward.
    plain = _train_flops(cfg, "none", 0)
    assert _train_flops(cfg, "all", 0) - plain == profile.recompute("all", 0) == sum(profile.block_forward)
    assert _train_flops(cfg, "every:2", 0) - plain == profile.recompute("every:2", 0)
    chunked = profile.recompute("none", 2)  # stage 0 (16 windows) and 1 (4 windows) are chunked
    assert chunked == profile.block_attention_core[0] + profile.block_attention_core[1] > 0
    # On the CPU the attention core is decomposed into ops, and torch's checkpoint stops recomputing once backward
    # has what it needs: q k^T and the softmax, not the weighted sum of v (as many FLOPs as q k^T). The plan counts
    # the whole core, as CUDA's fused SDPA kernel (one op) is recomputed whole.
    assert _train_flops(cfg, "none", 2) - plain == chunked / 2
    assert _train_flops(cfg, "all", 2) - plain == profile.recompute("all", 0) + chunked / 2


def test_giant_counts_on_meta_without_memory() -> None:
    cfg = load_config(str(REPO / "configs" / "simmim_swinv2_giant_192_w12.yaml"))
    profile = flop_profile(cfg)
    assert 2.9e9 < profile.parameters < 3.1e9  # the paper's 3B SwinV2-G (with the SimMIM decoder)
    assert len(profile.block_forward) == sum(MODEL_SIZES["giant"]["depths"])
    assert profile.recompute("all", 0) == sum(profile.block_forward) < profile.forward


# ---------------------------------------------------------------------------------------------------------- time
def test_time_model_arithmetic_with_offload() -> None:
    cfg = load_config(
        BASE,
        ["distributed.offload_optimizer=true", "training.grad_accum_steps=2", "model.activation_checkpointing=all"],
    )
    profile = flop_profile(cfg)
    time = estimate_time(
        cfg, profile, world_size=16, gpus_per_node=8, peak_flops=1e15, mfu=0.5, images_per_epoch=1_000_000
    )
    train = 3 * profile.forward + sum(profile.block_forward)
    assert time.compute_s == pytest.approx(train * 128 * 2 / 0.5e15)
    assert time.offload_s == pytest.approx(offload_seconds(profile.parameters, 16, 8)) and time.offload_s > 0
    assert time.step_s == pytest.approx(time.compute_s + time.offload_s)
    assert time.images_per_s_per_gpu == pytest.approx(256 / time.step_s)
    assert time.steps == 800 * (1_000_000 // (128 * 16) // 2)
    assert time.model_mfu == pytest.approx(0.5 * 3 * profile.forward / train)


def test_images_counted_from_the_size_index_or_folder(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        (shards / f"s-{i}.tar").write_bytes(b"")
    (shards / "sizes.json").write_text(json.dumps({"s-0.tar": 5, "s-1.tar": 7, "s-2.tar": 1}))
    assert count_images(load_config(BASE, [f"data.path={shards}"]))[0] == 13
    assert count_images(load_config(BASE, ["data.samples_per_epoch=99"])) == (99, "data.samples_per_epoch")
    (shards / "sizes.json").write_text(json.dumps({"s-0.tar": 5}))
    with pytest.raises(ValueError, match="--images"):
        count_images(load_config(BASE, [f"data.path={shards}"]))
    folder = tmp_path / "images"
    for i in range(4):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"class{i % 2}" / f"{i}.jpg").write_bytes(b"")  # listed by name, as the trainer lists them
    (folder / "notes.txt").write_text("not an image")
    assert count_images(load_config(BASE, ["data.source=folder", f"data.path={folder}"]))[0] == 4


def _write_run(run: Path, mfu_pcts: list[float], checkpointing: str | None) -> None:
    run.mkdir(parents=True)
    lines = [json.dumps({"step": 10 * (i + 1), "loss": 1.0, "mfu_pct": v}) for i, v in enumerate(mfu_pcts)]
    (run / "metrics.jsonl").write_text("\n".join([*lines, '{"step": 99, "mfu']) + "\n")  # a torn last line
    if checkpointing is not None:
        (run / "config.yaml").write_text(
            to_yaml(load_config(BASE, [f"model.activation_checkpointing={checkpointing}"]))
        )


def test_from_run_reads_the_best_mfu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_run(tmp_path / "plain", [12.0, float("nan"), 31.5, 30.0], checkpointing=None)
    assert best_measured_mfu([tmp_path / "plain"]).mfu == pytest.approx(0.315)
    # A checkpointed run executed more FLOPs than the 3 x forward its logged MFU counts.
    _write_run(tmp_path / "ckpt", [28.0], checkpointing="all")
    profile = flop_profile(load_config(BASE))
    ratio = (3 * profile.forward + sum(profile.block_forward)) / (3 * profile.forward)
    best = best_measured_mfu([tmp_path / "plain", tmp_path / "ckpt"])
    assert best.mfu == pytest.approx(0.28 * ratio) and "ckpt" in best.source
    code, out, err = _run(
        capsys,
        "--config",
        BASE,
        "--gpus",
        "8",
        "--gpu",
        "H100",
        "--images",
        IMAGENET,
        "--json",
        "--from-run",
        str(tmp_path / "plain"),
        estimator=_stand_in,
    )
    assert code == 0, err
    assert json.loads(out)["time"]["mfu"] == pytest.approx(0.315)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    code, _, err = _run(
        capsys,
        "--config",
        BASE,
        "--gpus",
        "8",
        "--gpu",
        "H100",
        "--images",
        IMAGENET,
        "--from-run",
        str(tmp_path / "empty"),
        estimator=_stand_in,
    )
    assert code == 2 and "no finite mfu_pct" in err


# -------------------------------------------------------------------------------------------------------- search
def test_largest_fitting_bisects_to_the_boundary() -> None:
    calls: list[int] = []

    def fits(batch: int) -> bool:
        calls.append(batch)
        return batch <= 37

    assert largest_fitting(fits) == 37 and len(calls) <= 14
    assert largest_fitting(lambda b: False) == 0
    assert largest_fitting(lambda b: True, limit=100) == 100


def test_search_finds_the_largest_batch_that_fits_with_a_stand_in(tmp_path: Path) -> None:
    cfg = load_config(BASE, ["training.grad_accum_steps=2"])
    usable = 40 * GIB
    candidates = search(
        cfg,
        world_size=8,
        usable_bytes=usable,
        estimator=_stand_in,
        profile=flop_profile(cfg),
        time_fn=lambda c, p: None,
    )
    assert len(candidates) == 3 + 3 * 3 * 2  # ZeRO-0 has no offload
    for c in candidates:
        choice = with_choice(
            cfg, zero_stage=c.zero_stage, checkpointing=c.checkpointing, offload=c.offload, micro_batch=1, accum=1
        )
        if c.max_micro_batch:
            assert _stand_in(choice, world_size=8, micro_batch=c.max_micro_batch).total <= usable
        assert _stand_in(choice, world_size=8, micro_batch=c.max_micro_batch + 1).total > usable
        if c.fits:  # the recipe's 256 samples per rank and step are kept
            assert c.micro_batch <= c.max_micro_batch and c.micro_batch * c.grad_accum_steps == 256
            assert 256 % c.micro_batch == 0


def test_search_with_the_memory_model_ranks_and_recommends(capsys: pytest.CaptureFixture[str]) -> None:
    from pretrain.plan.memory import estimate_memory

    argv = ["--config", BASE, "--gpus", "8", "--gpu", "A100 40GB", "--images", IMAGENET, "--search", "--json"]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    plan = json.loads(out)
    cfg = load_config(BASE)
    usable = plan["device"]["usable_bytes"]
    rows = plan["search"]
    assert len(rows) == 21
    fitting = [r for r in rows if r["fits"]]
    assert fitting and rows[: len(fitting)] == fitting
    speeds = [r["time"]["images_per_s_total"] for r in fitting]
    assert speeds == sorted(speeds, reverse=True)
    for row in fitting:
        choice = with_choice(
            cfg,
            zero_stage=row["zero_stage"],
            checkpointing=row["activation_checkpointing"],
            offload=row["offload_optimizer"],
            micro_batch=1,
            accum=1,
        )
        largest = row["max_micro_batch"]
        assert estimate_memory(choice, world_size=8, micro_batch=largest).total <= usable
        assert estimate_memory(choice, world_size=8, micro_batch=largest + 1).total > usable
    assert plan["recommendation"] == fitting[0]["overrides"]
    assert any(o.startswith("data.batch_size=") for o in plan["recommendation"])
    assert all(math.isfinite(r["time"]["wall_clock_s"]) for r in fitting)


def test_search_when_nothing_fits_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--config", BASE, "--gpus", "8", "--gpu-memory", "1", "--search"]
    code, out, err = _run(capsys, *argv, "--json", estimator=_stand_in)
    assert code == 0, err
    plan = json.loads(out)
    assert plan["recommendation"] is None and not any(row["fits"] for row in plan["search"])
    assert all(row["max_micro_batch"] == 0 and row["overrides"] == [] for row in plan["search"])
    code, out, _ = _run(capsys, *argv, estimator=_stand_in)
    assert "does not fit" in out and "nothing fits" in out and "fits                              NO" in out


def test_a_runs_own_speed_comes_back_from_its_mfu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Round trip through the trainer's MFU formula: a run logging T img/s per device on an H100 is planned at T."""
    for checkpointing in ("none", "every:2"):
        cfg = load_config(BASE, [f"model.activation_checkpointing={checkpointing}"])
        forward = flop_profile(cfg).forward
        throughput = 1234.0
        mfu_pct = 100.0 * 3 * forward * throughput / 989e12  # pretrain/trainer.py: achieved / peak, 3 x forward
        _write_run(tmp_path / checkpointing, [mfu_pct], checkpointing=checkpointing)
        argv = ["--config", BASE, f"model.activation_checkpointing={checkpointing}", "--gpus", "16", "--gpu", "H100"]
        argv += ["--images", IMAGENET, "--json", "--from-run", str(tmp_path / checkpointing)]
        code, out, err = _run(capsys, *argv, estimator=_stand_in)
        assert code == 0, err
        time = json.loads(out)["time"]
        assert time["images_per_s_per_gpu"] == pytest.approx(throughput)
        assert time["model_mfu"] == pytest.approx(mfu_pct / 100)
