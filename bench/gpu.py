"""GPU acceptance run on one GPU: numerics against the CPU, SDPA against explicit attention, and the SimMIM training
step of SwinV2-B 192/w12 in bf16 at ZeRO 0/2/3, with and without activation checkpointing and compile.

    python bench/gpu.py [--out runs/bench/gpu.json] [--batch 128] [--budget-s 420]
    python bench/gpu.py --device cpu --quick      # smoke run of every code path on the CPU (not GPU figures)

1. Numerics (fp32, TF32 off): a small SimMIM model built on the CPU and copied to the device; loss and every gradient
   on the device against the CPU (explicit attention there), with the device's SDPA and explicit attention.
2. Attention: forward + backward of the SimMIM model in bf16 with attn_impl=sdpa and =explicit, and the path that
   attn_impl=auto takes now on this device (swinv2.choose_attn_impl); the faster one is what auto should pick.
3. Training step: DeepSpeed engines (deepspeed.initialize with pretrain.engine.deepspeed_config, one process, world
   size 1, nccl on GPUs and gloo on the CPU) at ZeRO 0, 2 and 3, activation checkpointing none/all, eager or
   compiled (ZeRO 0/2: swinv2.compile_blocks, as the trainer does; ZeRO 3: DeepSpeed's engine.compile); img/s, MFU
   (3 x forward FLOPs per image, recomputation not counted, against pretrain.metrics.peak_flops), peak memory and
   the planner's prediction of it (pretrain.plan.estimate_memory).
   A configuration that fails (out of memory, a compile error) is a row with its error. Configurations left when
   the time budget runs out are rows marked skipped.

Prints a table and writes JSON (``--out``; an existing file is never replaced). On a machine without a CUDA device and
without ``--device cpu`` it says so and exits 0: nothing is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from any directory
from _timing import seconds_per_step, sync  # noqa: E402  (bench/ is the script's folder)

RECIPE = REPO / "configs" / "simmim_swinv2_base_192_w12.yaml"
# A small model for the numerics check (tiny SwinV2: 4 stages of 2 blocks, 64 px, window 4).
SMALL = [
    "model.size=tiny",
    "model.embed_dim=32",
    "model.depths=[2,2,2,2]",
    "model.num_heads=[1,2,4,8]",
    "model.img_size=64",
    "model.window_size=4",
    "model.drop_path_rate=0.0",
    "simmim.mask_patch_size=16",
    "simmim.norm_target_patch_size=7",
]
# --quick: the smallest model every code path accepts (1 block per stage, 32 px), for a smoke run on a CPU.
QUICK = [*SMALL, "model.embed_dim=16", "model.depths=[1,1,1,1]", "model.img_size=32", "simmim.mask_patch_size=8"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--quick", action="store_true", help="small model, few steps: a smoke run of the code paths")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 128; --quick: 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 10)")
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--checkpointing", nargs="+", default=["none", "all"], help="model.activation_checkpointing")
    parser.add_argument("--compile", nargs="+", default=["no", "yes"], choices=["no", "yes"])
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: trace only)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting configurations after this")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default runs/bench/gpu-<time>.json)")
    args = parser.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch={args.batch}; accepted: 1 or more")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps={args.steps}; accepted: 1 or more")
    args.batch = args.batch or (2 if args.quick else 128)
    args.steps = args.steps or (2 if args.quick else 10)
    args.out = args.out or REPO / "runs" / "bench" / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    if args.out.exists():
        parser.error(f"--out {args.out} exists; accepted: a new file (results are never overwritten)")
    return args


def _config(args: argparse.Namespace, *overrides: str) -> Any:
    from pretrain.config import load_config

    base = [f"data.batch_size={args.batch}", "training.device=cpu" if args.device == "cpu" else "training.device=cuda"]
    return load_config(RECIPE, [*base, *(QUICK if args.quick else []), *overrides])


def _batch(cfg: Any, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and a SimMIM mask (about 60% of the patches masked), the same for a given config."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, cfg.model.img_size, cfg.model.img_size, generator=generator)
    grid = cfg.model.img_size // cfg.model.patch_size
    mask = (torch.rand(batch, grid, grid, generator=generator) < 0.6).float()
    return images.to(device, dtype), mask.to(device)


# ---------------------------------------------------------------------------------------------------- numerics
def numerics(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Loss and gradients of a small fp32 SimMIM model on ``device`` against the CPU (explicit attention there)."""
    from pretrain.simmim import build_simmim

    cfg = _config(args, *SMALL, "training.precision=fp32", "model.attn_impl=explicit")
    torch.manual_seed(0)
    reference = build_simmim(cfg)
    images, mask = _batch(cfg, 4, torch.device("cpu"), torch.float32)
    loss_ref = reference(images, mask)
    loss_ref.backward()
    grads_ref = {n: p.grad.detach().clone() for n, p in reference.named_parameters() if p.grad is not None}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # strict fp32 on the GPU
    result: dict[str, Any] = {"model": "SwinV2 tiny-32 64/w4", "reference": "cpu explicit fp32"}
    try:
        for impl in ("sdpa", "explicit"):
            model = build_simmim(_config(args, *SMALL, "training.precision=fp32", f"model.attn_impl={impl}"))
            model.load_state_dict(reference.state_dict())
            model.to(device)
            loss = model(images.to(device), mask.to(device))
            loss.backward()
            worst = max(
                ((p.grad.double().cpu() - grads_ref[n].double()).norm() / (grads_ref[n].double().norm() + 1e-30)).item()
                for n, p in model.named_parameters()
                if n in grads_ref
            )
            loss_rel = abs(loss.item() - loss_ref.item()) / abs(loss_ref.item())
            result[f"{device.type}_{impl}"] = {
                "loss": loss.item(),
                "loss_ref": loss_ref.item(),
                "loss_rel_err": loss_rel,
                "grad_max_rel_l2_err": worst,
                "ok": loss_rel < 1e-4 and worst < 1e-3,
            }
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return result


