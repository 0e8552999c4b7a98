"""Typed configuration: recipes load with the official values, every impossible setting is a ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import ConfigError, PretrainConfig, load_config, to_dict, to_yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
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
    ],
)
def test_config_errors_name_key_and_accepted_values(override: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(BASE, [override])
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
