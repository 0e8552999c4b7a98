"""Peak memory of the conversion subcommands, as a multiple of the model's size.

Target: about two copies of the model at most. Each subcommand runs in its own process; its peak RSS minus that
of a process that only imported the tool is divided by the weights' size.

    python bench/convert_memory.py [--size base] [--img-size 192] [--window-size 12]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PROBE = """
import resource, sys
from pretrain import convert
args = sys.argv[1:]
code = convert.main(args) if args else 0
print("PEAK_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "CODE", code)
"""


def peak_kib(args: list[str]) -> int:
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True)
    fields = result.stdout.split()
    if fields[fields.index("CODE") + 1] != "0":
        raise RuntimeError(f"{args} failed: {result.stderr[-2000:]}")
    return int(fields[fields.index("PEAK_KIB") + 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base")
    parser.add_argument("--img-size", type=int, default=192)
    parser.add_argument("--window-size", type=int, default=12)
    args = parser.parse_args()

    from pretrain.formats import save_weights_file
    from swinv2 import create_model

    model = create_model(args.size, img_size=args.img_size, window_size=args.window_size, num_classes=0)
    state = {"encoder." + k: v for k, v in model.state_dict().items()}
    state["encoder.mask_token"] = torch.zeros(1, 1, model.embed_dim)
    state["decoder.0.weight"] = torch.zeros(32 * 32 * 3, model.num_features, 1, 1)
    state["decoder.0.bias"] = torch.zeros(32 * 32 * 3)
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
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "simmim.safetensors"
        save_weights_file(src, state, meta)
        del state
        baseline = peak_kib([])
        runs = {
            "backbone": ["backbone", str(src), "-o", str(tmp / "b.safetensors")],
            "export timm": ["export", "--to", "timm", str(src), "-o", str(tmp / "t.safetensors")],
            "export hf": ["export", "--to", "hf", str(src), "-o", str(tmp / "hf")],
            "import hf": ["import", "--from", "hf", str(tmp / "hf"), "-o", str(tmp / "i.safetensors")],
            "export official": ["export", "--to", "official", str(src), "-o", str(tmp / "o.pth")],
            "backbone bf16 .pth": ["backbone", str(src), "-o", str(tmp / "b16.pth"), "--dtype", "bf16"],
        }
        results = {}
        for name, argv in runs.items():
            extra = (peak_kib(argv) - baseline) * 1024
            results[name] = round(extra / model_bytes, 2)
    print(json.dumps({"size": args.size, "model_MiB": round(model_bytes / 2**20, 1), "peak_over_model": results}))


if __name__ == "__main__":
    main()
