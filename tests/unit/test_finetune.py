"""Fine-tuning in-process (one gloo rank, tiny SwinV2): strict loading from a real pretraining checkpoint at another
geometry, from an HF model directory and with SwinV2-H/G's extra norms; labelled shards; the official layer-decay
groups, Mixup/CutMix targets, evaluation counted once over any world size, --eval-only against timm's own logits, and
an exact resume of a fine-tune run (folder source)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from pretrain import convert
from pretrain.checks import ConfigError
from pretrain.config import load_config
from pretrain.data import build_eval_loader, resolve_labelled_source
from pretrain.distributed import LaunchEnv
from pretrain.finetune import FinetuneTask, load_finetune_config
from pretrain.finetune.eval_only import classifier_from, evaluate_path
from pretrain.finetune.evaluation import classification_sums, metrics_from_sums
from pretrain.finetune.transforms import build_mixup, eval_transform
from pretrain.finetune.weights import read_weights
from pretrain.formats import official_to_timm, save_weights_file
from pretrain.shards import write_shards
from pretrain.tasks.simmim import SimMIMTask
from pretrain.trainer import Trainer
from swinv2 import SwinTransformerV2
from tests.helpers.launch import make_image_folder, read_records
from tests.helpers.tiny import TINY_BACKBONE, TINY_MODEL
from tests.helpers.training import train_in_process

CPU = [
    "training.device=cpu",
    "training.precision=fp32",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
    "logging.log_every=1",
    "distributed.zero_stage=0",
]
# Fine-tuning geometry: pretraining ran at 64 px / window 4 (stage windows [4, 4, 4, 2]); fine-tuning at 96 / 6.
FT_GEOMETRY = ["model.img_size=96", "model.window_size=6", "model.pretrained_window_sizes=[4,4,4,2]"]


@pytest.fixture(scope="module")
def launch(single_rank: LaunchEnv) -> LaunchEnv:
    return single_rank


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ft-data")
    return {"train": make_image_folder(root / "train", 16), "val": make_image_folder(root / "val", 7, seed=1)}


@pytest.fixture(scope="module")
def pretrained_run(launch: LaunchEnv, data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pretrain(launch, data, tmp_path_factory.mktemp("pretrain"))


def finetune_cfg(data: dict[str, Path], run_dir: Path, *overrides: str) -> object:
    return load_finetune_config(
        None,
        [
            *TINY_BACKBONE,
            *CPU,
            *FT_GEOMETRY,
            f"data.train_path={data['train']}",
            f"data.val_path={data['val']}",
            "data.batch_size=4",
            "data.num_workers=0",
            f"training.output_dir={run_dir}",
            "schedule.epochs=2",
            "schedule.warmup_epochs=1",
            "optimizer.lr_reference_batch=0",
            "optimizer.base_lr=1e-3",
            *overrides,
        ],
    )


def test_finetune_from_a_pretraining_checkpoint_at_another_geometry_loads_every_key(
    launch: LaunchEnv, data: dict[str, Path], pretrained_run: Path, tmp_path: Path
) -> None:
    source = read_weights(pretrained_run)
    assert source.kind == "simmim" and source.geometry["img_size"] == 64
    cfg = finetune_cfg(data, tmp_path / "ft", f"finetune.init={pretrained_run}", "training.max_steps=1")
    task = FinetuneTask(cfg)
    trainer = Trainer(cfg, launch, task)
    try:
        model = trainer.engine.module
        assert model.img_size == (96, 96) and model.layers[3].blocks[0].attn.pretrained_window_size == (2, 2)
        state = model.state_dict()
        backbone = {k for k in state if not k.startswith("head.")}
        assert backbone == set(source.weights)  # every backbone key, nothing else
        assert all(torch.equal(state[k], source.weights[k]) for k in backbone)
        assert any("strictly" in note for note in task.notes)
    finally:
        trainer.close()
    # A window normaliser that contradicts pretraining is refused before anything is built.
    bad = finetune_cfg(
        data, tmp_path / "bad", f"finetune.init={pretrained_run}", "model.pretrained_window_sizes=[0,0,0,0]"
    )
    with pytest.raises(ConfigError, match=r"accepted: model.pretrained_window_sizes=\[4, 4, 4, 2\]"):
        FinetuneTask(bad).resolve_data(1)


def _pretrain(launch: LaunchEnv, data: dict[str, Path], run: Path, *overrides: str) -> Path:
    """A real SimMIM pretraining run (2 steps at 64 px, window 4) with its DeepSpeed checkpoint."""
    cfg = load_config(
        None,
        [
            *TINY_MODEL,
            *CPU,
            "data.source=folder",
            f"data.path={data['train']}",
            "data.batch_size=4",
            "data.num_workers=0",
            f"training.output_dir={run}",
            "training.max_steps=2",
            "logging.image_every=0",
            *overrides,
        ],
    )
    train_in_process(cfg, launch, SimMIMTask(cfg))
    return run


def _finetune_from(cfg: object, launch: LaunchEnv, weights: dict[str, torch.Tensor]) -> None:
    """Build a fine-tune trainer, check that every backbone key of its model came from ``weights`` value for value
    (and nothing else did), then run it to its end."""
    trainer = Trainer(cfg, launch, FinetuneTask(cfg))
    try:
        state = trainer.engine.module.state_dict()
        backbone = {k for k in state if not k.startswith("head.")}
        assert backbone == set(weights)
        for key in backbone:
            assert torch.equal(state[key], weights[key].to(state[key].dtype)), key
        assert trainer.train() == 0
    finally:
        trainer.close()


def test_finetune_trains_on_labelled_shards_from_an_hf_directory(
    launch: LaunchEnv, data: dict[str, Path], pretrained_run: Path, tmp_path: Path
) -> None:
    """Pretraining checkpoint -> consolidated file -> HF model directory -> fine-tuning on labelled shards."""
    consolidated = tmp_path / "simmim.safetensors"
    assert convert.main(["consolidate", str(pretrained_run), "-o", str(consolidated)]) == 0
    hf_dir = tmp_path / "hf"
    assert convert.main(["export", "--to", "hf", str(consolidated), "-o", str(hf_dir)]) == 0
    source = read_weights(hf_dir)
    assert source.kind == "simmim" and "mask_token" not in source.weights and source.geometry["img_size"] == 64
    shards = {split: tmp_path / f"{split}-shards" for split in ("train", "val")}
    for split, out in shards.items():
        write_shards(data[split], out, maxcount=5, progress=False, labels=True)
    run_dir = tmp_path / "ft"
    cfg = finetune_cfg(
        data,
        run_dir,
        "data.source=webdataset",
        f"data.train_path={shards['train']}",
        f"data.val_path={shards['val']}",
        f"finetune.init={hf_dir}",
        "training.max_steps=2",
    )
    _finetune_from(cfg, launch, source.weights)
    records = read_records(run_dir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    final = [r for r in records if "eval/top1" in r][-1]
    assert final["eval/samples"] == 7  # every validation shard sample once


def test_huge_style_extra_norms_pretrain_then_finetune_strictly(
    launch: LaunchEnv, data: dict[str, Path], tmp_path: Path
) -> None:
    """SwinV2-H/G's extra main-branch LayerNorms survive pretraining -> fine-tuning (they have no timm/HF layout)."""
    extra = ["model.depths=[1,1,3,1]", "model.extra_norm_every=1"]
    run = _pretrain(launch, data, tmp_path / "pretrain", *extra)
    source = read_weights(run)
    extra_norms = sorted(k for k in source.weights if ".extra_norm." in k)
    assert extra_norms == [f"layers.2.blocks.{i}.extra_norm.{p}" for i in (0, 1) for p in ("bias", "weight")]
    cfg = finetune_cfg(data, tmp_path / "ft", *extra, f"finetune.init={run}", "training.max_steps=1")
    _finetune_from(cfg, launch, source.weights)


