"""Peak memory of the conversion subcommands, as a multiple of the model's size.

Target: about two copies of the model at most. Each subcommand runs in its own process; its peak RSS minus that
of a process that only imported the same modules is divided by the size of the fp32 SimMIM weights. The peak RSS
counts the pages of memory-mapped inputs the tool read; ``anonymous_peak_over_model`` leaves them out (what the
conversion itself allocates).

``consolidate`` reads DeepSpeed checkpoints this script writes itself: one single-process CPU run per ZeRO stage
(the trainer's own engine and checkpoint code, saved right after initialisation, no training step), in bf16 by
default so that stage 0 exercises the fp32 master weights kept by the optimizer.

    python bench/convert_memory.py [--size base] [--img-size 192] [--window-size 12] [--zero-stages 0 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Runs convert.main with ARGV after importing PRELOAD (comma-separated modules); prints the peak RSS of the process
# (VmHWM: ru_maxrss would also count the parent's memory at the fork) and the peak anonymous memory (RssAnon, sampled
# every 5 ms), i.e. without the memory-mapped input files, whose pages the kernel can drop at any time. Linux only.
PROBE = """
import importlib, os, sys, threading, time
import torch
for name in filter(None, os.environ.get("PRELOAD", "").split(",")):
    importlib.import_module(name)
from pretrain import convert
from swinv2 import SwinTransformerV2
# Warm-up: the first model built on the meta device loads torch's Python meta kernels (about 170 MB of code and data,
# whatever the model size); the tool builds one to check keys and shapes.
with torch.device("meta"):
    SwinTransformerV2(img_size=32, window_size=1, embed_dim=8, depths=(1, 1), num_heads=(1, 1))

def status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

peak = [status_kib("RssAnon")]
def watch():
    while True:
        peak[0] = max(peak[0], status_kib("RssAnon"))
        time.sleep(0.005)
threading.Thread(target=watch, daemon=True).start()
args = sys.argv[1:]
code = convert.main(args) if args else 0
peak[0] = max(peak[0], status_kib("RssAnon"))
print("PEAK_KIB", status_kib("VmHWM"), "ANON_KIB", peak[0], "CODE", code)
"""

# One CPU process: the trainer's engine for OVERRIDES, saved at step 0 under OUT (COMPLETE marker included).
CHECKPOINT = """
import sys
import deepspeed
from pretrain.checkpoint import save_checkpoint
from pretrain.config import load_config, to_dict
from pretrain.engine import build_engine
from pretrain.tasks.simmim import SimMIMTask

