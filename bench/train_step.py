"""Full SimMIM training step through the DeepSpeed engine vs the bare model step (engine overhead), img/s and MFU.

    python bench/train_step.py [--size tiny] [--img 192] [--window 12] [--batch 8] [--steps 5] [--zero 0 1 2]
                               [--precision fp32 bf16]

Both variants train the same SimMIM model on the same random batch: "bare" is forward + backward + clip + AdamW
step in plain PyTorch (bf16 through torch.autocast), "engine" is engine(images, mask) + engine.backward + engine.step
(bf16 through DeepSpeed's bf16 mode). Runs as a single process (world size 1); the best of ``--repeats`` timings is
kept, since other processes may share the machine. MFU uses the peak of pretrain.metrics.peak_flops in each
precision's compute dtype (on CPU a matmul measured in that dtype), as the trainer does.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from _timing import seconds_per_step

CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--img", type=int, default=192)
    parser.add_argument("--window", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args()

    from pretrain.distributed import init_process_group, resolve_launch_env
    from pretrain.metrics import peak_flops

    resolve_launch_env()
    init_process_group("gloo", 10)
    device = torch.device("cpu")
    print(f"SimMIM SwinV2-{args.size} {args.img}/w{args.window}, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"{'precision':<10}{'variant':<12}{'s/step':>10}{'img/s':>10}{'MFU %':>8}{'vs bare':>9}")
    bare = float("nan")
    for precision in args.precision:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        peak, source = peak_flops(device, dtype)
        print(f"{precision}: peak {peak / 1e9:.1f} GFLOP/s ({source})")
        for name, seconds, flops in _measure(precision, args):
            rate = args.batch / seconds
            mfu = 100 * 3 * flops * rate / peak
            bare = seconds if name == "bare" else bare
            print(f"{precision:<10}{name:<12}{seconds:>10.3f}{rate:>10.2f}{mfu:>8.2f}{bare / seconds:>8.2f}x")


def _measure(precision: str, args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """(variant, seconds per step, forward FLOPs per image) for the bare step and each ZeRO stage."""
    from pretrain.config import load_config
    from pretrain.engine import build_engine, compute_dtype
    from pretrain.metrics import count_forward_flops
    from pretrain.optim import build_optimizer
    from pretrain.simmim import build_simmim, simmim_param_groups
    from pretrain.tasks.simmim import SimMIMTask

    base = [
        f"model.size={args.size}",
        f"model.img_size={args.img}",
        f"model.window_size={args.window}",
        f"data.batch_size={args.batch}",
        f"training.precision={precision}",
        "training.device=cpu",
    ]
    cfg = load_config(None, base)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.img, args.img)
    grid = args.img // cfg.model.patch_size
    mask = (torch.rand(args.batch, grid, grid) > 0.4).float()
    model = build_simmim(cfg)
    flops = count_forward_flops(model, images[:1], mask[:1])
    optimizer = build_optimizer(simmim_param_groups(model, cfg), cfg, "cpu")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def bare_step() -> None:
        with autocast:
            loss = model(images, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rows = [("bare", seconds_per_step(bare_step, args.steps, CPU, warmup=1, repeats=args.repeats), flops)]
    for stage in args.zero:
        stage_cfg = load_config(None, [*base, f"distributed.zero_stage={stage}"])
        engine, _ = build_engine(stage_cfg, 1, steps_per_epoch=1000, task=SimMIMTask(stage_cfg))
        x = images.to(compute_dtype(stage_cfg))

        def engine_step(engine: object = engine, x: torch.Tensor = x) -> None:
            engine.backward(engine(x, mask))
            engine.step()

        rows.append(
            (f"zero{stage}", seconds_per_step(engine_step, args.steps, CPU, warmup=1, repeats=args.repeats), flops)
        )
    return rows


if __name__ == "__main__":
    main()