def test_layer_decay_groups_follow_the_official_ids_and_scales(data: dict[str, Path], tmp_path: Path) -> None:
    cfg = finetune_cfg(data, tmp_path, "model.depths=[2,2,2,2]", "optimizer.layer_decay=0.75")
    task = FinetuneTask(cfg)
    task.resolve_data(1)
    model = task.build_model()
    groups = task.param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    depth = 8
    expected = {
        "patch_embed.proj.weight": (0, 0.05),
        "layers.0.blocks.0.attn.qkv.weight": (1, 0.05),
        "layers.0.blocks.1.norm1.weight": (2, 0.0),
        "layers.0.downsample.reduction.weight": (2, 0.05),  # the id of the stage's last block
        "layers.2.blocks.1.attn.cpb_mlp.0.weight": (6, 0.0),  # no decay for the position-bias MLP
        "layers.3.blocks.1.attn.logit_scale": (8, 0.0),
        "norm.weight": (9, 0.0),
        "head.weight": (9, 0.05),
        "head.bias": (9, 0.0),
    }
    found = {names[id(p)]: g for g in groups for p in g["params"]}
    assert len(found) == sum(1 for _ in model.parameters())
    for name, (layer, decay) in expected.items():
        group = found[name]
        assert (group["layer_id"], group["weight_decay"]) == (layer, decay), name
        assert group["lr_scale"] == pytest.approx(0.75 ** (depth + 1 - layer)), name