out, *overrides = sys.argv[1:]
deepspeed.init_distributed(dist_backend="gloo")
cfg = load_config(None, overrides)
engine, _ = build_engine(cfg, world_size=1, steps_per_epoch=1, task=SimMIMTask(cfg))
client = {"step": 0, "config": to_dict(cfg), "world_size": 1, "zero_stage": cfg.distributed.zero_stage}
save_checkpoint(engine, out, 0, client, keep_last=1)
"""

# Imported by the tool only when it runs: preloaded in every probe, so their code pages count in no result.
TOOL_MODULES = "safetensors.torch,pretrain.checkpoint"
# What consolidate imports (DeepSpeed): the same in its baseline, so only the conversion itself is counted.
DEEPSPEED_MODULES = "deepspeed,deepspeed.utils.zero_to_fp32"


def peak_kib(args: list[str], preload: str = "") -> tuple[int, int]:
    """(peak RSS, peak anonymous memory) in KiB of a process running ``convert.main(args)``."""
    env = {**os.environ, "PRELOAD": ",".join(filter(None, (TOOL_MODULES, preload))), "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=REPO, env=env, check=False
    )
    fields = result.stdout.split()
    if "CODE" not in fields or fields[fields.index("CODE") + 1] != "0":
        raise RuntimeError(f"{args} failed: {result.stderr[-2000:]}")
    return int(fields[fields.index("PEAK_KIB") + 1]), int(fields[fields.index("ANON_KIB") + 1])


def write_checkpoint(out: Path, overrides: list[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "DS_ACCELERATOR": "cpu",
    }
    result = subprocess.run(
        [sys.executable, "-c", CHECKPOINT, str(out), *overrides], capture_output=True, text=True, cwd=REPO, env=env
    )
    if result.returncode != 0:
        raise RuntimeError(f"writing the DeepSpeed checkpoint failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base")
    parser.add_argument("--img-size", type=int, default=192)
    parser.add_argument("--window-size", type=int, default=12)
    parser.add_argument("--zero-stages", type=int, nargs="*", default=[0, 2], help="consolidate these (none: skip)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="of the DeepSpeed runs")
    args = parser.parse_args()

    from pretrain.formats import save_weights_file
    from swinv2 import create_model

    model = create_model(args.size, img_size=args.img_size, window_size=args.window_size, num_classes=0)
    state = {"encoder." + k: v for k, v in model.state_dict().items()}
    stride = model.patch_size * 2 ** (len(model.depths) - 1)
    state["encoder.mask_token"] = torch.zeros(1, 1, model.embed_dim)
    state["decoder.0.weight"] = torch.zeros(stride**2 * 3, model.num_features, 1, 1)
    state["decoder.0.bias"] = torch.zeros(stride**2 * 3)
    model_bytes = sum(v.numel() * v.element_size() for v in state.values())
    meta = {
        "kind": "simmim",
        "model": {
            "embed_dim": model.embed_dim,
            "depths": list(model.depths),
            "num_heads": list(model.num_heads),
            "img_size": args.img_size,
            "window_size": list(model.window_size),
        },
    }
    del model
    sizes = ["--img-size", str(args.img_size), "--window-size", str(args.window_size)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "simmim.safetensors"
        save_weights_file(src, state, meta)
        del state
        timm, hf, official = tmp / "t.safetensors", tmp / "hf", tmp / "o.pth"
        runs = {
            "backbone": ["backbone", str(src), "-o", str(tmp / "b.safetensors")],
            "export timm": ["export", "--to", "timm", str(src), "-o", str(timm)],
            "import timm": ["import", "--from", "timm", str(timm), "-o", str(tmp / "it.safetensors"), *sizes],
            "export hf": ["export", "--to", "hf", str(src), "-o", str(hf)],
            "import hf": ["import", "--from", "hf", str(hf), "-o", str(tmp / "ih.safetensors")],
            "export official": ["export", "--to", "official", str(src), "-o", str(official)],
            "import official": ["import", "--from", "official", str(official), "-o", str(tmp / "io.safetensors")],
            "backbone bf16 .pth": ["backbone", str(src), "-o", str(tmp / "b16.pth"), "--dtype", "bf16"],
        }
        results: dict[str, float] = {}
        anon: dict[str, float] = {}

        def record(name: str, argv: list[str], base: tuple[int, int], preload: str = "") -> None:
            rss, heap = peak_kib(argv, preload)
            results[name] = round((rss - base[0]) * 1024 / model_bytes, 2)
            anon[name] = round((heap - base[1]) * 1024 / model_bytes, 2)

        baseline = peak_kib([])
        for name, argv in runs.items():
            record(name, argv, baseline)

        if args.zero_stages:
            overrides = [
                f"model.size={args.size}",
                f"model.img_size={args.img_size}",
                f"model.window_size={args.window_size}",
                "training.device=cpu",
                f"training.precision={args.precision}",
                "data.batch_size=1",
            ]
            ds_baseline = peak_kib([], preload=DEEPSPEED_MODULES)
            for stage in args.zero_stages:
                run = tmp / f"zero{stage}"
                write_checkpoint(run / "checkpoints", [*overrides, f"distributed.zero_stage={stage}"])
                argv = ["consolidate", str(run), "-o", str(tmp / f"c{stage}.safetensors")]
                record(f"consolidate zero{stage} {args.precision}", argv, ds_baseline, DEEPSPEED_MODULES)
                # Checkpoints of large models are big: free the disk before writing the next one.
                shutil.rmtree(run, ignore_errors=True)
    report = {"size": args.size, "model_MiB": round(model_bytes / 2**20, 1), "peak_over_model": results}
    print(json.dumps({**report, "anonymous_peak_over_model": anon}))


if __name__ == "__main__":
    main()
