"""Per-rank memory of a SimMIM pretraining config: model states by ZeRO stage and offload, DeepSpeed buffers and
activations, as DeepSpeed 0.19 lays them out for the config :func:`pretrain.engine.deepspeed_config` generates.

Parameter counts are closed forms of the architecture (:func:`parameter_count`, equal to ``numel()`` of the built
model); activations come from :mod:`pretrain.plan.activations`. The state layout (P parameters, n data-parallel
ranks, e = 2 bytes under bf16/fp16, 4 under fp32) was read from DeepSpeed's engine and ZeRO optimizers and checked
against the allocations of real engines built by the trainer's ``build_engine`` (tests/integration/test_plan_zero.py):

| stage | weights | gradients | fp32 masters | Adam m, v | buffers |
|---|---|---|---|---|---|
| 0, fp32 | 4P | 4P (.grad) | - | 8P | all-reduce flattens the gradients (5e8 per buffer) |
| 0, 16-bit | eP | eP (.grad) | 4P | 8P | fp32 gradients (4P) for the update |
| 1, 2 | eP | 4P/n or eP/n | 4P/n (fp32 too) | 8P/n | reduce bucket; fp32 gradient partition |
| 3 | eP/n (+ small ones whole) | eP/n | 4P/n | 8P/n | reduce bucket; gathered layers |

Under ZeRO-1/2 the reduce bucket exists while backward runs, and the update makes the partition's fp32 gradient (plus
a 16-bit copy under bf16/fp16); ZeRO-3 allocates its bucket at start and gathers layers on use.

Between steps DeepSpeed frees the gradients except ZeRO-3's partition (:func:`model_state_bytes`). Optimizer offload
moves masters, Adam states and the fp32 gradient partition to the host (``host_offloaded``). The peak (``total``) is
the larger of two moments: during backward (activations, plus under ZeRO-0 the gradients of the layers already done;
under ZeRO-1/2/3 the gradient partition and buckets) and after it (all gradients and the update's buffers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .activations import ACTIVATION_BYTES, ModelShape, activation_memory, model_shape

__all__ = [
    "MemoryEstimate",
    "buffer_bytes",
    "estimate_memory",
    "model_state_bytes",
    "parameter_count",
    "parameter_counts_by_unit",
    "parameter_tensors_by_unit",
]

F32 = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank on the accelerator (``host_offloaded``: in host memory, not part of ``total``).

    ``overlap``: bytes counted in both ``activations`` and ``gradients`` that are never alive together (gradients of
    layers whose backward has not run yet when activations peak); ``total`` subtracts it.
    """

    parameters: int
    gradients: int
    optimizer_states: int
    master_weights: int
    activations: int
    deepspeed_buffers: int
    host_offloaded: int
    overlap: int = 0

    @property
    def total(self) -> int:
        """Peak bytes per rank: everything but host_offloaded, less what never coexists."""
        return (
            self.parameters
            + self.gradients
            + self.optimizer_states
            + self.master_weights
            + self.activations
            + self.deepspeed_buffers
            - self.overlap
        )

    def to_dict(self) -> dict[str, int]:
        return {
            "parameters": self.parameters,
            "gradients": self.gradients,
            "optimizer_states": self.optimizer_states,
            "master_weights": self.master_weights,
            "activations": self.activations,
            "deepspeed_buffers": self.deepspeed_buffers,
            "host_offloaded": self.host_offloaded,
            "overlap": self.overlap,
        }


def _block_tensors(dim: int, heads: int, hidden: int, extra_norm: bool) -> list[int]:
    """Element counts of one block's parameter tensors."""
    attn = [heads, 2 * 512, 512, 512 * heads]  # logit scale, cpb MLP (2->512 with bias, 512->heads without)
    attn += [3 * dim * dim, dim, dim, dim * dim, dim]  # qkv weight (no bias), q and v biases, proj
    mlp = [dim * hidden, hidden, hidden * dim, dim]
    norms = [dim] * (4 + (2 if extra_norm else 0))  # norm1, norm2 (weight, bias), extra norm
    return attn + mlp + norms


def parameter_tensors_by_unit(shape: ModelShape) -> list[tuple[str, list[int]]]:
    """(unit name, element counts of its parameter tensors) in forward order: embed (patch embed, ape, mask token),
    blocks, merges, head (final norm, decoder). Same unit names as :func:`pretrain.plan.activations.simmim_units`."""
    c0 = shape.embed_dim
    grid = shape.img_size // shape.patch_size
    embed = [c0 * shape.in_chans * shape.patch_size**2, c0] + ([c0, c0] if shape.patch_norm else []) + [c0]
    if shape.ape:
        embed.append(grid * grid * c0)
    units = [("embed", embed)]
    for i, (depth, heads) in enumerate(zip(shape.depths, shape.num_heads, strict=True)):
        dim = c0 * 2**i
        hidden = int(dim * shape.mlp_ratio)
        for j in range(depth):
            extra = shape.extra_norm_every > 0 and (j + 1) % shape.extra_norm_every == 0 and j + 1 < depth
            units.append((f"stage{i}.block{j}", _block_tensors(dim, heads, hidden, extra)))
        if i < shape.num_stages - 1:
            units.append((f"stage{i}.merge", [4 * dim * 2 * dim, 2 * dim, 2 * dim]))
    last = c0 * 2 ** (shape.num_stages - 1)
    out = shape.encoder_stride**2 * shape.in_chans
    units.append(("head", [last, last, last * out, out]))
    return units


