"""Fine-tuning step throughput: our SwinV2 classifier against timm's SwinTransformerV2, with the same recipe pieces.

Usage: python bench/finetune_step.py [--size tiny] [--img 224] [--window 14] [--batch 8] [--classes 1000]
        [--steps 3] [--repeats 3] [--threads N] [--precisions fp32,bf16] [--compile]

One step is what ``python -m pretrain.finetune`` does per batch, without the data loader: timm's Mixup/CutMix on the
batch (the recipe's 0.8 / 1.0, label smoothing 0.1, batch mode), forward, timm's SoftTargetCrossEntropy, backward,
AdamW over layer-wise lr-decay groups (decay 0.75, weight decay 0.05), zero_grad. Both models are built at the
official fine-tuning geometry (224 px, window 14, pretrained windows [12, 12, 12, 6], drop path 0.1) with the same
weights (official <-> timm key mapping; their eval-mode logits are compared before timing).

The groups come from each model's own recipe code: ours from the fine-tuning task (``FinetuneTask.param_groups``, the
official layer ids), timm's from ``timm.optim.param_groups_layer_decay`` (timm's layer ids for SwinV2). Both go to
the trainer's optimizer builder (``pretrain.optim.build_optimizer``: torch's fused AdamW on the CPU) with each
group's lr set to base lr x lr_scale, as the trainer's scheduler does. ``--compile`` adds our model with its blocks
compiled (``model.compile: true``) against the same eager timm figure. The models run interleaved, ours then timm, in
each of ``--repeats`` rounds; the best round of each is reported (the CPU is shared, the best round is the least
disturbed one). Precision: fp32, and bf16 autocast on the device.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _timing import rows_against_timm

from pretrain.backbone import ModelConfig, backbone_kwargs
from pretrain.finetune.config import AugmentConfig, FinetuneConfig
from pretrain.finetune.model import build_classifier
from pretrain.finetune.task import FinetuneTask
from pretrain.finetune.transforms import build_criterion, build_mixup
from pretrain.optim import build_optimizer
from swinv2 import compile_blocks, official_to_timm

BASE_LR = 1e-3


def _config(args: argparse.Namespace) -> FinetuneConfig:
    """The fine-tuning defaults (official recipe) at the benchmark's size and geometry."""
    cfg = FinetuneConfig()
    cfg.model = ModelConfig(
        size=args.size,
        img_size=args.img,
        window_size=args.window,
        pretrained_window_sizes=list(args.pretrained_windows),
        drop_path_rate=0.1,
        attn_impl=args.attn_impl,
    )
    cfg.optimizer.base_lr = BASE_LR
    return cfg


def _build_pair(cfg: FinetuneConfig, classes: int, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

    ours = build_classifier(cfg.model, classes, "full").to(device)
    kw = backbone_kwargs(cfg.model)
    ref = TimmSwinV2(
        img_size=kw["img_size"],
        window_size=kw["window_size"],
        embed_dim=kw["embed_dim"],
        depths=tuple(kw["depths"]),
        num_heads=tuple(kw["num_heads"]),
        pretrained_window_sizes=tuple(kw["pretrained_window_sizes"]),
        drop_path_rate=kw["drop_path_rate"],
        num_classes=classes,
    ).to(device)
    ref.load_state_dict(official_to_timm(ours.state_dict()), strict=True)
    return ours, ref


def _check_same_function(ours: torch.nn.Module, ref: torch.nn.Module, img: int, device: torch.device) -> float:
    """Largest eval-mode logit difference on two random images (the two models must compute the same function)."""
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(1)).to(device)
    ours.eval()
    ref.eval()
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    ours.train()
    ref.train()
    if diff > 1e-3:
        raise SystemExit(f"our classifier and timm's differ by {diff:.2e} in eval-mode logits: not the same weights")
    return diff


