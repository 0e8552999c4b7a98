"""``python -m pretrain.plan``: memory per rank, FLOPs, step time and the recipe's wall-clock for a config on N GPUs,
before any GPU is spent; ``--search`` ranks ZeRO stage x checkpointing x offload by predicted throughput.

The config is loaded exactly as ``python -m pretrain`` loads it (same ``--config``, overrides and checks). Exit codes:
0 done (also when the plan does not fit: the table says so), 2 bad input, printed as one line before any model is
built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from typing import Any

from ..checks import ConfigError
from ..config import PretrainConfig, load_config
from ..entry import add_common_arguments, config_from_arguments
from .devices import DEFAULT_MARGIN, GIB, Device, device_from_memory, lookup_device
from .search import Estimator, search
from .throughput import (
    DEFAULT_MFU,
    HOST_ADAM_PARAMS_PER_S,
    LOADER_IMAGES_PER_S_PER_WORKER,
    OFFLOAD_BYTES_PER_PARAM,
    PCIE_BYTES_PER_S,
    FlopProfile,
    TimeEstimate,
    best_measured_mfu,
    count_images,
    estimate_time,
    flop_profile,
)

__all__ = ["Setup", "build_parser", "check_arguments", "main", "make_plan", "plan_dict", "render"]

# Ranks per node when --nodes is not given: the 8-GPU HGX/DGX node (it only matters for offload's shared host).
DEFAULT_GPUS_PER_NODE = 8


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.plan",
        description="Predict memory per rank and time of a SimMIM pretraining config on N GPUs (no GPU needed)",
    )
    add_common_arguments(parser, "model.activation_checkpointing=every:2")
    parser.add_argument(
        "--gpus", type=int, required=True, metavar="N", help="GPUs in total over all nodes (the world size)"
    )
    device = parser.add_mutually_exclusive_group(required=True)
    device.add_argument(
        "--gpu", metavar="NAME", help="device name, e.g. H100, 'A100 80GB', L40S (an unknown name lists the known)"
    )
    device.add_argument(
        "--gpu-memory", type=float, metavar="GIB", help="memory per device in GiB, for a device the table lacks"
    )
    parser.add_argument(
        "--nodes", type=int, default=None, metavar="K", help="nodes the GPUs are split over (default: 8 per node)"
    )
    parser.add_argument(
        "--mfu",
        type=float,
        default=None,
        help=f"utilisation of the 16-bit peak (default: best of --from-run, else {DEFAULT_MFU})",
    )
    parser.add_argument(
        "--from-run",
        action="append",
        default=[],
        metavar="DIR",
        help="run directory whose metrics.jsonl gives the measured MFU (repeatable)",
    )
    parser.add_argument(
        "--images", type=int, default=None, metavar="N", help="images per epoch (default: counted from the data)"
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help=f"fraction of device memory kept free (default {DEFAULT_MARGIN})",
    )
    parser.add_argument("--search", action="store_true", help="rank ZeRO stage x checkpointing x offload")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


@dataclass(frozen=True)
class Setup:
    """The checked command-line inputs besides the config."""

    world_size: int
    nodes: int
    gpus_per_node: int
    device: Device
    margin: float
    mfu: float | None
    images: int | None

    @property
    def usable_bytes(self) -> float:
        return self.device.memory_bytes * (1.0 - self.margin)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def check_arguments(args: argparse.Namespace) -> Setup:
    """Every command-line value checked before anything heavy (ValueError naming the value and what is accepted)."""
    if args.gpus < 1:
        raise ValueError(f"--gpus {args.gpus}; accepted: 1 or more (GPUs in total over all nodes)")
    if args.nodes is not None:
        if args.nodes < 1:
            raise ValueError(f"--nodes {args.nodes}; accepted: 1 or more")
        if args.gpus % args.nodes:
            raise ValueError(
                f"--gpus {args.gpus} cannot be split evenly over --nodes {args.nodes}; accepted: a node count that "
                f"divides {args.gpus} ({', '.join(map(str, _divisors(args.gpus)))})"
            )
        nodes = args.nodes
    elif args.gpus <= DEFAULT_GPUS_PER_NODE:
        nodes = 1
    elif args.gpus % DEFAULT_GPUS_PER_NODE == 0:
        nodes = args.gpus // DEFAULT_GPUS_PER_NODE
    else:
        raise ValueError(
            f"--gpus {args.gpus} is not a multiple of {DEFAULT_GPUS_PER_NODE} GPUs per node; pass --nodes K (K divides "
            f"{args.gpus})"
        )
    if not (0.0 <= args.margin < 1.0):
        raise ValueError(f"--margin {args.margin}; accepted: a fraction of device memory kept free, 0 <= margin < 1")
    if args.mfu is not None and not (0.0 < args.mfu <= 1.0):
        raise ValueError(f"--mfu {args.mfu}; accepted: a fraction of the peak, 0 < mfu <= 1 (e.g. 0.4 for 40%)")
    if args.images is not None and args.images < 1:
        raise ValueError(f"--images {args.images}; accepted: images per epoch, 1 or more")
    if args.gpu is not None:
        device = lookup_device(args.gpu)
    else:
        if not math.isfinite(args.gpu_memory):
            raise ValueError(f"--gpu-memory {args.gpu_memory}; accepted: the device memory in GiB, a positive number")
        device = device_from_memory(args.gpu_memory)
    return Setup(args.gpus, nodes, args.gpus // nodes, device, args.margin, args.mfu, args.images)


def _mfu(setup: Setup, run_dirs: list[str]) -> tuple[float, str]:
    """The MFU of the plan and where it comes from: --mfu, else the best measured, else the default."""
    if setup.mfu is not None:
        return setup.mfu, "--mfu"
    if run_dirs:
        measured = best_measured_mfu(run_dirs)
        if not 0.0 < measured.mfu <= 1.0:
            raise ValueError(f"{measured.source}: {measured.mfu:.3f} is not a usable MFU; pass --mfu (0 < mfu <= 1)")
        return measured.mfu, measured.source
    return DEFAULT_MFU, "default (no --mfu, no --from-run)"


def make_plan(
    cfg: PretrainConfig, setup: Setup, *, estimator: Estimator, run_dirs: list[str], do_search: bool
) -> dict[str, Any]:
    """The whole plan as plain data (what ``--json`` prints; the tables are drawn from it).

    Raises:
        ValueError: an input that turns out unusable (MFU of a run, an epoch that cannot be counted...).
    """
    device = setup.device.with_peak(cfg.logging.peak_tflops)
    setup = dataclasses.replace(setup, device=device)
    mfu, mfu_source = _mfu(setup, run_dirs)
    if setup.images is not None:
        images, images_source = setup.images, "--images"
    elif device.peak_tflops is not None:
        images, images_source = count_images(cfg)
    else:
        images, images_source = 0, "not counted: no time without a peak figure"
    profile = flop_profile(cfg)
    memory = estimator(cfg, world_size=setup.world_size, micro_batch=cfg.data.batch_size)

    def time_of(choice: PretrainConfig, _profile: Any = profile) -> TimeEstimate | None:
        if device.peak_tflops is None:
            return None
        return estimate_time(
            choice,
            _profile,
            world_size=setup.world_size,
            gpus_per_node=setup.gpus_per_node,
            peak_flops=device.peak_tflops * 1e12,
            mfu=mfu,
            images_per_epoch=images,
        )

    plan = plan_dict(cfg, setup, memory, profile, time_of(cfg), mfu, mfu_source, images, images_source)
    if do_search:
        candidates = search(
            cfg,
            world_size=setup.world_size,
            usable_bytes=setup.usable_bytes,
            estimator=estimator,
            profile=profile,
            time_fn=time_of,
        )
        plan["search"] = [c.to_dict() for c in candidates]
        best = next((c for c in candidates if c.fits), None)
        plan["recommendation"] = None if best is None else best.overrides()
    return plan


def _default_estimator() -> Estimator:
    from .memory import estimate_memory

    return estimate_memory


def main(argv: list[str] | None = None, *, estimator: Estimator | None = None) -> int:
    """Run the planner; returns the exit code.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
        estimator: the memory estimator (default :func:`pretrain.plan.memory.estimate_memory`); tests pass others.
    """
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        setup = check_arguments(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    cfg = config_from_arguments(args, load_config)
    if isinstance(cfg, int):
        return cfg
    try:
        plan = make_plan(
            cfg, setup, estimator=estimator or _default_estimator(), run_dirs=args.from_run, do_search=args.search
        )
    except (ValueError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    plan["command"] = {"config": args.config, "overrides": list(args.overrides)}
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(render(plan), end="")
    return 0


def _assumptions(cfg: PretrainConfig, setup: Setup, mfu: float, mfu_source: str) -> list[str]:
    device = setup.device
    notes = []
    if mfu_source.startswith("best logged"):
        notes.append(
            "the measured MFU is applied as it is, although it was measured with that run's model, micro-batch and "
            "device"
        )
    if cfg.training.precision == "fp32":
        notes.append(
            "training.precision=fp32: the peak is the 16-bit one (as the trainer's MFU), which fp32 matmuls (TF32 at "
            "best) do not reach: expect a lower MFU than in bf16"
        )
    return [
        *notes,
        f"usable memory = {device.memory_bytes / GIB:.1f} GiB x (1 - margin {setup.margin:g}): the margin covers the "
        f"CUDA context, NCCL buffers and the caching allocator's fragmentation; a data-sheet 'GB' figure is taken as "
        f"GiB (a process sees somewhat less)",
        "FLOPs per image: torch's FlopCounterMode on the model built on the meta device (the trainer's counter); "
        "training = 3 x forward (backward = 2 x forward) + recomputation (forward of each checkpointed block, "
        "attention core of each block with chunked windows)",
        f"the device runs every executed FLOP, recomputation included, at MFU {mfu:.3f} of its dense 16-bit peak "
        f"({mfu_source}); gradient reduction, ZeRO gathers and data loading are taken as overlapped with compute "
        f"(inside that MFU), and the MFU does not depend on the micro-batch (small micro-batches run below it in "
        f"practice): ZeRO stages 0-2 tie, ZeRO-3 ranks after them at equal speed",
        f"peak: {device.peak_tflops:g} TFLOP/s, {device.peak_source}"
        if device.peak_tflops is not None
        else f"peak: unknown for {device.name} ({device.peak_source}): no times",
        f"offloaded optimizer, per step and rank: the rank's 1/world_size of the parameters crosses PCIe at "
        f"{PCIE_BYTES_PER_S / 1e9:g} GB/s ({OFFLOAD_BYTES_PER_PARAM} bytes per parameter: fp32 gradient down, "
        f"16-bit weight up), then host Adam at {HOST_ADAM_PARAMS_PER_S / 1e9:g}e9 parameters/s per node shared by "
        f"its {setup.gpus_per_node} ranks (assumed, not measured); no overlap with compute",
        f"{setup.nodes} node(s) x {setup.gpus_per_node} GPUs; optimizer steps counted as the trainer does: epochs x "
        f"(images // (micro-batch x world size) // grad_accum_steps)",
    ]


def _loading(cfg: PretrainConfig, time: TimeEstimate) -> dict[str, Any]:
    """What the loader must deliver per worker at the predicted speed, against one worker's measured rate."""
    workers = max(1, cfg.data.num_workers)  # 0 workers: the training process decodes, as one worker would
    needed = time.images_per_s_per_gpu / workers
    return {
        "workers_per_gpu": workers,
        "needed_images_per_s_per_worker": needed,
        "measured_images_per_s_per_worker": LOADER_IMAGES_PER_S_PER_WORKER,
        "keeps_up": needed <= LOADER_IMAGES_PER_S_PER_WORKER,
    }


