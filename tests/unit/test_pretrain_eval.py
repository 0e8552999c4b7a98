"""Evaluation while pretraining: kNN against a brute-force reference, the fixed-mask held-out loss (repeatable, the
same at any world size), pixel-space reconstructions, the eval section's checks, and the trainer evaluating every N
steps; and the linear probe over several stages."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.backbone import backbone_kwargs
from pretrain.checks import ConfigError
from pretrain.config import PretrainConfig, load_config
from pretrain.distributed import LaunchEnv
from pretrain.finetune.config import load_finetune_config
from pretrain.finetune.model import build_classifier, probe_width
from pretrain.masking import MaskGenerator
from pretrain.shards import write_shards
from pretrain.simmim import build_simmim, normalized_target, reconstruction_in_input_space
from pretrain.tasks.simmim import SimMIMTask
from pretrain.tasks.simmim_eval import (
    PretrainEvaluator,
    interleave,
    knn_correct,
    reconstruction_metrics,
    reconstruction_sums,
)
from swinv2 import SwinTransformerV2
from tests.helpers.launch import read_records
from tests.helpers.tiny import TINY_MODEL
from tests.helpers.training import train_in_process

TINY = [*TINY_MODEL, "model.drop_path_rate=0.0"]


def eval_cfg(image_folder: Callable[..., Path], *extra: str) -> PretrainConfig:
    return load_config(
        None,
        [
            *TINY,
            "eval.every_steps=1",
            f"eval.path={image_folder(7)}",  # 7 held-out images: no world size below divides them
            f"eval.knn.train_path={image_folder(10)}",
            f"eval.knn.val_path={image_folder(7)}",
            "eval.batch_size=2",
            "eval.num_workers=0",
            *extra,
        ],
    )


def brute_force_knn(
    bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, k: int, temperature: float
) -> int:
    """One query's prediction, written out: cosine similarity to every training feature, the k largest, a weighted
    vote per class."""
    sims = [float(torch.dot(query, b) / (query.norm() * b.norm())) for b in bank.double()]
    ranked = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
    votes: dict[int, float] = {}
    for i in ranked:
        label = int(bank_labels[i])
        votes[label] = votes.get(label, 0.0) + math.exp(sims[i] / temperature)
    return max(votes, key=lambda c: votes[c])


@pytest.mark.parametrize("k", [1, 5, 20, 100])  # 100 > the 60 training features: capped
def test_knn_equals_a_brute_force_reference(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    bank, bank_labels = torch.randn(60, 8, generator=g), torch.randint(0, 4, (60,), generator=g)
    queries = torch.randn(25, 8, generator=g)
    expected = [brute_force_knn(bank, bank_labels, q.double(), k, 0.07) for q in queries]
    for i, query in enumerate(queries):  # the prediction itself: correct exactly for the reference's label
        for label in range(4):
            hit = knn_correct(bank, bank_labels, query[None], torch.tensor([label]), 4, k=k, temperature=0.07)
            assert hit == int(label == expected[i]), (i, label)
    # Chunked over the queries, the count is the same.
    labels = torch.tensor(expected)
    labels[::3] = (labels[::3] + 1) % 4  # a third of them wrong
    assert knn_correct(bank, bank_labels, queries, labels, 4, k=k, temperature=0.07, chunk=7) == 25 - len(labels[::3])


def test_fixed_mask_loss_repeats_and_is_the_same_at_any_world_size(image_folder: Callable[..., Path]) -> None:
    torch.manual_seed(0)
    cfg = eval_cfg(image_folder)
    model = build_simmim(cfg).eval()
    single = PretrainEvaluator(cfg, 1)
    first, pictures = single.evaluate(model, rank=0, world_size=1)
    second, _ = single.evaluate(model, rank=0, world_size=1)
    assert first == second  # same images, same masks, same numbers
    assert first["eval/recon_samples"] == 7 and first["eval/knn_samples"] == 7
    assert first["eval/knn_train_samples"] == 10 and math.isfinite(first["eval/recon_loss"])
    assert pictures is not None and pictures["reconstruction"].shape == (4, 3, 64, 64)
    full, labels, _ = single.local_features(model, "val", 0, 1)
    for world in (2, 3):  # what the all-reduce and the all-gather put together
        evaluator = PretrainEvaluator(cfg, world)
        sums = sum(evaluator.local_reconstruction(model, rank, world)[0] for rank in range(world))
        metrics = reconstruction_metrics(sums)
        assert metrics["eval/recon_samples"] == 7
        assert metrics["eval/recon_loss"] == pytest.approx(first["eval/recon_loss"], rel=1e-6)
        parts = [evaluator.local_features(model, "val", rank, world) for rank in range(world)]
        gathered, gathered_labels = interleave([p[0] for p in parts]), interleave([p[1] for p in parts])
        keep = gathered_labels >= 0
        torch.testing.assert_close(gathered[keep], full[labels >= 0], rtol=1e-5, atol=1e-5)
        assert torch.equal(gathered_labels[keep], labels[labels >= 0])
    # Another mask seed: other masks, another loss.
    other, _ = PretrainEvaluator(eval_cfg(image_folder, "eval.mask_seed=1"), 1).evaluate(model, rank=0, world_size=1)
    assert other["eval/recon_loss"] != first["eval/recon_loss"]


def recon_at(cfg: PretrainConfig, model: torch.nn.Module, world: int) -> dict[str, float]:
    """The held-out metrics as the all-reduce over ``world`` ranks would give them."""
    evaluator = PretrainEvaluator(cfg, world)
    return reconstruction_metrics(sum(evaluator.local_reconstruction(model, r, world)[0] for r in range(world)))


def test_held_out_shards_and_unreadable_images_are_counted_once(
    image_folder: Callable[..., Path], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    write_shards(image_folder(7), tmp_path / "shards", maxcount=3, progress=False)  # shards of 3, 3 and 1
    shards = ["eval.source=webdataset", f"eval.path={tmp_path / 'shards'}", "eval.knn.train_path=''"]
    cfg = eval_cfg(image_folder, *shards, "eval.knn.val_path=''")
    model = build_simmim(cfg).eval()
    reference = recon_at(cfg, model, 1)
    assert reference["eval/recon_samples"] == 7 and reference["eval/recon_skipped"] == 0
    for world in (2, 3):
        assert recon_at(cfg, model, world)["eval/recon_loss"] == pytest.approx(reference["eval/recon_loss"], rel=1e-6)
    first_five = eval_cfg(image_folder, *shards, "eval.knn.val_path=''", "eval.max_samples=5")
    assert recon_at(first_five, model, 2)["eval/recon_samples"] == 5
    # A folder with an unreadable file: its slot is left out and counted once, whatever the world size.
    broken = eval_cfg(image_folder, f"eval.path={image_folder(7, 1)}")
    with pytest.warns(UserWarning, match="unreadable image"):
        for world in (1, 2):
            metrics = recon_at(broken, model, world)
            assert (metrics["eval/recon_samples"], metrics["eval/recon_skipped"]) == (7, 1)


@pytest.mark.parametrize("norm_target", [True, False])
def test_held_out_loss_is_simmims_loss(norm_target: bool) -> None:
    torch.manual_seed(0)
    cfg = load_config(None, [*TINY, f"simmim.norm_target={str(norm_target).lower()}"])
    model = build_simmim(cfg).eval()
    gen = MaskGenerator(64, 16, 4, 0.6)
    images = torch.randn(3, 3, 64, 64)
    mask = torch.from_numpy(np.stack([gen(np.random.default_rng(i)) for i in range(3)]))
    with torch.no_grad():
        loss, _ = model.reconstruct(images, mask)
        sums, _ = reconstruction_sums(model, images, mask, torch.ones(3, dtype=torch.bool))
        # A padding slot adds nothing.
        padded, _ = reconstruction_sums(model, images, mask, torch.tensor([True, True, False]))
        two, _ = reconstruction_sums(model, images[:2], mask[:2], torch.ones(2, dtype=torch.bool))
    assert float(sums[0] / sums[1]) == pytest.approx(float(loss), rel=1e-5)
    torch.testing.assert_close(padded, two)


@pytest.mark.parametrize("norm_target", [True, False])
def test_pixel_space_reconstruction_of_a_perfect_prediction_is_the_input(norm_target: bool) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=g) * 2 + 0.5
    images[0, :, :8, :8] = 0.25  # a flat region: zero local variance
    mask = torch.randint(0, 2, (2, 8, 8), generator=g)
    window = 7 if norm_target else None
    perfect = normalized_target(images, 7) if norm_target else images.clone()
    shown = reconstruction_in_input_space(perfect, images, mask, 4, window)
    torch.testing.assert_close(shown, images, rtol=1e-5, atol=1e-5)
    # The masked patches are the prediction, the visible ones the input.
    zeros = reconstruction_in_input_space(torch.zeros_like(images), images, mask, 4, window)
    pixels = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).bool().expand_as(images)
    assert torch.equal(zeros[~pixels], images[~pixels])
    if norm_target:  # a zero standardised prediction is the local mean
        # The mean over each pixel's in-bounds 7 x 7 window, by a plain average pool.
        box = F.avg_pool2d(F.pad(images, (3, 3, 3, 3)), 7, stride=1)
        inside = F.avg_pool2d(F.pad(torch.ones_like(images[:1, :1]), (3, 3, 3, 3)), 7, stride=1)
        local_mean = box / inside
        torch.testing.assert_close(zeros[pixels], local_mean[pixels], rtol=1e-5, atol=1e-5)
    else:
        assert not zeros[pixels].any()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["eval.every_steps=5"], r"nothing to evaluate"),
        (["eval.knn.train_path=a"], r"eval\.knn\.train_path='a', eval\.knn\.val_path=''"),
        (["eval.knn.k=0"], r"eval\.knn\.k=0"),
        (["eval.every_steps=-1"], r"eval\.every_steps=-1"),
        (["eval.source=tar"], r"eval\.source"),
    ],
)
def test_eval_section_rejects_bad_values(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [*TINY, *overrides])


def test_trainer_evaluates_every_n_steps_and_at_the_end(
    single_rank: LaunchEnv, image_folder: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = eval_cfg(
        image_folder,
        "eval.every_steps=2",
        "eval.images=2",
        "data.source=folder",
        f"data.path={image_folder(16)}",
        "data.batch_size=2",
        "data.num_workers=0",
        "training.device=cpu",
        "training.precision=fp32",
        "training.max_steps=3",
        "optimizer.warmup_lr=1e-3",  # the weights visibly move between the evaluations
        "optimizer.lr_reference_batch=0",
        f"training.output_dir={tmp_path}",
        "logging.image_every=0",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
    )
    train_in_process(cfg, single_rank, SimMIMTask(cfg))
    records = read_records(tmp_path)
    evals = {r["step"]: r for r in records if "eval/recon_loss" in r}
    assert sorted(evals) == [2, 3]  # step 2 of every 2, and the end of the run
    assert all(r["eval/recon_samples"] == 7 and "eval/knn_top1" in r for r in evals.values())
    assert evals[2]["eval/recon_loss"] != evals[3]["eval/recon_loss"]  # the weights moved, the masks did not
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "eval-step-00000002.png",
        "eval-step-00000003.png",
    ]


def test_linear_probe_concatenates_the_last_stages() -> None:
    torch.manual_seed(0)
    model_cfg = load_config(None, TINY).model  # stage widths 16, 32, 64, 128
    probe = build_classifier(model_cfg, 3, "linear", probe_stages=2).eval()
    assert probe.head.norm.num_features == 64 + 128 == probe_width(model_cfg, 2)
    assert sorted(n for n, p in probe.named_parameters() if p.requires_grad) == [
        "head.linear.bias",
        "head.linear.weight",
    ]
    plain = SwinTransformerV2(num_classes=0, **backbone_kwargs(model_cfg)).eval()
    plain.load_state_dict({k: v for k, v in probe.state_dict().items() if not k.startswith("head.")})
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = probe.forward_features(images)
        torch.testing.assert_close(features[:, 64:], plain.forward_features(images))
        tokens = plain.embed(images)  # stage 2 by hand: its blocks, before its patch merging
        for stage in plain.layers[:3]:
            for block in stage.blocks:
                tokens = block(tokens)
            stage_output, tokens = tokens, stage.downsample(tokens)
        torch.testing.assert_close(features[:, :64], stage_output.mean(dim=1))
        torch.testing.assert_close(probe.forward_features(images), features)  # nothing carried between calls
        assert probe(images).shape == (2, 3)
    base = ["model.embed_dim=16", "model.depths=[1,1,1,1]", "model.num_heads=[1,2,2,4]", "data.val_path=v"]
    load_finetune_config(None, [*base, "finetune.mode=linear", "finetune.init=w", "finetune.probe_stages=4"])
    with pytest.raises(ConfigError, match=r"finetune\.probe_stages=5; accepted: 1 to 4"):
        load_finetune_config(None, [*base, "finetune.mode=linear", "finetune.init=w", "finetune.probe_stages=5"])
    with pytest.raises(ConfigError, match=r"probe_stages > 1 with mode=linear only"):
        load_finetune_config(None, [*base, "finetune.probe_stages=2"])