def test_mixup_cutmix_targets_sum_to_one(data: dict[str, Path], tmp_path: Path) -> None:
    cfg = finetune_cfg(data, tmp_path)  # the official 0.8 / 1.0 / smoothing 0.1 defaults
    mixup = build_mixup(cfg.augment, num_classes=5)
    torch.manual_seed(0)
    images, labels = torch.rand(8, 3, 16, 16), torch.randint(0, 5, (8,))
    for _ in range(6):  # both Mixup and CutMix are drawn over these
        mixed, targets = mixup(images.clone(), labels)
        assert mixed.shape == images.shape and targets.shape == (8, 5)
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        assert (targets >= 0.1 / 5 - 1e-6).all()  # smoothing puts mass on every class
    task = FinetuneTask(finetune_cfg(data, tmp_path, "data.batch_size=3"))
    with pytest.raises(ConfigError, match=r"even data\.batch_size"):
        task.resolve_data(1)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_evaluation_counts_every_sample_once_at_any_world_size(
    data: dict[str, Path], tmp_path: Path, world: int
) -> None:
    cfg = finetune_cfg(data, tmp_path, "data.batch_size=2", "model.img_size=32", "model.window_size=4")
    source = resolve_labelled_source(cfg.data, "val", world)
    transform = eval_transform(cfg.augment, 32)
    weight = torch.randn(2, 3 * 32 * 32, generator=torch.Generator().manual_seed(0))

    def logits(images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1) @ weight.T

    total = torch.zeros(5, dtype=torch.float64)
    for rank in range(world):  # what the all-reduce adds up
        for batch in build_eval_loader(cfg.data, source, transform, rank=rank, world_size=world):
            total[:4] += classification_sums(logits(batch["images"]), batch["labels"], batch["valid"])
    metrics = metrics_from_sums(total)
    reference = [transform(Image.open(f).convert("RGB")) for f in source.files]
    ref_logits = logits(torch.stack(reference))
    ref_top1 = (ref_logits.argmax(1) == torch.tensor(source.labels)).double().mean().item() * 100
    assert metrics["eval/samples"] == 7
    assert metrics["eval/top1"] == pytest.approx(ref_top1)
    assert metrics["eval/top5"] == 100.0  # two classes