def plan_dict(
    cfg: PretrainConfig,
    setup: Setup,
    memory: Any,
    profile: FlopProfile,
    time: TimeEstimate | None,
    mfu: float,
    mfu_source: str,
    images: int,
    images_source: str,
) -> dict[str, Any]:
    """The plan of ``cfg`` as plain data: bytes as ints, seconds as floats."""
    m, d = cfg.model, cfg.distributed
    micro, accum = cfg.data.batch_size, cfg.training.grad_accum_steps
    recompute = profile.recompute(m.activation_checkpointing, m.window_chunk_size)
    return {
        "config": {
            "model": m.size,
            "img_size": m.img_size,
            "window_size": m.window_size,
            "precision": cfg.training.precision,
            "zero_stage": d.zero_stage,
            "offload_optimizer": d.offload_optimizer,
            "activation_checkpointing": m.activation_checkpointing,
            "window_chunk_size": m.window_chunk_size,
            "micro_batch": micro,
            "grad_accum_steps": accum,
            "global_batch": micro * setup.world_size * accum,
            "epochs": cfg.schedule.epochs,
        },
        "world": {"world_size": setup.world_size, "nodes": setup.nodes, "gpus_per_node": setup.gpus_per_node},
        "device": {
            "name": setup.device.name,
            "memory_bytes": setup.device.memory_bytes,
            "margin": setup.margin,
            "usable_bytes": int(setup.usable_bytes),
            "peak_tflops": setup.device.peak_tflops,
            "peak_source": setup.device.peak_source,
        },
        "memory": {
            **{k: int(v) for k, v in memory.to_dict().items()},
            "total": int(memory.total),
            "fits": memory.total <= setup.usable_bytes,
            "headroom_bytes": int(setup.usable_bytes - memory.total),
        },
        "flops": {
            "parameters": profile.parameters,
            "forward_per_image": int(profile.forward),
            "recompute_per_image": int(recompute),
            "train_per_image": int(3 * profile.forward + recompute),
        },
        "time": None
        if time is None
        else {
            **time.to_dict(),
            "mfu_source": mfu_source,
            "images_per_epoch": images,
            "images_source": images_source,
        },
        "data_loading": None if time is None else _loading(cfg, time),
        "assumptions": _assumptions(cfg, setup, mfu, mfu_source),
    }