def _groups(name: str, model: torch.nn.Module, cfg: FinetuneConfig) -> list[dict]:
    """Layer-decay groups from each model's own recipe code, each group's lr set as the trainer's scheduler does."""
    if name == "timm":
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(
            model,
            weight_decay=cfg.optimizer.weight_decay,
            no_weight_decay_list=model.no_weight_decay(),  # type: ignore[operator]
            layer_decay=cfg.optimizer.layer_decay,
        )
    else:
        groups = FinetuneTask(cfg).param_groups(model)
    for group in groups:
        group["lr"] = BASE_LR * group.get("lr_scale", 1.0)
    return groups


def _step_fn(
    name: str, model: torch.nn.Module, cfg: FinetuneConfig, args: argparse.Namespace, dtype: torch.dtype | None
) -> Callable[[], None]:
    device = next(model.parameters()).device
    aug = AugmentConfig()
    mixup = build_mixup(aug, args.classes)
    criterion = build_criterion(aug, mixing=mixup is not None)
    opt = build_optimizer(_groups(name, model, cfg), cfg, device.type)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.batch, 3, args.img, args.img, generator=gen).to(device)
    y = torch.randint(0, args.classes, (args.batch,), generator=gen).to(device)

    def step() -> None:
        # timm's Mixup mixes the batch in place: a fresh copy each step, as the loader's batch would be.
        images, targets = mixup(x.clone(), y) if mixup is not None else (x, y)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(images)
        loss = criterion(logits.float(), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def throughput(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One row per precision and variant of ours: img/s, timm's img/s and the ratio."""
    cfg = _config(args)
    rows = []
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    for precision in args.precisions.split(","):
        if precision not in dtypes:
            raise SystemExit(f"--precisions: {precision!r}; accepted: fp32, bf16 (comma-separated)")
        np.random.seed(0)  # timm's Mixup draws from numpy's global generator
        torch.manual_seed(0)
        ours, ref = _build_pair(cfg, args.classes, device)
        diff = _check_same_function(ours, ref, args.img, device)
        steps = {"ours": _step_fn("ours", ours, cfg, args, dtypes[precision])}
        steps["timm"] = _step_fn("timm", ref, cfg, args, dtypes[precision])
        if args.compile:
            compiled, _ = _build_pair(cfg, args.classes, device)
            compile_blocks(compiled)
            steps["ours-compiled"] = _step_fn("ours", compiled, cfg, args, dtypes[precision])
        timing = {"batch": args.batch, "steps": args.steps, "repeats": args.repeats, "device": device}
        for row in rows_against_timm(steps, **timing, precision=precision):
            rows.append(row)
            print(
                f"fine-tune step  SwinV2-{args.size[0].upper()} {args.img}/w{args.window} batch {args.batch} "
                f"{precision:5s} {row['model']:14s} {row['img_s']:7.2f} img/s   timm {row['timm_img_s']:7.2f} img/s   "
                f"ratio {row['img_s'] / row['timm_img_s']:.2f}x   (eval logits max diff {diff:.1e})",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", choices=("tiny", "small", "base"))
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--window", type=int, default=14)
    parser.add_argument("--pretrained-windows", type=int, nargs=4, default=[12, 12, 12, 6])
    parser.add_argument("--batch", type=int, default=8, help="even: timm's Mixup pairs a batch with its reverse")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best round is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32 and/or bf16 (autocast)")
    parser.add_argument("--attn-impl", default="auto", choices=("auto", "sdpa", "explicit"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time our model with its blocks compiled")
    args = parser.parse_args()
    if args.batch % 2:
        raise SystemExit(f"--batch={args.batch}; accepted: an even batch (timm's Mixup pairs a batch with its reverse)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}  torch {torch.__version__}  threads {torch.get_num_threads()}  attn_impl {args.attn_impl}")
    print(f"best of {args.repeats} rounds x {args.steps} steps (ours and timm interleaved)")
    print("each step: Mixup/CutMix, soft-target CE, fused AdamW over layer-decay groups (0.75), drop path 0.1")
    throughput(args, device)


if __name__ == "__main__":
    main()