def parameter_counts_by_unit(shape: ModelShape) -> list[tuple[str, int]]:
    """(unit name, parameters) in forward order (see :func:`parameter_tensors_by_unit`)."""
    return [(name, sum(sizes)) for name, sizes in parameter_tensors_by_unit(shape)]


def parameter_count(shape: ModelShape) -> int:
    """Parameters of the SimMIM model (encoder with mask token, decoder)."""
    return sum(n for _, n in parameter_counts_by_unit(shape))


def buffer_bytes(shape: ModelShape, precision: str) -> int:
    """Bytes of the model's derived buffers on each rank (never partitioned): per block the relative coords table
    (floating, cast with the module) and position index (int64), the shift mask of shifted blocks (float32 built,
    cast with the module) and the two token permutations (int64)."""
    from swinv2.geometry import window_and_shift

    e = ACTIVATION_BYTES[precision]
    total = 0
    for i, (res, depth) in enumerate(zip(shape.resolutions(), shape.depths, strict=True)):
        del i
        tokens = res[0] * res[1]
        window = (shape.window_size, shape.window_size)
        for j in range(depth):
            shift = (window[0] // 2, window[1] // 2) if j % 2 else (0, 0)
            win, sh = window_and_shift(res, window, shift)
            n = win[0] * win[1]
            total += (2 * win[0] - 1) * (2 * win[1] - 1) * 2 * e + n * n * 8 + 2 * tokens * 8
            if any(sh):
                total += (tokens // n) * n * n * e
    return total


# DeepSpeed 0.19's defaults for the keys the typed config may leave unset (elements, not bytes).
DS_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "contiguous_gradients": True,
}
# ZeRO-0's buffered all-reduce flattens gradients into buffers of this many elements (engine default).
ALLREDUCE_BUFFER_ELEMENTS = 500_000_000


def _zero_setting(cfg: Any, key: str) -> Any:
    """A zero_optimization setting: the typed distributed key, else the pass-through dict, else DeepSpeed's default."""
    typed = getattr(cfg.distributed, key, None)
    if typed is not None:
        return typed
    extra = dict(cfg.distributed.deepspeed).get("zero_optimization") or {}
    return extra.get(key, DS_DEFAULTS[key])


def _persistent_params(shape: ModelShape, threshold: int) -> int:
    """Elements of the parameters ZeRO-3 keeps whole on every rank (tensors of at most ``threshold`` elements)."""
    return sum(n for _, sizes in parameter_tensors_by_unit(shape) for n in sizes if n <= threshold)


@dataclass(frozen=True)
class _States:
    """Bytes per rank of one ZeRO layout: ``static`` entries exist all along; ``backward``: extra while backward runs
    (besides activations); ``step``: extra after backward (all-reduce, fp32 gradients of the update)."""

    parameters: int
    gradients: int
    optimizer_states: int
    master_weights: int
    persistent_buffers: int
    backward: int
    step: int
    host: int
    grads_grow: bool  # gradients appear layer by layer during backward (ZeRO-0) rather than all at once
    grads_resting: bool = False  # the gradient partition stays allocated between steps (ZeRO-3)

    @property
    def resting(self) -> int:
        """Bytes allocated between steps (after an optimizer step, before the next forward)."""
        kept = self.parameters + self.optimizer_states + self.master_weights + self.persistent_buffers
        return kept + (self.gradients if self.grads_resting else 0)


def _states(cfg: Any, shape: ModelShape, world_size: int, device: str) -> _States:
    stage = cfg.distributed.zero_stage
    precision = cfg.training.precision
    e = ACTIVATION_BYTES[precision]
    half = e != F32
    p = parameter_count(shape)
    part = -(-p // world_size)  # ceil: DeepSpeed pads partitions
    offload = bool(cfg.distributed.offload_optimizer) and stage >= 1
    overlap_comm = cfg.distributed.overlap_comm
    if overlap_comm is None:  # auto, as pretrain.engine resolves it: on for ZeRO-2/3 on CUDA
        overlap_comm = device == "cuda" and stage >= 2
    model_buffers = buffer_bytes(shape, precision)
    if stage == 0:
        if not half:
            # torch AdamW on the whole fp32 model; gradients in .grad; the all-reduce flattens them into buffers.
            flat = min(p, ALLREDUCE_BUFFER_ELEMENTS) * F32
            return _States(4 * p + model_buffers, 4 * p, 8 * p, 0, 0, 0, flat, 0, True)
        # BF16_Optimizer at stage 0: 16-bit weights and .grad, whole fp32 masters and Adam states (measured: the
        # same bytes on each of 2 ranks as on 1), and a whole fp32 gradient buffer filled for the update.
        return _States(e * p + model_buffers, e * p, 8 * p, 4 * p, 0, 0, 4 * p, 0, True)
    bucket = int(_zero_setting(cfg, "reduce_bucket_size")) * e
    step = 4 * part + (e * part if half else 0)  # the partition's fp32 gradient (+ its 16-bit flat copy)
    host = 16 * part if offload else 0  # fp32 masters, Adam m and v, fp32 gradient partition (pinned host memory)
    opt, masters = (0, 0) if offload else (8 * part, 4 * part)
    if stage in (1, 2):
        # two reduce buckets alternate when communication overlaps backward
        buckets = bucket * (2 if overlap_comm else 1) if _zero_setting(cfg, "contiguous_gradients") else bucket
        grads = (4 if not half else e) * part
        return _States(e * p + model_buffers, grads, opt, masters, 0, buckets, 0 if offload else step, host, False)
    # ZeRO-3: weight partitions plus the small parameters kept whole; gradient partition and reduce bucket allocated
    # at start; layers gathered on use, at most max_live_parameters (+ a prefetch bucket) at a time.
    persistent = _persistent_params(shape, int(_zero_setting(cfg, "stage3_param_persistence_threshold")))
    weights = e * (part + persistent * (world_size - 1) // world_size) if world_size > 1 else e * part
    # Gathered layers: up to max_live_parameters in use plus one prefetch bucket in flight. Measured (CPU, default
    # limits, 2 ranks): about the whole model plus a bucket at the backward's peak, for SwinV2-T and SwinV2-H alike.
    live = min(p, int(_zero_setting(cfg, "stage3_max_live_parameters")))
    gathered = e * (live + min(p, int(_zero_setting(cfg, "stage3_prefetch_bucket_size"))))
    return _States(
        weights + model_buffers, e * part, opt, masters, bucket, gathered, 0 if offload else step, host, False, True
    )


def model_state_bytes(cfg: Any, *, world_size: int, device: str = "cuda") -> int:
    """Bytes per rank that stay allocated between optimizer steps: weights (and derived buffers), fp32 masters, Adam
    states, and under ZeRO-3 the gradient partition and reduce bucket. What ``deepspeed.initialize`` plus one step
    leave behind.

    Args:
        cfg: the resolved config; world_size: data-parallel ranks; device: "cuda" or "cpu" (as estimate_memory).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}; accepted: a positive integer")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}; accepted: cuda, cpu")
    return _states(cfg, model_shape(cfg.model), world_size, device).resting


def estimate_memory(
    cfg: Any, *, world_size: int, micro_batch: int | None = None, device: str = "cuda"
) -> MemoryEstimate:
    """Per-rank memory of pretraining ``cfg`` on ``world_size`` data-parallel ranks.

    Args:
        cfg: a resolved ``pretrain.config.PretrainConfig`` (model, simmim, training.precision, grad_accum_steps,
            distributed: zero_stage, offload_optimizer, bucket sizes, deepspeed pass-through).
        world_size: data-parallel ranks (>= 1).
        micro_batch: images per rank per micro-step; None = ``cfg.data.batch_size``.
        device: "cuda" (planning GPU runs: SDPA attention, CUDA kernels) or "cpu" (the explicit attention path and
            the CPU kernels' workspaces, for comparing with a CPU run).

    Returns:
        The :class:`MemoryEstimate`. ``total`` is the predicted peak per rank: the larger of the moment during
        backward (activations, gradients made so far, buckets) and the moment after it (all gradients, the update's
        buffers); ``overlap`` is what the sum of the entries counts twice against that peak.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}; accepted: a positive integer")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}; accepted: cuda, cpu")
    batch = cfg.data.batch_size if micro_batch is None else micro_batch
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"micro_batch={batch!r}; accepted: a positive integer (images per rank)")
    shape = model_shape(cfg.model)
    states = _states(cfg, shape, world_size, device)
    accumulate = cfg.training.grad_accum_steps > 1
    # ZeRO-0 gradients appear unit by unit during backward; with accumulation they are all there from the start.
    grads = None
    if states.grads_grow and not accumulate:
        grads = {
            name: count * (states.gradients // max(parameter_count(shape), 1))
            for name, count in parameter_counts_by_unit(shape)
        }
    act = activation_memory(
        shape,
        batch,
        precision=cfg.training.precision,
        checkpointing=cfg.model.activation_checkpointing,
        attn_impl=cfg.model.attn_impl,
        window_chunk_size=cfg.model.window_chunk_size,
        device=device,
        grads=grads,
    )
    static = states.parameters + states.optimizer_states + states.master_weights + states.persistent_buffers
    during_backward = (act.with_grads if grads is not None else act.peak + states.gradients) + states.backward
    after_backward = states.gradients + states.step
    total = static + max(during_backward, after_backward)
    buffers = states.persistent_buffers + max(states.backward, states.step)
    estimate = MemoryEstimate(
        parameters=states.parameters,
        gradients=states.gradients,
        optimizer_states=states.optimizer_states,
        master_weights=states.master_weights,
        activations=act.peak,
        deepspeed_buffers=buffers,
        host_offloaded=states.host,
    )
    return MemoryEstimate(**{**estimate.to_dict(), "overlap": estimate.total - total})