_MEMORY_ROWS = (
    ("parameters", "parameters"),
    ("gradients", "gradients"),
    ("optimizer_states", "optimizer states (Adam m, v)"),
    ("master_weights", "fp32 master weights"),
    ("activations", "activations, one micro-batch"),
    ("deepspeed_buffers", "DeepSpeed buffers"),
)


def _gib(value: float) -> str:
    return f"{value / GIB:,.2f} GiB"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes = round(seconds / 60)
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    return f"{days}d {hours:02d}h {minutes:02d}m" if days else f"{hours}h {minutes:02d}m"


def _memory_lines(plan: dict[str, Any]) -> list[str]:
    mem, dev, c = plan["memory"], plan["device"], plan["config"]
    lines = ["", f"Memory per rank (micro-batch {c['micro_batch']})"]
    lines += [f"  {label:<34}{_gib(mem[key]):>14}" for key, label in _MEMORY_ROWS]
    if mem.get("overlap"):  # counted in two rows above but never alive at the same time (see memory.py)
        lines.append(f"  {'less: never alive together':<34}{_gib(-mem['overlap']):>14}")
    lines.append(f"  {'total':<34}{_gib(mem['total']):>14}")
    lines.append(
        f"  {'device ' + dev['name']:<34}{_gib(dev['memory_bytes']):>14}   usable {_gib(dev['usable_bytes'])} "
        f"(margin {dev['margin']:.0%})"
    )
    verdict = "yes" if mem["fits"] else f"NO (over by {_gib(-mem['headroom_bytes'])})"
    lines.append(f"  {'fits':<34}{verdict:>14}" + (f"   headroom {_gib(mem['headroom_bytes'])}" if mem["fits"] else ""))
    if mem.get("host_offloaded"):
        lines.append(f"  {'host memory (offload)':<34}{_gib(mem['host_offloaded']):>14}")
    return lines