def test_eval_only_on_a_timm_file_equals_timm_logits(launch: LaunchEnv, data: dict[str, Path], tmp_path: Path) -> None:
    import timm.models.swin_transformer_v2 as timm_swin

    torch.manual_seed(0)
    ours = SwinTransformerV2(
        img_size=32, window_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), num_classes=2
    )
    for p in ours.parameters():  # leave the identity-at-init post-norms: make every block act
        p.data.normal_(0, 0.2)
    timm_file = tmp_path / "timm.safetensors"
    save_weights_file(timm_file, official_to_timm(ours.state_dict()), {})
    timm_model = timm_swin.SwinTransformerV2(
        img_size=32, window_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), num_classes=2
    ).eval()
    timm_model.load_state_dict(official_to_timm(ours.state_dict()))
    cfg = finetune_cfg(
        data, tmp_path, "model.img_size=32", "model.window_size=4", "model.pretrained_window_sizes=[0,0,0,0]"
    )
    loaded, classes, _ = classifier_from(cfg, str(timm_file))
    source = resolve_labelled_source(cfg.data, "val", 1, resolve_labelled_source(cfg.data, "train", 1).classes)
    batch = next(iter(build_eval_loader(cfg.data, source, eval_transform(cfg.augment, 32), rank=0, world_size=1)))
    with torch.no_grad():
        expected = timm_model(batch["images"])
        torch.testing.assert_close(loaded.eval()(batch["images"]), expected, rtol=1e-5, atol=1e-5)
    # The whole --eval-only path gives the metrics of timm's logits over the validation set.
    metrics = evaluate_path(cfg, str(timm_file), launch)
    total = torch.zeros(5, dtype=torch.float64)
    for b in build_eval_loader(cfg.data, source, eval_transform(cfg.augment, 32), rank=0, world_size=1):
        with torch.no_grad():
            total[:4] += classification_sums(timm_model(b["images"]), b["labels"], b["valid"])
    reference = metrics_from_sums(total)
    assert classes == 2 and metrics["eval/samples"] == 7
    for key in ("eval/top1", "eval/top5", "eval/loss"):
        assert metrics[key] == pytest.approx(reference[key], abs=1e-5), key


def test_resume_of_a_finetune_run_continues_exactly(
    launch: LaunchEnv, data: dict[str, Path], pretrained_run: Path, tmp_path: Path
) -> None:
    def run(run_dir: Path, *extra: str) -> Trainer:
        cfg = finetune_cfg(data, run_dir, f"finetune.init={pretrained_run}", "finetune.ema=true", *extra)
        return train_in_process(cfg, launch, FinetuneTask(cfg))

    straight = run(tmp_path / "straight")
    run(tmp_path / "split", "training.max_steps=3")  # stops mid-epoch 0 (4 steps per epoch)
    resumed = run(tmp_path / "split")
    log = (tmp_path / "split" / "train.log").read_text()
    assert "resumed from" in log
    # Fine-tuning has no memory model; the first start measures its peak, the resumed one says why it does not.
    assert "memory: no prediction for this task" in log and "GiB in step 2" in log
    assert "memory: peak not measured on the CPU in this start (a resumed start)" in log
    a, b = read_records(tmp_path / "straight"), read_records(tmp_path / "split")
    losses = lambda records: {r["step"]: r["loss"] for r in records if "loss" in r}  # noqa: E731
    evals = lambda records: {r["step"]: r for r in records if "eval/top1" in r}  # noqa: E731
    assert losses(a) == losses(b) and len(losses(a)) == 8
    for step, record in evals(a).items():
        other = evals(b)[step]
        for key in ("eval/top1", "eval/loss", "eval_ema/loss"):
            assert record[key] == other[key], (step, key)
    for x, y in zip(straight.engine.module.parameters(), resumed.engine.module.parameters(), strict=True):
        assert torch.equal(x, y)
    best = json.loads((tmp_path / "split" / "checkpoints" / "BEST.json").read_text())
    assert best["metric"] == "eval/top1" and (tmp_path / "split" / "checkpoints" / best["tag"] / "COMPLETE").is_file()