# ---------------------------------------------------------------------------------------------------- attention
def attention(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Forward + backward of the SimMIM model in bf16 (module cast like DeepSpeed's bf16 mode) per attention path."""
    from pretrain.simmim import build_simmim
    from swinv2 import choose_attn_impl

    batch = max(1, args.batch // 2)
    result: dict[str, Any] = {"dtype": "bfloat16", "batch": batch}
    losses = {}
    for impl in ("sdpa", "explicit"):
        cfg = _config(args, f"model.attn_impl={impl}", "training.precision=bf16")
        torch.manual_seed(0)
        model = build_simmim(cfg).to(device, torch.bfloat16)
        images, mask = _batch(cfg, batch, device, torch.bfloat16)

        def step(model: torch.nn.Module = model, images: torch.Tensor = images, mask: torch.Tensor = mask) -> None:
            model(images, mask).backward()

        _reset_peak(device)
        seconds = seconds_per_step(step, args.steps, device)
        losses[impl] = model(images, mask).item()
        result[impl] = {"ms_per_step": 1e3 * seconds, "img_per_s": batch / seconds, "peak_gib": _peak_gib(device)}
        del model
        _free(device)
    faster = min(("sdpa", "explicit"), key=lambda impl: result[impl]["ms_per_step"])
    result["loss_abs_diff"] = abs(losses["sdpa"] - losses["explicit"])
    result["faster"] = faster
    result["auto_picks_now"] = choose_attn_impl(device.type, torch.bfloat16)
    result["auto_agrees"] = result["auto_picks_now"] == faster
    return result


# ------------------------------------------------------------------------------------------------ training step
def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    """Peak device memory since the last reset (GPU); the process's resident high-water mark (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _free(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _engine(cfg: Any, compiled: bool, backend: str) -> tuple[Any, str]:
    """A DeepSpeed engine for SimMIM at ``cfg``'s ZeRO stage, compiled as asked; (engine, how it was compiled)."""
    import deepspeed

    from pretrain.engine import deepspeed_config
    from pretrain.optim import build_optimizer
    from pretrain.simmim import build_simmim, simmim_param_groups
    from swinv2 import compile_blocks, parse_checkpointing

    ds_config = deepspeed_config(cfg, 1)
    stage3 = cfg.distributed.zero_stage == 3
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds_config) if stage3 else contextlib.nullcontext():
        model = build_simmim(cfg)
    model.encoder.set_grad_checkpointing(**parse_checkpointing(cfg.model.activation_checkpointing))
    how = "eager"
    if compiled and not stage3:
        compile_blocks(model, backend=backend)
        how = f"compile_blocks ({backend})"
    device_name = "cuda" if cfg.training.device == "cuda" else "cpu"
    optimizer = build_optimizer(simmim_param_groups(model, cfg), cfg, device_name)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    if compiled and stage3:
        engine.compile(backend=backend)  # DeepSpeed's path: it compiles around ZeRO-3's parameter gathering
        how = f"engine.compile ({backend})"
    return engine, how


def train_step(
    args: argparse.Namespace, device: torch.device, zero: int, ckpt: str, compiled: bool, flops: float
) -> dict[str, Any]:
    """img/s, MFU and peak memory of one engine configuration (``flops``: forward FLOPs per image)."""
    from pretrain.metrics import peak_flops

    overrides = [f"distributed.zero_stage={zero}", f"model.activation_checkpointing={ckpt}", "training.precision=bf16"]
    cfg = _config(args, *overrides)
    row: dict[str, Any] = {"zero": zero, "checkpointing": ckpt, "compile": compiled}
    peak, _ = peak_flops(device, torch.bfloat16)
    _reset_peak(device)
    start = time.perf_counter()
    engine, row["how"] = _engine(cfg, compiled, args.compile_backend)
    images, mask = _batch(cfg, args.batch, device, torch.bfloat16)

    def step() -> None:
        engine.backward(engine(images, mask))
        engine.step()

    first = time.perf_counter()
    step()  # the first step carries compilation and DeepSpeed's lazy set-up
    sync(device)
    row["first_step_s"] = time.perf_counter() - first
    seconds = seconds_per_step(step, args.steps, device, warmup=1)
    row.update(
        s_per_step=seconds,
        img_per_s=args.batch / seconds,
        mfu_pct=100.0 * 3 * flops * (args.batch / seconds) / peak,
        peak_gib=_peak_gib(device),
        setup_s=first - start,
    )
    # The planner's prediction for the same setting (on a GPU, peak_gib is max_memory_allocated since the engine was
    # built: the README's predicted-against-measured table comes from these two columns).
    from pretrain.plan import estimate_memory

    planned = estimate_memory(cfg, world_size=1, micro_batch=args.batch, device=device.type)
    row["planned_gib"] = planned.total / 2**30
    return row  # the engine goes with this frame; sweep() then frees its memory


def sweep(args: argparse.Namespace, device: torch.device, started: float) -> list[dict[str, Any]]:
    """Every (ZeRO stage, checkpointing, compile) configuration, eager ones first, within the time budget."""
    from pretrain.metrics import count_forward_flops
    from pretrain.simmim import build_simmim

    cfg = _config(args, "training.precision=fp32")
    images, mask = _batch(cfg, 1, torch.device("cpu"), torch.float32)
    flops = count_forward_flops(build_simmim(cfg), images, mask)  # the same in every configuration: once, on the CPU
    compiles = [mode == "yes" for mode in sorted(set(args.compile), reverse=False)]  # "no" (eager) first
    plan = [(zero, ckpt, compiled) for compiled in compiles for zero in args.zero for ckpt in args.checkpointing]
    rows = []
    for zero, ckpt, compiled in plan:
        if time.perf_counter() - started > args.budget_s:
            rows.append({"zero": zero, "checkpointing": ckpt, "compile": compiled, "skipped": "time budget"})
            continue
        try:
            rows.append(train_step(args, device, zero, ckpt, compiled, flops))
        except Exception as exc:  # out of memory, a compile failure: a measured outcome, reported as such
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            error = f"{type(exc).__name__}: {first_line[:300]}"
            rows.append({"zero": zero, "checkpointing": ckpt, "compile": compiled, "error": error})
        finally:
            _free(device)
        print(_row_line(rows[-1]), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------- report
def _row_line(row: dict[str, Any]) -> str:
    head = f"zero={row['zero']} ckpt={row['checkpointing']:<4} compile={'yes' if row['compile'] else 'no ':<3}"
    if "skipped" in row:
        return f"{head}  skipped ({row['skipped']})"
    if "error" in row:
        return f"{head}  error: {row['error']}"
    return (
        f"{head}  {row['img_per_s']:9.1f} img/s  MFU {row['mfu_pct']:5.1f}%  peak {row['peak_gib']:6.2f} GiB  "
        f"(planned {row['planned_gib']:6.2f})  "
        f"{1e3 * row['s_per_step']:8.1f} ms/step  first step {row['first_step_s']:6.1f} s  ({row['how']})"
    )


def _environment(device: torch.device) -> dict[str, Any]:
    import deepspeed

    from pretrain.metrics import peak_flops

    peak, source = peak_flops(device, torch.bfloat16)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
        "deepspeed": deepspeed.__version__,
        "peak_tflops": peak / 1e12,
        "peak_source": source,
    }


def _print_summary(result: dict[str, Any]) -> None:
    env = result["environment"]
    print(
        f"\n{env['device']} ({env['device_type']}), torch {env['torch']}, DeepSpeed {env['deepspeed']}, "
        f"peak {env['peak_tflops']:.4g} TFLOP/s ({env['peak_source']})"
    )
    for name, check in result["numerics"].items():
        if isinstance(check, dict):
            print(
                f"numerics {name}: loss rel err {check['loss_rel_err']:.2e}, worst grad rel err "
                f"{check['grad_max_rel_l2_err']:.2e} -> {'ok' if check['ok'] else 'MISMATCH'}"
            )
    att = result["attention"]
    print(
        f"attention bf16 batch {att['batch']}: sdpa {att['sdpa']['ms_per_step']:.1f} ms, explicit "
        f"{att['explicit']['ms_per_step']:.1f} ms -> {att['faster']} faster; auto picks {att['auto_picks_now']} "
        f"({'agrees' if att['auto_agrees'] else 'DISAGREES'})"
    )
    print(f"training step, batch {result['batch']}, bf16, SimMIM {result['model']}:")
    for row in result["train_step"]:
        print("  " + _row_line(row))


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    want = args.device
    if want == "auto" and not torch.cuda.is_available():
        print(
            "bench/gpu.py: no CUDA device is visible (torch.cuda.is_available() is False): nothing measured. Run it "
            "on a GPU machine; --device cpu --quick runs its code paths on the CPU as a smoke test."
        )
        return 0
    if want == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: --device cuda but no CUDA device is visible; accepted here: --device cpu", file=sys.stderr)
        return 2
    from pretrain.atomic import write_text_atomic
    from pretrain.distributed import init_process_group, resolve_launch_env

    device = torch.device("cpu") if want == "cpu" else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    resolve_launch_env()
    init_process_group("nccl" if device.type == "cuda" else "gloo", 10)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "environment": _environment(device),
        "model": "SwinV2 tiny-16 32/w4 (--quick)" if args.quick else "SwinV2-B 192/w12",
        "batch": args.batch,
        "steps": args.steps,
        "quick": args.quick,
        "compile_backend": args.compile_backend,
    }
    result["numerics"] = numerics(args, device)
    result["attention"] = attention(args, device)
    result["train_step"] = sweep(args, device, started)
    result["elapsed_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    _print_summary(result)
    print(f"\nwrote {args.out} in {result['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