def _time_lines(plan: dict[str, Any]) -> list[str]:
    f, t, c = plan["flops"], plan["time"], plan["config"]
    lines = [
        "",
        "Compute",
        f"  {'parameters':<34}{f['parameters'] / 1e9:>10.3f} B",
        f"  {'forward FLOPs per image':<34}{f['forward_per_image'] / 1e9:>10.1f} GFLOP",
        f"  {'training FLOPs per image':<34}{f['train_per_image'] / 1e9:>10.1f} GFLOP   (3 x forward + recompute "
        f"{f['recompute_per_image'] / max(f['forward_per_image'], 1):.0%} of a forward)",
    ]
    if t is None:
        return [*lines, "  time: not computed: the device has no peak figure; set logging.peak_tflops=<TFLOP/s>"]
    world = plan["world"]["world_size"]
    return [
        *lines,
        f"  {'MFU (executed FLOPs)':<34}{t['mfu']:>10.1%}   {t['mfu_source']}",
        f"  {'MFU as the trainer logs it':<34}{t['model_mfu']:>10.1%}   (3 x forward FLOPs only)",
        f"  {'step time':<34}{t['step_s']:>10.3f} s     ({c['grad_accum_steps']} x micro-batch {c['micro_batch']}"
        + (f", offloaded optimizer {t['offload_s']:.3f} s" if t["offload_s"] else "")
        + ")",
        f"  {'images/s per GPU':<34}{t['images_per_s_per_gpu']:>10.1f}",
        f"  {f'images/s total ({world} GPUs)':<34}{t['images_per_s_total']:>10.1f}",
        f"  {'recipe':<34}{c['epochs']} epochs x {t['images_per_epoch']:,} images ({t['images_source']}) = "
        f"{t['steps']:,} steps of {c['global_batch']:,}",
        f"  {'wall-clock':<34}{_duration(t['wall_clock_s']):>10}",
        _loading_line(plan["data_loading"]),
    ]


