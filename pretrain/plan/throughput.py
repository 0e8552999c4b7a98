"""FLOPs per image, step time, images per second and the recipe's wall-clock at a stated MFU.

FLOPs come from the counter the trainer uses (:func:`pretrain.metrics.count_forward_flops`), run on a model built on
the meta device: no weight is allocated and no kernel runs, so SwinV2-G at 192 px costs under a second. Training
FLOPs follow the trainer's convention (backward = 2 x forward) plus what activation checkpointing and sequential
window attention recompute in backward, counted per block by the same counter.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from swinv2 import parse_checkpointing
from swinv2.swin_transformer_v2 import SwinTransformerBlock, choose_attn_impl

from ..checks import ConfigError
from ..config import PretrainConfig, load_config
from ..metrics import count_forward_flops

__all__ = [
    "DEFAULT_MFU",
    "HOST_ADAM_PARAMS_PER_S",
    "LOADER_IMAGES_PER_S_PER_WORKER",
    "OFFLOAD_BYTES_PER_PARAM",
    "PCIE_BYTES_PER_S",
    "FlopProfile",
    "MeasuredMfu",
    "TimeEstimate",
    "best_measured_mfu",
    "count_images",
    "estimate_time",
    "flop_profile",
    "offload_seconds",
]

# MFU when neither --mfu nor a measured run is given (issue 15's default): pass a measured one when there is one.
DEFAULT_MFU = 0.40
# Offloaded optimizer (DeepSpeed ZeRO-Offload), per optimizer step and rank: the rank's gradient partition goes to the
# host in fp32 (4 bytes per element) and its updated 16-bit parameters come back (2 bytes), over PCIe at an effective
# 20 GB/s per GPU (PCIe 4.0 x16 peaks at 32 GB/s per direction; 8 GPUs of a node share the host's root complexes).
OFFLOAD_BYTES_PER_PARAM = 4 + 2
PCIE_BYTES_PER_S = 20e9
# DeepSpeed's vectorised CPU Adam on the host, all ranks of a node together: 2e9 parameters per second. An assumed
# rate, not measured here (no multi-socket host or GPU was available): it is the figure to replace with a measurement
# of one offloaded step on the target host.
HOST_ADAM_PARAMS_PER_S = 2e9
# One data-loader worker (decode, augment, mask) on local shards of 500 x 375 JPEGs: 415 img/s on one AMD EPYC core
# (README, `python bench/data.py`). The time model assumes the loader keeps up; the plan reports the rate each worker
# must reach against this figure.
LOADER_IMAGES_PER_S_PER_WORKER = 415.0


@dataclass(frozen=True)
class FlopProfile:
    """Forward FLOPs of one image, in total and per Swin block (network order).

    Attributes:
        forward: FLOPs of one forward per image (what the trainer's MFU uses).
        parameters: trainable parameters of the whole SimMIM model.
        block_forward: per block, its forward FLOPs per image.
        block_attention_core: per block, the FLOPs of its windowed attention proper (q k^T and the weighted sum of
            v), which sequential window attention recomputes in backward.
        block_windows: per block, its number of windows per image.
        block_stages: per block, the index of its stage.
    """

    forward: float
    parameters: int
    block_forward: tuple[float, ...]
    block_attention_core: tuple[float, ...]
    block_windows: tuple[int, ...]
    block_stages: tuple[int, ...]

    def checkpointed(self, spec: str) -> list[bool]:
        """Which blocks ``spec`` (an ``activation_checkpointing`` value) checkpoints: the rule of
        ``SwinTransformerV2.set_grad_checkpointing``, applied to the block list."""
        args = parse_checkpointing(spec)
        every, stages = int(args.get("every", 1)), args.get("stages")
        return [
            bool(args["enable"] and (stages is None or stage in stages) and index % every == 0)
            for index, stage in enumerate(self.block_stages)
        ]

    def recompute(self, spec: str, window_chunk_size: int) -> float:
        """FLOPs per image recomputed in backward: the forward of every checkpointed block, plus the attention core of
        every block whose windows are processed in chunks (each chunk is checkpointed on its own).

        The core counts whole, as on CUDA, where the fused SDPA kernel is one op that the chunk's recomputation runs
        again. On the CPU the core is decomposed and torch's checkpoint stops after the softmax (its early stop), so
        half of it is recomputed there (measured in tests/unit/test_plan_cli.py).
        """
        flops = sum(f for f, on in zip(self.block_forward, self.checkpointed(spec), strict=True) if on)
        if window_chunk_size:
            flops += sum(
                core
                for core, windows in zip(self.block_attention_core, self.block_windows, strict=True)
                if window_chunk_size < windows
            )
        return flops

    def train(self, spec: str, window_chunk_size: int) -> float:
        """Training FLOPs per image: forward + backward (2 x forward) + recomputation."""
        return 3 * self.forward + self.recompute(spec, window_chunk_size)


def _flop_key(cfg: PretrainConfig) -> str:
    """What the forward FLOPs depend on: the model section (less what only changes memory) and the SimMIM target."""
    model = copy.deepcopy(cfg.model)
    model.activation_checkpointing, model.window_chunk_size, model.compile = "none", 0, False
    return json.dumps([repr(model), cfg.simmim.norm_target, cfg.simmim.norm_target_patch_size])


def flop_profile(cfg: PretrainConfig) -> FlopProfile:
    """The :class:`FlopProfile` of ``cfg``'s model, counted on the meta device (cached per model shape).

    ``attn_impl: auto`` is counted as the path the trainer takes on a GPU (SDPA); both paths count the same FLOPs.
    """
    key = _flop_key(cfg)
    if key not in _PROFILES:
        _PROFILES[key] = _count_profile(cfg)
    return _PROFILES[key]


# Profiles counted in this process, by _flop_key: --search and --from-run ask again for the same model.
_PROFILES: dict[str, FlopProfile] = {}


def _count_profile(cfg: PretrainConfig) -> FlopProfile:
    from ..simmim import build_simmim

    cfg = copy.deepcopy(cfg)
    if cfg.model.attn_impl == "auto":
        # The meta device has no autocast state for "auto" to query (swinv2's _impl_for would raise): name the path.
        cfg.model.attn_impl = choose_attn_impl("cuda", torch.bfloat16)
    cfg.model.window_chunk_size = 0  # no_grad forward: chunking changes memory, not FLOPs
    with torch.device("meta"):
        model = build_simmim(cfg)
    size = cfg.model.img_size
    images = torch.empty(1, cfg.model.in_chans, size, size, device="meta")
    mask = torch.zeros(1, size // cfg.model.patch_size, size // cfg.model.patch_size, dtype=torch.int64, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images, mask)
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    blocks, cores, windows, stages = [], [], [], []
    for name, module in model.named_modules():
        if not isinstance(module, SwinTransformerBlock):
            continue
        fqn = f"{root}.{name}"
        attn = module.attn
        linears = sum(by_module.get(f"{fqn}.attn.{part}", 0) for part in ("qkv", "proj", "cpb_mlp"))
        blocks.append(float(by_module.get(fqn, 0)))
        cores.append(float(by_module.get(f"{fqn}.attn", 0) - linears))
        height, width = module.input_resolution
        windows.append(height * width // (attn.window_size[0] * attn.window_size[1]))
        stages.append(int(name.split("layers.")[1].split(".")[0]))
    return FlopProfile(
        forward=count_forward_flops(model, images, mask),
        parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        block_forward=tuple(blocks),
        block_attention_core=tuple(cores),
        block_windows=tuple(windows),
        block_stages=tuple(stages),
    )


@dataclass(frozen=True)
class MeasuredMfu:
    """The best MFU of earlier runs, as executed-FLOP utilisation (see :func:`best_measured_mfu`)."""

    mfu: float
    source: str


def best_measured_mfu(run_dirs: Iterable[str | Path]) -> MeasuredMfu:
    """The best ``mfu_pct`` logged in the runs' metrics.jsonl, converted to the utilisation of executed FLOPs.

    The trainer's MFU counts 3 x forward FLOPs per image; a run that recomputed (checkpointing, chunked attention)
    executed more. Its config.yaml (written beside metrics.jsonl) gives the recomputed share, so the figure transfers
    to a plan with other checkpointing. Without config.yaml the run is taken as recomputing nothing (stated).

    Raises:
        ValueError: a directory without metrics.jsonl, or no finite ``mfu_pct`` in any of them.
    """
    dirs = [Path(d) for d in run_dirs]
    best: MeasuredMfu | None = None
    for run_dir in dirs:
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            raise ValueError(
                f"--from-run {str(run_dir)!r}: no metrics.jsonl there; accepted: a run directory of python -m pretrain "
                f"(the one holding config.yaml and metrics.jsonl) with logged steps"
            )
        values = []
        for line in path.read_text().splitlines():
            try:
                value = float(json.loads(line).get("mfu_pct"))
            except (ValueError, TypeError, AttributeError):
                continue  # a torn last line, or a record without MFU (eval records)
            if math.isfinite(value) and value > 0:
                values.append(value / 100.0)
        if not values:
            continue
        measured, why = max(values), "no config.yaml: taken as recomputing nothing"
        config = run_dir / "config.yaml"
        if config.is_file():
            try:
                run_cfg = load_config(config)
            except ConfigError as exc:
                why = f"config.yaml unreadable ({exc}): taken as recomputing nothing"
            else:
                profile = flop_profile(run_cfg)
                spec, chunk = run_cfg.model.activation_checkpointing, run_cfg.model.window_chunk_size
                measured *= profile.train(spec, chunk) / (3 * profile.forward)
                why = f"activation_checkpointing={spec}, window_chunk_size={chunk}"
        candidate = MeasuredMfu(measured, f"best logged mfu_pct of {path} ({why})")
        if best is None or candidate.mfu > best.mfu:
            best = candidate
    if best is None:
        names = ", ".join(str(d) for d in dirs)
        raise ValueError(f"--from-run {names}: no finite mfu_pct in metrics.jsonl; accepted: runs that logged a step")
    return best


def count_images(cfg: PretrainConfig) -> tuple[int, str]:
    """(images per epoch, where the count comes from) when it is cheap to know, as the trainer would count them.

    ``data.samples_per_epoch`` when set; a folder source: its image files; shards: the ``sizes.json`` index beside
    them (one small read per folder, remote ones included). Shards are never opened to count them.

    Raises:
        ValueError: the count needs more than that (no index, pipe: shards, a missing path); the message says to pass
            ``--images``.
    """
    from ..data import DataError, expand_shards, list_images, read_size_index
    from ..data.urls import ReadOptions, url_kind

    data = cfg.data
    if data.samples_per_epoch is not None:
        return data.samples_per_epoch, "data.samples_per_epoch"
    try:
        if data.source == "folder":
            return len(list_images(data.path)), f"image files under data.path={data.path!r}"
        options = ReadOptions.of(data)
        patterns = [entry.path for entry in data.sources] or [data.path]
        total = 0
        for pattern in patterns:
            urls = expand_shards(pattern, options.storage_options)
            if not urls or all(url_kind(u) == "local" and not Path(u).is_file() for u in urls):
                raise DataError(f"data.path={pattern!r} matches no shard files here")
            count = read_size_index(urls, options)
            if count is None:
                raise DataError(f"no sizes.json beside the shards of {pattern!r} lists every shard")
            total += count
        return total, f"sizes.json beside the shards of {', '.join(patterns)}"
    except (DataError, OSError) as exc:
        raise ValueError(
            f"cannot count the images of an epoch cheaply ({exc}); pass --images N (e.g. --images 1281167 for "
            f"ImageNet-1k train) or set data.samples_per_epoch"
        ) from None


@dataclass(frozen=True)
class TimeEstimate:
    """Time of one configuration at a stated MFU (every figure per optimizer step unless named otherwise).

    Attributes:
        mfu: utilisation of the device's dense 16-bit peak by the FLOPs it executes (recomputation included).
        model_mfu: the same speed as the trainer logs it (3 x forward FLOPs per image, recomputation not counted).
        train_flops_per_image: forward + backward + recomputed FLOPs of one image.
        compute_s: forward and backward of the step's micro-batches.
        offload_s: the offloaded optimizer step (PCIe both ways, host Adam); 0 without offload.
        step_s: compute_s + offload_s (no overlap assumed).
        images_per_s_per_gpu, images_per_s_total: at step_s.
        steps: optimizer steps of the recipe (schedule.epochs x steps per epoch, as the trainer counts them).
        wall_clock_s: steps x step_s.
    """

    mfu: float
    model_mfu: float
    train_flops_per_image: float
    compute_s: float
    offload_s: float
    step_s: float
    images_per_s_per_gpu: float
    images_per_s_total: float
    steps: int
    wall_clock_s: float

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def offload_seconds(parameters: int, world_size: int, gpus_per_node: int) -> float:
    """Seconds of an offloaded optimizer step per rank: its partition over PCIe both ways, then host Adam at the
    node's rate shared by the node's ranks (module constants)."""
    partition = parameters / world_size
    return partition * OFFLOAD_BYTES_PER_PARAM / PCIE_BYTES_PER_S + partition * gpus_per_node / HOST_ADAM_PARAMS_PER_S


def estimate_time(
    cfg: PretrainConfig,
    profile: FlopProfile,
    *,
    world_size: int,
    gpus_per_node: int,
    peak_flops: float,
    mfu: float,
    images_per_epoch: int | None,
) -> TimeEstimate:
    """Step time, throughput and wall-clock of ``cfg`` (micro-batch ``data.batch_size``, ``grad_accum_steps``
    micro-batches per step, ``distributed.offload_optimizer``) on ``world_size`` devices of ``peak_flops``.

    Args:
        cfg: the resolved config.
        profile: its :func:`flop_profile`.
        world_size: ranks in total.
        gpus_per_node: ranks per node (they share the host for an offloaded optimizer).
        peak_flops: dense 16-bit peak of one device in FLOP/s.
        mfu: utilisation of that peak by the executed FLOPs, in (0, 1].
        images_per_epoch: the epoch's size; None leaves steps and wall-clock at 0 and NaN.
    """
    micro, accum = cfg.data.batch_size, cfg.training.grad_accum_steps
    train = profile.train(cfg.model.activation_checkpointing, cfg.model.window_chunk_size)
    compute = train * micro * accum / (mfu * peak_flops)
    offload = (
        offload_seconds(profile.parameters, world_size, gpus_per_node) if cfg.distributed.offload_optimizer else 0.0
    )
    step = compute + offload
    per_gpu = micro * accum / step
    steps = 0
    if images_per_epoch is not None:
        # The trainer's count: batches per rank per epoch (samples // global micro-batch), whole optimizer steps.
        steps = cfg.schedule.epochs * ((images_per_epoch // (micro * world_size)) // accum)
    return TimeEstimate(
        mfu=mfu,
        model_mfu=mfu * 3 * profile.forward / train,
        train_flops_per_image=train,
        compute_s=compute,
        offload_s=offload,
        step_s=step,
        images_per_s_per_gpu=per_gpu,
        images_per_s_total=per_gpu * world_size,
        steps=steps,
        wall_clock_s=steps * step if images_per_epoch is not None else float("nan"),
    )
