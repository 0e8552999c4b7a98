"""Train-step throughput of our SwinTransformerV2 vs timm's, and peak memory with / without activation checkpointing.

Usage: python bench/model_step.py [--batch 8] [--mem-batch 16] [--steps 3] [--repeats 3] [--threads N]
        [--attn-impl auto] [--compile] [--skip-memory] [--skip-throughput]

Throughput: SwinV2-T at 192/w12 (the SimMIM pretraining geometry), batch 8, one step = forward, cross-entropy on
random labels, backward, AdamW step (torch's fused AdamW for both models, the one the trainer uses). ``--compile``
adds a row for our model with its blocks compiled as the trainer's ``model.compile=true`` does (swinv2.compile_blocks,
default inductor mode; compile time is excluded and printed separately) against the same eager timm figure. Both
models get the same weights (official <-> timm key mapping) and run interleaved, ours then timm, in each of
``--repeats`` rounds; the best round of each is reported (the CPU is shared with other jobs, the best round is the
least disturbed one).
Precision: fp32, and bf16 autocast on the device.

Memory: each configuration runs in a fresh subprocess. On CUDA the figure is torch.cuda.max_memory_allocated during
one training step. On CPU it is the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) over the resident set just before the step, with glibc told to serve every allocation over
64 KiB by mmap (MALLOC_MMAP_THRESHOLD_) so freed activations go back to the OS instead of staying cached in the heap;
the step before the measured one allocates gradients and AdamW state, so the figure is the activation peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _timing import rows_against_timm

from swinv2 import compile_blocks, create_model, official_to_timm

TINY = {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)}


def _build_pair(img: int, window: int, device: torch.device, attn_impl: str):
    from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

    ours = create_model("tiny", img_size=img, window_size=window, attn_impl=attn_impl).to(device)
    ref = TimmSwinV2(img_size=img, window_size=window, **TINY).to(device)
    ref.load_state_dict(official_to_timm(ours.state_dict()), strict=True)
    return ours, ref


def _step_fn(model: torch.nn.Module, batch: int, img: int, device: torch.device, dtype: torch.dtype | None):
    # torch's fused AdamW, as the trainer builds it (pretrain/optim.py), for both models alike.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, img, img, generator=gen).to(device)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def throughput(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    for precision, dtype in (("fp32", None), ("bf16-autocast", torch.bfloat16)):
        ours, ref = _build_pair(args.img, args.window, device, args.attn_impl)
        steps = {"ours": _step_fn(ours, args.batch, args.img, device, dtype)}
        steps["timm"] = _step_fn(ref, args.batch, args.img, device, dtype)
        if args.compile:
            compiled, _ = _build_pair(args.img, args.window, device, args.attn_impl)
            compile_blocks(compiled)
            steps["ours-compiled"] = _step_fn(compiled, args.batch, args.img, device, dtype)
        timing = {"batch": args.batch, "steps": args.steps, "repeats": args.repeats, "device": device}
        for row in rows_against_timm(steps, **timing, precision=precision):
            rows.append(row)
            print(
                f"train step  SwinV2-T {args.img}/w{args.window} batch {args.batch} {precision:14s} "
                f"{row['model']:14s} {row['img_s']:7.2f} img/s   timm {row['timm_img_s']:7.2f} img/s   "
                f"ratio {row['img_s'] / row['timm_img_s']:.2f}x",
                flush=True,
            )
    return rows


def _read_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def memory_child(args: argparse.Namespace) -> None:
    """Run in a subprocess: one warm-up step, then measure the peak of one training step; print JSON."""
    device = torch.device(args.device)
    model = create_model("tiny", img_size=args.img, window_size=args.window, attn_impl=args.attn_impl).to(device)
    if args.checkpointing:
        model.set_grad_checkpointing(True)
    step = _step_fn(model, args.mem_batch, args.img, device, None)
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _read_status("VmRSS")
        step()
        peak = _read_status("VmHWM") - base
    print(json.dumps({"peak_bytes": peak}))


def memory(args: argparse.Namespace, device: torch.device) -> dict:
    result = {}
    for label, flag in (("without", []), ("with", ["--checkpointing"])):
        cmd = [sys.executable, __file__, "--memory-child", "--device", str(device), "--img", str(args.img)]
        cmd += ["--window", str(args.window), "--mem-batch", str(args.mem_batch), "--attn-impl", args.attn_impl]
        cmd += ["--threads", str(args.threads), *flag]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        result[label] = json.loads(out.strip().splitlines()[-1])["peak_bytes"]
    ratio = result["with"] / result["without"]
    kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS growth"
    print(
        f"memory      SwinV2-T {args.img}/w{args.window} batch {args.mem_batch} fp32 train step ({kind}): "
        f"no checkpointing {result['without'] / 2**20:8.1f} MiB   checkpointing all blocks "
        f"{result['with'] / 2**20:8.1f} MiB   ratio {ratio:.2f}",
        flush=True,
    )
    return {"without_bytes": result["without"], "with_bytes": result["with"], "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--img", type=int, default=192)
    parser.add_argument("--window", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mem-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best round is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--attn-impl", default="auto", choices=("auto", "sdpa", "explicit"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    device = torch.device(args.device)
    print(f"device {device}  torch {torch.__version__}  threads {torch.get_num_threads()}  attn_impl {args.attn_impl}")
    print(f"best of {args.repeats} rounds x {args.steps} steps (ours and timm interleaved)")
    if not args.skip_throughput:
        throughput(args, device)
    if not args.skip_memory:
        memory(args, device)


if __name__ == "__main__":
    main()