def _loading_line(loading: dict[str, Any]) -> str:
    verdict = "keeps up" if loading["keeps_up"] else "WARNING: the loader, not the GPU, would set the pace"
    return (
        f"  {'data loading':<34}{loading['needed_images_per_s_per_worker']:>10.0f} img/s needed from each of "
        f"{loading['workers_per_gpu']} worker(s) per GPU; one worker measured "
        f"{loading['measured_images_per_s_per_worker']:.0f} img/s (README, bench/data.py): {verdict}"
    )


def _search_lines(plan: dict[str, Any]) -> list[str]:
    header = (
        f"  {'#':>2} {'zero':>4} {'checkpointing':<13} {'offload':<7} {'max mb':>6} {'mb':>4} {'accum':>5} "
        f"{'total':>12} {'img/s/GPU':>9} {'img/s':>9} {'wall-clock':>12}"
    )
    title = "Search (max mb: largest that fits; mb: the largest fitting one dividing the recipe's samples per rank "
    title += "and step, with accum restoring the global batch)"
    if any(c["fits"] and c["time"] is None for c in plan["search"]):
        title += "; no peak figure: ranked by recomputed FLOPs, then offload"
    lines = ["", title, header]
    for i, c in enumerate(plan["search"], 1):
        offload = "on" if c["offload_optimizer"] else "off"
        head = f"  {i:>2} {c['zero_stage']:>4} {c['activation_checkpointing']:<13} {offload:<7}"
        if c["refused"]:
            lines.append(f"{head} {c['refused'].split(':')[0]} (--json has why)")
            continue
        if not c["fits"]:
            lines.append(
                f"{head} {c['max_micro_batch']:>6} does not fit (total {_gib(c['memory']['total'])} at batch 1)"
            )
            continue
        t = c["time"]
        speed = (
            f"{t['images_per_s_per_gpu']:>9.1f} {t['images_per_s_total']:>9.1f} {_duration(t['wall_clock_s']):>12}"
            if t
            else "time n/a"
        )
        lines.append(
            f"{head} {c['max_micro_batch']:>6} {c['micro_batch']:>4} {c['grad_accum_steps']:>5} "
            f"{_gib(c['memory']['total']):>12} {speed}"
        )
    best = plan.get("recommendation")
    command = plan.get("command", {})
    base = " ".join(
        [
            "python -m pretrain",
            *([f"--config {command['config']}"] if command.get("config") else []),
            *command.get("overrides", []),
        ]
    )
    if best is None:
        lines += [
            "",
            "Recommendation: nothing fits; more GPUs (ZeRO-3 divides the model states), a smaller model or "
            "image size, or a device with more memory",
        ]
    else:
        lines += [
            "",
            "Recommendation (overrides to paste):",
            "  " + " ".join(best),
            "",
            "  " + base + " " + " ".join(best),
        ]
    return lines


def render(plan: dict[str, Any]) -> str:
    """The plan as readable tables (``--json`` prints ``plan`` itself)."""
    c, w = plan["config"], plan["world"]
    lines = [
        f"Plan: SwinV2-{c['model']} {c['img_size']} px window {c['window_size']}, {c['precision']}, "
        f"ZeRO-{c['zero_stage']}, offload {'on' if c['offload_optimizer'] else 'off'}, "
        f"checkpointing {c['activation_checkpointing']}, window_chunk_size {c['window_chunk_size']}",
        f"      {w['world_size']} x {plan['device']['name']} ({w['nodes']} node(s) x {w['gpus_per_node']}); "
        f"micro-batch {c['micro_batch']} x {c['grad_accum_steps']} accumulation x {w['world_size']} = global batch "
        f"{c['global_batch']:,}",
    ]
    lines += _memory_lines(plan) + _time_lines(plan)
    if "search" in plan:
        lines += _search_lines(plan)
    lines += ["", "Assumptions"] + [f"  - {a}" for a in plan["assumptions"]]
    return "\n".join(lines) + "\n"
