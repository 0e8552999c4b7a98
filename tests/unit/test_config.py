"""Typed configuration: recipes load with the official values, every impossible setting is a ConfigError."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretrain.config import ConfigError, PretrainConfig, load_config, to_dict, to_yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
SIZES = ["tiny", "small", "base", "large", "huge", "giant"]


@pytest.mark.parametrize("size", SIZES)
def test_recipes_hold_the_official_values(size: str) -> None:
    cfg = load_config(CONFIGS / f"simmim_swinv2_{size}_192_w12.yaml")
    assert cfg.model.size == size
    m, s, o, sc = cfg.model, cfg.simmim, cfg.optimizer, cfg.schedule
    assert (m.img_size, m.window_size, m.patch_size, m.drop_path_rate) == (192, 12, 4, 0.1)
    assert (s.mask_patch_size, s.mask_ratio, s.norm_target, s.norm_target_patch_size) == (32, 0.6, True, 47)
    assert (o.base_lr, o.warmup_lr, o.weight_decay, o.clip_grad, o.lr_reference_batch) == (1e-4, 5e-7, 0.05, 5.0, 512)
    assert (o.betas, o.eps, o.name) == ([0.9, 0.999], 1e-8, "adamw")
    assert (sc.name, sc.epochs, sc.warmup_epochs, sc.milestones, sc.gamma) == ("multistep", 800, 10, [700], 0.1)
    assert cfg.data.batch_size == 128 and list(cfg.data.crop_scale) == [0.67, 1.0]
    if size in ("huge", "giant"):
        assert cfg.distributed.zero_stage == 3 and m.activation_checkpointing != "none"


def test_demo_config_is_small() -> None:
    cfg = load_config(CONFIGS / "demo_cpu.yaml")
    assert cfg.training.device == "cpu" and cfg.training.precision in ("fp32", "bf16")
    assert cfg.distributed.zero_stage in (0, 2) and 64 <= cfg.model.img_size <= 96
    assert "data/sample_shards" in cfg.data.path


def test_overrides_and_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        CONFIGS / "simmim_swinv2_base_192_w12.yaml",
        ["training.max_steps=7", "model.depths=[2,2,6,2]", "simmim.decay_position_bias=true"],
    )
    assert isinstance(cfg, PretrainConfig)
    assert cfg.training.max_steps == 7 and cfg.model.depths == [2, 2, 6, 2] and cfg.simmim.decay_position_bias
    text = to_yaml(cfg)
    assert "max_steps: 7" in text
    (tmp_path / "resolved.yaml").write_text(text)
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert to_dict(cfg)["model"]["depths"] == [2, 2, 6, 2]
    assert load_config(None) == PretrainConfig()


BASE = str(CONFIGS / "simmim_swinv2_base_192_w12.yaml")


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("model.bogus=1", ["'model.bogus'", "accepted keys", "window_size"]),
        ("bogus.key=1", ["'bogus'", "simmim"]),
        ("data.batch_size=abc", ["'data.batch_size'", "abc"]),
        ("simmim.norm_target=maybe", ["'simmim.norm_target'", "maybe"]),
        ("data.batch_size=0", ["data.batch_size=0", "positive"]),
        ("model.size=medium", ["model.size='medium'", "tiny, small, base, large, huge, giant"]),
        ("training.precision=fp8", ["training.precision='fp8'", "bf16, fp16, fp32"]),
        ("distributed.zero_stage=4", ["distributed.zero_stage=4", "0, 1, 2, 3"]),
        ("schedule.name=linear", ["schedule.name='linear'", "cosine, multistep"]),
        ("data.source=s3", ["data.source='s3'", "webdataset, folder"]),
        ("model.img_size=224", ["model.img_size=224", "model.window_size=12", "56x56", "7, 8, 14"]),
        ("model.window_size=7", ["model.window_size=7", "48x48"]),
        ("model.img_size=190", ["model.img_size=190", "model.patch_size=4"]),
        ("model.img_size=200", ["model.img_size=200"]),
        ("simmim.mask_patch_size=6", ["simmim.mask_patch_size=6", "multiple of model.patch_size=4"]),
        ("simmim.mask_patch_size=40", ["simmim.mask_patch_size=40", "divide model.img_size=192"]),
        ("simmim.mask_ratio=1.5", ["simmim.mask_ratio=1.5", "0 < mask_ratio < 1"]),
        ("simmim.norm_target_patch_size=48", ["simmim.norm_target_patch_size=48", "odd"]),
        ("model.num_heads=[4,8,16,30]", ["model.num_heads[3]=30"]),
        ("model.activation_checkpointing=some", ["model.activation_checkpointing", "every:K"]),
        ("model.attn_impl=flash9", ["model.attn_impl='flash9'", "sdpa"]),
        ("schedule.warmup_epochs=900", ["schedule.warmup_epochs=900"]),
        ("training.grad_accum_steps=0", ["training.grad_accum_steps=0"]),
        ("noequals", ["'noequals'", "section.key=value"]),
        ("model.extra_norm_every=-1", ["model.extra_norm_every=-1", "0 (off), a positive block count, or null"]),
        ("model.drop_rate=1.0", ["model.drop_rate=1.0", "0 <= rate < 1"]),
        ("model.attn_drop_rate=-0.1", ["model.attn_drop_rate=-0.1", "0 <= rate < 1"]),
        ("model.drop_path_rate=1.5", ["model.drop_path_rate=1.5", "0 <= rate < 1"]),
        ("model.embed_dim=0", ["model.embed_dim=0", "a positive integer or null"]),
        ("model.embed_dim=-128", ["model.embed_dim=-128", "a positive integer or null"]),
        ("model.mlp_ratio=0", ["model.mlp_ratio=0", "> 0"]),
        ("model.pretrained_window_sizes=[12,12,-1,6]", ["model.pretrained_window_sizes=[12, 12, -1, 6]", "0 (not"]),
        ("model.in_chans=1", ["model.in_chans=1", "accepted: 3", "RGB"]),
        ("model.activation_checkpointing=stages:1,4", ["stages [4] do not exist", "0..3"]),
        ("optimizer.warmup_lr=-1e-6", ["optimizer.warmup_lr=-1e-06", ">= 0"]),
        ("optimizer.min_lr=-1", ["optimizer.min_lr=-1", ">= 0"]),
        ("optimizer.weight_decay=-0.05", ["optimizer.weight_decay=-0.05", ">= 0"]),
        ("optimizer.betas=[0.9,1.0]", ["optimizer.betas=[0.9, 1.0]", "two values in [0, 1)"]),
        ("optimizer.eps=0", ["optimizer.eps=0", "> 0"]),
        ("schedule.gamma=0", ["schedule.gamma=0", "> 0"]),
        ("schedule.gamma=-0.1", ["schedule.gamma=-0.1", "> 0"]),
        ("data.shuffle_buffer=-1", ["data.shuffle_buffer=-1", "0 or 1 (no shuffling) or more"]),
        ("schedule.milestones=[700,800]", ["schedule.milestones=[700, 800]", "[800]", "epochs 1..799"]),
        ("schedule.milestones=[0]", ["schedule.milestones=[0]", "[0] outside", "epochs 1..799"]),
        ("schedule.epochs=300", ["schedule.milestones=[700]", "epochs 1..299", "schedule.epochs=300"]),
        ("schedule.epochs=1 schedule.warmup_epochs=0", ["schedule.milestones=[700]", "accepted: none (an empty list)"]),
        ("data.mean=[0.5,0.5]", ["data.mean=[0.5, 0.5]", "3 values each"]),
    ],
)
def test_config_errors_name_key_and_accepted_values(override: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(BASE, override.split())  # several overrides separated by spaces
    for word in words:
        assert word in str(info.value), str(info.value)


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  size: tiny\n  windw_size: 8\n")
    with pytest.raises(ConfigError, match=r"'model.windw_size'.*bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"fp16 is not supported on training\.device=cpu"):
        load_config(BASE, ["training.precision=fp16", "training.device=cpu"])
    with pytest.raises(ConfigError, match=r"model\.compile=true with distributed\.zero_stage=3.*zero_stage 0, 1 or 2"):
        load_config(BASE, ["model.compile=true", "distributed.zero_stage=3"])
    assert load_config(BASE, ["model.compile=true", "distributed.zero_stage=2"]).model.compile is True


def test_milestones_only_bind_the_multistep_schedule() -> None:
    # The cosine schedule ignores milestones, so the default [700] does not limit a short cosine run.
    cfg = load_config(BASE, ["schedule.name=cosine", "schedule.epochs=30", "schedule.warmup_epochs=1"])
    assert cfg.schedule.milestones == [700]
    assert load_config(BASE, ["schedule.epochs=30", "schedule.milestones=[20,29]"]).schedule.milestones == [20, 29]
    assert load_config(BASE, ["schedule.epochs=1", "schedule.warmup_epochs=0", "schedule.milestones=[]"])


@pytest.mark.parametrize(
    ("override", "key", "typed"),
    [
        ("distributed.deepspeed.train_batch_size=4096", "train_batch_size=4096", "data.batch_size"),
        (
            "distributed.deepspeed.train_micro_batch_size_per_gpu=64",
            "train_micro_batch_size_per_gpu=64",
            "data.batch_size",
        ),
        (
            "distributed.deepspeed.gradient_accumulation_steps=2",
            "gradient_accumulation_steps=2",
            "training.grad_accum_steps",
        ),
        ("distributed.deepspeed.gradient_clipping=1.0", "gradient_clipping=1.0", "optimizer.clip_grad"),
        ("distributed.deepspeed.bf16.enabled=false", "bf16.enabled=False", "training.precision"),
        ("distributed.deepspeed.bfloat16.enabled=true", "bfloat16.enabled=True", "training.precision"),
        ("distributed.deepspeed.fp16.enabled=true", "fp16.enabled=True", "training.precision"),
        ("distributed.deepspeed={fp16: true}", "fp16=True", "training.precision"),
        ("distributed.deepspeed.zero_optimization.stage=3", "zero_optimization.stage=3", "distributed.zero_stage"),
        ("distributed.deepspeed.optimizer.type=Adam", "optimizer={'type': 'Adam'}", "the optimizer section"),
        ("distributed.deepspeed.scheduler.type=WarmupLR", "scheduler={'type': 'WarmupLR'}", "the schedule section"),
    ],
)
def test_deepspeed_pass_through_refuses_typed_settings(override: str, key: str, typed: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(BASE, [override])
    message = str(info.value)
    assert f"distributed.deepspeed.{key} repeats a typed setting; set {typed}" in message, message
    assert "refused: train_batch_size, train_micro_batch_size_per_gpu" in message


def test_deepspeed_pass_through_accepts_other_keys() -> None:
    cfg = load_config(
        BASE,
        [
            "distributed.deepspeed.zero_optimization.stage3_max_live_parameters=1000",
            "distributed.deepspeed.fp16.initial_scale_power=12",  # loss-scale tuning is not a typed setting
            "distributed.deepspeed.steps_per_print=50",
        ],
    )
    assert cfg.distributed.deepspeed == {
        "zero_optimization": {"stage3_max_live_parameters": 1000},
        "fp16": {"initial_scale_power": 12},
        "steps_per_print": 50,
    }


def test_print_config_prints_the_resolved_configuration(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain",
            "--config",
            "configs/demo_cpu.yaml",
            "--print-config",
            "training.max_steps=3",
            "data.batch_size=4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    printed = yaml.safe_load(run.stdout)
    # Values from the recipe, the overrides, and defaults the recipe does not set, all in one tree.
    assert printed["model"]["img_size"] == 96 and printed["model"]["depths"] == [1, 1, 2, 1]
    assert printed["data"]["path"] == "data/sample_shards" and printed["schedule"]["name"] == "cosine"
    assert printed["training"]["max_steps"] == 3 and printed["data"]["batch_size"] == 4
    assert printed["data"]["crop_scale"] == [0.67, 1.0] and printed["optimizer"]["eps"] == 1e-8
    assert set(printed) == {f.name for f in dataclasses.fields(PretrainConfig)}
    # The printed tree is a complete recipe: loaded back, it is the same configuration.
    (tmp_path / "printed.yaml").write_text(run.stdout)
    assert load_config(tmp_path / "printed.yaml") == load_config(
        CONFIGS / "demo_cpu.yaml", ["training.max_steps=3", "data.batch_size=4"]
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"model:\n  size: [tiny\n", r"is not valid YAML: while parsing a flow sequence.*line 2"),
        (b"model:\n  size: tiny\n  size: base\n", r"is not valid YAML: .*found duplicate key size"),
        (b"\xff\xfe\x00bad", r"is not UTF-8 text \(invalid start byte at byte 0\)"),
        (b"- a\n- b\n", r"holds a list at the top level; accepted: a mapping of sections \(model, simmim"),
        (b"model: 5\n", r"section 'model' is 5, not a mapping; accepted keys in it: size, img_size"),
    ],
)
def test_unreadable_config_files_are_one_line_naming_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_config_path_that_is_a_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"is a directory, not a YAML file; accepted: a \.yaml file"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.base_lr=inf", r"optimizer\.base_lr=inf; accepted: a finite number"),
        ("distributed.timeout_minutes=inf", r"distributed\.timeout_minutes=inf; accepted: a finite number"),
        ("model.mlp_ratio=inf", r"model\.mlp_ratio=inf; accepted: a finite number"),
        ("optimizer.min_lr=nan", r"optimizer\.min_lr=nan; accepted: a finite number"),
        ("distributed.timeout_minutes=20000", r"distributed\.timeout_minutes=20000.*at most a week"),
        ("training.seed=4294967296", r"training\.seed=4294967296; accepted: 0 <= seed < 2\*\*32"),
        ("training.seed=-1", r"training\.seed=-1; accepted: 0 <= seed < 2\*\*32"),
        ("model.depths=[2,2,0,2]", r"model\.depths=\[2, 2, 0, 2\]; accepted: a non-empty list of positive block"),
        ("model.depths=[2,-2,6,2]", r"model\.depths=\[2, -2, 6, 2\]; accepted"),
        ("model.depths=[2,2", r"override 'model\.depths=\[2,2': the value cannot be parsed.*accepted: a YAML value"),
        ("data.batch_size=1e400", r"'data\.batch_size'.*could not be converted to Integer"),
    ],
)
def test_non_finite_absurd_and_malformed_values_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