def test_linear_probe_trains_only_its_head(
    launch: LaunchEnv, data: dict[str, Path], pretrained_run: Path, tmp_path: Path
) -> None:
    cfg = finetune_cfg(
        data, tmp_path, f"finetune.init={pretrained_run}", "finetune.mode=linear", "training.max_steps=2"
    )
    trainer = Trainer(cfg, launch, FinetuneTask(cfg))
    try:
        model = trainer.engine.module
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert trainer.train() == 0
        changed = sorted(n for n, p in model.named_parameters() if not torch.equal(before[n], p))
        assert changed == ["head.linear.bias", "head.linear.weight"]
        assert not model.head.norm.affine and model.head.norm.eps == 1e-6
        assert model.training and not model.layers.training  # the frozen backbone never leaves eval mode
    finally:
        trainer.close()


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large", "huge", "giant"])
def test_recipes_hold_the_official_fine_tuning_values(size: str) -> None:

    recipe = Path(__file__).resolve().parents[2] / "configs" / f"finetune_swinv2_{size}_224_w14.yaml"
    cfg = load_finetune_config(recipe)
    assert (cfg.model.size, cfg.model.img_size, cfg.model.window_size) == (size, 224, 14)
    assert list(cfg.model.pretrained_window_sizes) == [12, 12, 12, 6]
    o, s, a = cfg.optimizer, cfg.schedule, cfg.augment
    assert (o.base_lr, o.warmup_lr, o.min_lr, o.weight_decay, o.layer_decay) == (1.25e-3, 2.5e-7, 2.5e-7, 0.05, 0.75)
    assert o.lr_reference_batch == 512 and (s.epochs, s.warmup_epochs) == (100, 20)
    assert cfg.model.drop_path_rate == 0.1 and a.auto_augment == "rand-m9-mstd0.5-inc1" and a.color_jitter == 0.4
    assert (a.reprob, a.remode, a.mixup, a.cutmix, a.label_smoothing) == (0.25, "pixel", 0.8, 1.0, 0.1)
    assert a.interpolation == "bicubic"


def test_cpu_demo_recipe_loads() -> None:
    cfg = load_finetune_config(Path(__file__).resolve().parents[2] / "configs" / "demo_finetune_cpu.yaml")
    assert cfg.finetune.mode == "full" and cfg.augment.auto_augment == "rand-m9-mstd0.5-inc1"


def test_linear_probe_recipe_loads() -> None:

    cfg = load_finetune_config(
        Path(__file__).resolve().parents[2] / "configs" / "finetune_linprobe_swinv2_base_224_w14.yaml"
    )
    assert cfg.finetune.mode == "linear" and cfg.model.size == "base"


def test_randaugment_posterize_at_magnitude_ten_gives_black_not_an_error() -> None:
    """``rand-m9-mstd0.5`` reaches magnitude 10, where PosterizeIncreasing keeps 0 bits; Pillow 13 refuses that."""
    from pretrain.finetune.config import AugmentConfig
    from pretrain.finetune.transforms import train_transform

    transform = train_transform(AugmentConfig(), 32)
    (randaugment,) = [step for step in transform.transforms if hasattr(step, "ops")]
    (posterize,) = [op for op in randaugment.ops if op.name.startswith("Posterize")]
    image = Image.new("RGB", (32, 32), (200, 120, 40))
    posterize.magnitude, posterize.magnitude_std, posterize.prob = 10, 0, 1.0
    assert posterize(image).getextrema() == ((0, 0), (0, 0), (0, 0))
    posterize.magnitude = 5  # 2 bits kept: the usual posterize
    assert posterize(image).getpixel((0, 0)) == (192, 64, 0)
