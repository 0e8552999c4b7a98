"""Activation memory of one SimMIM micro-batch, forward and backward, from the architecture alone.

No model is built or traced: every block is written out as the ordered list of what its operations keep for backward
and of the temporaries they hold while they run, each a closed form in the batch B, the stage's tokens L, width C,
heads h, window area N, the MLP width and the element sizes. The counts were derived by reading
``swinv2/swin_transformer_v2.py`` and ``pretrain/simmim.py`` and checked against the tensors autograd really saves
(``torch.autograd.graph.saved_tensors_hooks``) and against every allocation of a forward and backward
(``tests/unit/test_plan_memory.py``).

What one block keeps (explicit attention path, X = B*L*C*e bytes, S = B*L*h*N attention weights):
- the window-ordered input of the qkv projection (X), the cosine-normalised q and k and the v copy (3X), the
  per-token norm factors of q and k (2*B*L*h float32), the cpb MLP's hidden layer ((2Wh-1)(2Ww-1) x 512) and the
  sigmoid of its output (float32);
- the softmax output (S float32; under a 16-bit module also its 16-bit copy, the input of attn @ v);
- the input of the output projection (X), of norm1 (X), of fc1 (X), of GELU and of fc2 (2 x 4X with mlp_ratio 4), of
  norm2 (X), with the two LayerNorms' mean and rstd (per token; float32 on CUDA, the activation dtype on CPU).
Window chunking replaces the S softmax output by the (h, N, N) position bias kept by the chunks' checkpoints and
recomputes one chunk's weights in backward. Activation checkpointing keeps only a block's input, and recomputes its
whole list during its backward.

Peak = the larger of the forward's and the backward's highest point, found by walking the lists: forward adds what
each operation keeps (plus its transient outputs and workspace), backward walks them in reverse, with the incoming
gradient, the gradients each operation produces (weight gradients included: the peak is defined with parameter
gradients released as soon as they are accumulated, the ``gradients`` entry of the memory estimate holds the kept
ones) and kernel workspace, then frees what the operation kept.

Two CPU kernels' workspaces are part of the model because they are large at small batch (measured, torch 2.14 with
oneDNN): the channels-last 1x1 decoder convolution holds a reordered copy of its weight in forward and 2 (batch 1) or
3 weight-sized float32 buffers for its weight gradient in backward. On CUDA these are taken as one weight-gradient
copy. The CUDA attention path (``attn_impl`` auto resolves to SDPA there: a memory-efficient kernel that keeps the
output and the log-sum-exp instead of the weights) is modelled from the kernel's documented saved tensors and could
not be measured here; the CPU paths (explicit, and SDPA's math fallback) are measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from swinv2 import parse_checkpointing
from swinv2.geometry import check_geometry, window_and_shift

__all__ = [
    "ACTIVATION_BYTES",
    "ActivationEstimate",
    "ModelShape",
    "Op",
    "Unit",
    "activation_memory",
    "checkpointed_blocks",
    "model_shape",
    "resolve_attn_impl",
    "simmim_units",
]

# Bytes per activation element for training.precision: DeepSpeed's bf16/fp16 modes cast the whole module, so
# activations are 16-bit except where the code asks for float32 (norm factors, position bias, softmax, loss).
ACTIVATION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
F32 = 4
F64 = 8
CPB_HIDDEN = 512  # width of the continuous position-bias MLP (fixed by the architecture)


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers activation memory depends on (a resolved ``model`` + ``simmim`` section)."""

    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    mlp_ratio: float
    extra_norm_every: int
    drop_path_rate: float
    drop_rate: float
    attn_drop_rate: float
    ape: bool
    patch_norm: bool

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def encoder_stride(self) -> int:
        return self.patch_size * 2 ** (self.num_stages - 1)

    def resolutions(self) -> list[tuple[int, int]]:
        """Token grid of every stage (checked: the windows must tile every stage)."""
        return check_geometry(self.img_size, self.patch_size, self.window_size, self.num_stages)


def model_shape(model_cfg: object) -> ModelShape:
    """The :class:`ModelShape` of a ``model`` config section (``pretrain.backbone.ModelConfig``).

    Args:
        model_cfg: the section; fields left at None take the named size's values.
    """
    resolved = model_cfg.resolved  # type: ignore[attr-defined]
    return ModelShape(
        img_size=int(model_cfg.img_size),  # type: ignore[attr-defined]
        patch_size=int(model_cfg.patch_size),  # type: ignore[attr-defined]
        in_chans=int(model_cfg.in_chans),  # type: ignore[attr-defined]
        embed_dim=int(resolved("embed_dim")),
        depths=tuple(int(d) for d in resolved("depths")),
        num_heads=tuple(int(h) for h in resolved("num_heads")),
        window_size=int(model_cfg.window_size),  # type: ignore[attr-defined]
        mlp_ratio=float(model_cfg.mlp_ratio),  # type: ignore[attr-defined]
        extra_norm_every=int(resolved("extra_norm_every")),
        drop_path_rate=float(model_cfg.drop_path_rate),  # type: ignore[attr-defined]
        drop_rate=float(model_cfg.drop_rate),  # type: ignore[attr-defined]
        attn_drop_rate=float(model_cfg.attn_drop_rate),  # type: ignore[attr-defined]
        ape=bool(model_cfg.ape),  # type: ignore[attr-defined]
        patch_norm=bool(model_cfg.patch_norm),  # type: ignore[attr-defined]
    )


@dataclass(frozen=True)
class Op:
    """One operation's memory: ``saved`` is kept from its forward until its backward has run; ``fwd_temp`` is alive
    only while its forward runs (beyond what is kept); ``bwd_temp`` while its backward runs (the incoming gradient,
    the gradients it produces, workspace, and a residual gradient held meanwhile)."""

    name: str
    saved: int = 0
    fwd_temp: int = 0
    bwd_temp: int = 0


@dataclass(frozen=True)
class Unit:
    """A run of operations that is checkpointed as a whole or not at all (a transformer block), or never (the rest).

    ``input_bytes``: what a checkpoint keeps (the unit's input); ``input_saved``: one operation keeps (as ``saved``)
    that same input (then it is not counted twice under checkpointing); ``out_bytes``: the unit's output, whose
    gradient is alive while a checkpointed unit is recomputed.
    """

    name: str
    ops: tuple[Op, ...]
    input_bytes: int = 0
    out_bytes: int = 0
    input_saved: bool = False
    checkpointed: bool = False

    @property
    def saved(self) -> int:
        return sum(op.saved for op in self.ops)


@dataclass(frozen=True)
class ActivationEstimate:
    """Activation bytes of one micro-batch.

    ``peak``: the highest point over forward and backward (what the memory estimate uses); ``stored``: kept for
    backward at the end of the forward; ``forward_peak`` / ``backward_peak``: the highest point of each pass.
    """

    peak: int
    stored: int
    forward_peak: int
    backward_peak: int
    attn_impl: str
    with_grads: int = 0


def resolve_attn_impl(attn_impl: str, device: str, precision: str) -> str:
    """The attention path ``attn_impl`` takes on ``device`` ("cpu" or an accelerator type) at ``precision``.

    Same rule as ``swinv2.choose_attn_impl`` for "auto" (on CPU: explicit; elsewhere: SDPA). SDPA on CPU takes
    PyTorch's math fallback (the bias needs a gradient), which keeps more than the explicit path: "sdpa_math".
    """
    if attn_impl not in ("auto", "sdpa", "explicit"):
        raise ValueError(f"attn_impl={attn_impl!r}; accepted: auto, sdpa, explicit")
    if precision not in ACTIVATION_BYTES:
        raise ValueError(f"precision={precision!r}; accepted: {', '.join(ACTIVATION_BYTES)}")
    if attn_impl == "auto":
        import torch

        from swinv2 import choose_attn_impl

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        attn_impl = choose_attn_impl("cpu" if device == "cpu" else "cuda", dtype)
    if attn_impl == "sdpa":
        return "sdpa_math" if device == "cpu" else "sdpa_efficient"
    return attn_impl


def checkpointed_blocks(spec: str, depths: Sequence[int]) -> list[list[bool]]:
    """Per stage, per block: whether ``activation_checkpointing`` spec checkpoints it (as set_grad_checkpointing)."""
    kwargs = parse_checkpointing(spec)
    stages = kwargs.get("stages")
    if stages is not None:
        bad = [s for s in stages if not 0 <= s < len(depths)]
        if bad:
            raise ValueError(
                f"activation_checkpointing={spec!r}: stages {bad} do not exist; accepted: 0..{len(depths) - 1}"
            )
    every = int(kwargs.get("every", 1))
    result, index = [], 0
    for i, depth in enumerate(depths):
        row = []
        for _ in range(depth):
            row.append(bool(kwargs["enable"] and (stages is None or i in stages) and index % every == 0))
            index += 1
        result.append(row)
    return result


@dataclass(frozen=True)
class _Ctx:
    """Per-call constants: batch, element sizes, attention path, chunking, device."""

    batch: int
    e: int  # activation element bytes
    stats: int  # LayerNorm mean/rstd element bytes
    impl: str
    chunk: int
    cpu: bool
    drop: bool = False  # dropout after the patch embedding, the attention projection and in the MLP
    attn_drop: bool = False  # dropout on the attention weights


def _linear(name: str, ctx: _Ctx, n_in: int, n_out: int, weights: int, hold: int = 0, keeps_input: bool = True) -> Op:
    """A linear layer (n_in input and n_out output elements): keeps its input unless an earlier entry does;
    backward holds d(out) and makes d(in) and d(weight)."""
    e = ctx.e
    return Op(
        name,
        saved=n_in * e if keeps_input else 0,
        fwd_temp=n_out * e,
        bwd_temp=(n_out + n_in + weights) * e + hold,
    )


def _layer_norm(name: str, ctx: _Ctx, tokens: int, dim: int, hold: int = 0) -> Op:
    """LayerNorm keeps its input and per-token mean and rstd; backward makes d(input)."""
    x = tokens * dim * ctx.e
    return Op(name, saved=x + 2 * tokens * ctx.stats, fwd_temp=x, bwd_temp=2 * x + hold)


def _attention_ops(ctx: _Ctx, tokens: int, dim: int, heads: int, n: int, windows: int, shifted: bool) -> list[Op]:
    """Cosine attention of one block on B * tokens tokens (windows per image of n tokens); q, k, v already exist."""
    b, e = ctx.batch, ctx.e
    x = b * tokens * dim * e
    s = b * tokens * heads * n  # attention weights of the whole micro-batch
    bias_full = windows * heads * n * n * F32  # (nW*nH, N, N) float32 bias of a shifted block (batch-independent)
    pos_bias = heads * n * n * F32
    mask_temp = bias_full if shifted else 0
    if ctx.impl == "sdpa_efficient":
        # The fused kernel keeps q, k, v (kept above), its output and the log-sum-exp rows; the (nW*nH, N, N) bias
        # (repeated over windows when unshifted) is an input that needs a gradient, so it is kept too.
        lse = b * windows * heads * (math.ceil(n / 32) * 32) * F32
        bias = windows * heads * n * n * e
        return [
            Op(
                "attention",
                saved=x + lse + bias,
                fwd_temp=pos_bias + bias_full,
                bwd_temp=4 * x + bias_full + x,
            )
        ]
    if ctx.chunk and ctx.chunk < windows:
        # Only one chunk's weights exist at a time, in forward and in the recompute of backward; the chunks'
        # checkpoints keep the (nH, N, N) position bias (their inputs q, k, v are views of tensors kept above).
        cs = b * min(ctx.chunk, windows) * heads * n * n
        chunk_bias = min(ctx.chunk, windows) * heads * n * n * F32 if shifted else 0
        return [
            Op(
                "attention",
                saved=pos_bias,
                # one chunk's weights; all chunk outputs, then their concatenation; qkv (a local) alive
                fwd_temp=_weights_peak(cs) + chunk_bias + 5 * x,
                # one chunk recomputed: its float32 weights and the two float32 gradients of the softmax; d(q, k, v)
                bwd_temp=3 * cs * F32 + chunk_bias + 4 * x,
            )
        ]
    if ctx.impl == "sdpa_math":
        # PyTorch's math fallback (float32 inside): keeps the softmax output, a transposed k and a q copy, and v
        # (v_out itself in float32, a float32 copy under a 16-bit module, v_out then kept by nobody).
        xf = b * tokens * dim * F32
        kept = s * F32 + 2 * xf + (xf - x if e != F32 else 0)
        copy = 0
    else:
        # softmax output (float32: the bias is float32), and its 16-bit copy (the input of attn @ v)
        copy = s * e if e != F32 else 0
        kept = s * F32 + copy
    if ctx.attn_drop:
        # the mask (bool on CUDA; on CPU a float32 tensor like the weights), and in float32 the dropped weights, a
        # new tensor kept by attn @ v (under a 16-bit module the 16-bit copy already is)
        kept += s * (F32 if ctx.cpu else 1) + (s * F32 if e == F32 else 0)
    # Forward: the float32 logits (+ bias) and the softmax output side by side; qkv is still alive (a local of the
    # attention forward). Backward: d(weights) and d(logits) in float32 side by side in the softmax backward, with
    # d(v) made and the residual gradient held; the 16-bit copy of the weights is gone by then.
    return [
        Op(
            "attention",
            saved=kept,
            fwd_temp=max(_weights_peak(s) - kept, 0) + mask_temp + 3 * x,
            bwd_temp=2 * s * F32 + 3 * x - copy,
        )
    ]


def _dropout(ctx: _Ctx, name: str, numel: int, hold: int = 0) -> list[Op]:
    """nn.Dropout with p > 0 in training: keeps its mask (bool on CUDA, the input's dtype on CPU) and makes a new
    output; nothing at all when p = 0 (identity)."""
    if not ctx.drop:
        return []
    x = numel * ctx.e
    return [Op(name, saved=numel * (ctx.e if ctx.cpu else 1), fwd_temp=x, bwd_temp=2 * x + hold)]


def _weights_peak(s: int) -> int:
    """Bytes while s attention weights are formed: float32 logits (plus bias) and the float32 softmax output side by
    side (the 16-bit logits of a 16-bit module are freed by the float32 sum before the softmax runs)."""
    return 2 * s * F32


def _block(ctx: _Ctx, name: str, tokens: int, dim: int, heads: int, n: int, hidden: int, flags: dict) -> Unit:
    """One SwinV2 block: W-MSA (or SW-MSA) with res-post-norm, MLP with res-post-norm, optional extra norm."""
    b, e = ctx.batch, ctx.e
    x = b * tokens * dim * e
    xh = b * tokens * hidden * e
    windows = tokens // n
    table = flags["table"]
    heads_f = b * tokens * heads * F32  # per-token factor of q or k (float32)
    keep = b * e if flags["drop_path"] else 0
    ops = [
        # The window-ordered copy of the input (none with one unshifted window: qkv then keeps the block input).
        Op("window_order", fwd_temp=0 if flags["identity"] else x, bwd_temp=3 * x),
        _linear("qkv", ctx, x // e, 3 * x // e, 3 * dim * dim + 3 * dim, hold=x),
        # q, k normalised and scaled, v copied out of qkv; qkv itself is alive while they are made.
        Op("cosine_qkv", saved=3 * x + 2 * heads_f, fwd_temp=3 * x, bwd_temp=3 * x + 4 * x + x),
        # cpb MLP on the offsets table: hidden layer kept (ReLU in place), sigmoid output kept (float32);
        # backward makes the hidden layer's gradient and an in-place ReLU's slice copies.
        Op(
            "position_bias",
            saved=table * CPB_HIDDEN * e + table * heads * F32,
            fwd_temp=table * heads * (e + 2 * F32) + heads * n * n * F32,
            bwd_temp=4 * table * CPB_HIDDEN * e + 4 * x,
        ),
        *_attention_ops(ctx, tokens, dim, heads, n, windows, flags["shifted"]),
        # (B, nW*nH, N, hd) -> (B, L, C) copy, kept as the input of the output projection.
        Op("attn_out", fwd_temp=x, bwd_temp=2 * x + x),
        _linear("proj", ctx, x // e, x // e, dim * dim + dim, hold=x),
        *_dropout(ctx, "proj_drop", b * tokens * dim, hold=x),
        _layer_norm("norm1", ctx, b * tokens, dim, hold=x),
        # residual + drop_path(branch), kept as fc1's input; drop path keeps its per-sample factor.
        Op("residual1", saved=keep, fwd_temp=x, bwd_temp=3 * x),
        _linear("fc1", ctx, x // e, xh // e, dim * hidden + hidden, hold=x),
        Op("gelu", saved=xh, fwd_temp=xh, bwd_temp=2 * xh + x),  # keeps its input
        *_dropout(ctx, "mlp_drop1", b * tokens * hidden, hold=x),
        _linear("fc2", ctx, xh // e, x // e, hidden * dim + dim, hold=x),  # keeps GELU's (or dropout's) output
        *_dropout(ctx, "mlp_drop2", b * tokens * dim, hold=x),
        _layer_norm("norm2", ctx, b * tokens, dim, hold=x),
        Op("residual2", saved=keep, fwd_temp=x, bwd_temp=3 * x),
    ]
    if flags["extra_norm"]:
        ops.append(_layer_norm("extra_norm", ctx, b * tokens, dim))
    return Unit(name, tuple(ops), input_bytes=x, out_bytes=x, input_saved=flags["identity"])


def _merge(ctx: _Ctx, stage: int, tokens: int, dim: int) -> Unit:
    """Patch merging: the 2x2 neighbours' (B, L/4, 4C) copy kept by the reduction, then LayerNorm on L/4 x 2C."""
    x = ctx.batch * tokens * dim * ctx.e
    ops = (
        Op("merge_copy", fwd_temp=x, bwd_temp=2 * x),
        _linear("reduction", ctx, x // ctx.e, x // 2 // ctx.e, 8 * dim * dim),
        _layer_norm("merge_norm", ctx, ctx.batch * tokens // 4, 2 * dim),
    )
    return Unit(f"stage{stage}.merge", ops, input_bytes=x, out_bytes=x // 2)


def _embed(ctx: _Ctx, shape: ModelShape, tokens: int) -> Unit:
    """Patch embedding (conv, LayerNorm) and SimMIM's mask-token blend; the images exist before the forward."""
    b, e, c = ctx.batch, ctx.e, shape.embed_dim
    x = b * tokens * c * e
    ops = [Op("patch_conv", fwd_temp=x, bwd_temp=2 * x)]
    if shape.patch_norm:
        ops.append(_layer_norm("patch_norm", ctx, b * tokens, c))
    # tokens * (1 - w) + mask_token * w: keeps w and 1 - w (B, L, 1); backward reduces d(mask_token) from (B, L, C).
    ops.append(Op("mask_blend", saved=2 * b * tokens * e, fwd_temp=3 * x, bwd_temp=3 * x))
    ops.extend(_dropout(ctx, "pos_drop", b * tokens * c))
    return Unit("embed", tuple(ops), out_bytes=x)


def _head(ctx: _Ctx, shape: ModelShape, tokens: int, dim: int) -> Unit:
    """Final norm, decoder (1x1 conv to stride^2 * 3 channels, pixel shuffle) and the masked L1 loss."""
    b, e = ctx.batch, ctx.e
    x = b * tokens * dim * e
    stride = shape.encoder_stride
    out_ch = stride * stride * shape.in_chans
    weight = (dim * out_ch + out_ch) * e
    pixels = b * shape.in_chans * shape.img_size * shape.img_size  # reconstruction elements
    if ctx.cpu:
        # oneDNN, channels-last 1x1 conv (the decoder's input is a transposed view): a reordered weight in forward;
        # the weight gradient in float32 through 2 (batch 1) or 3 weight-sized buffers, plus the 16-bit result.
        conv_fwd = weight
        conv_wgrad = (weight // e) * F32 * (2 if b == 1 else 3) if e == F32 else 3 * weight
    else:
        conv_fwd, conv_wgrad = 0, weight
    # normalized_target: float64 image, window sums through padded cumulative sums (padded by the window on one
    # axis at a time), mean, mean of squares: 3 images + 3 padded ones at the highest point.
    pad = shape.img_size + 2 * (47 // 2) + 1
    target = int(pixels * F64 * (3 + 3 * pad / shape.img_size)) + (pixels * F32 if e != F32 else 0)
    weights_px = b * shape.img_size * shape.img_size * F32
    ops = (
        _layer_norm("final_norm", ctx, b * tokens, dim),
        # the conv keeps its input (a view of the final norm's output)
        Op("decoder_conv", saved=x, fwd_temp=conv_fwd + pixels * e, bwd_temp=pixels * e + x + conv_wgrad),
        Op("pixel_shuffle", fwd_temp=2 * pixels * e, bwd_temp=2 * pixels * e),
        # the target (no graph), then |recon - target| keeps the difference and the pixel weights
        Op(
            "loss",
            saved=pixels * F32 + weights_px,
            fwd_temp=max(target, 3 * pixels * F32 + pixels * e),
            bwd_temp=3 * pixels * F32 + pixels * e,
        ),
    )
    return Unit("head", ops)


def simmim_units(
    shape: ModelShape,
    batch: int,
    *,
    precision: str = "fp32",
    checkpointing: str = "none",
    attn_impl: str = "auto",
    window_chunk_size: int = 0,
    device: str = "cuda",
) -> list[Unit]:
    """The SimMIM model as units in forward order, with their operations' memory for this micro-batch.

    Args:
        shape: the architecture.
        batch: micro-batch per rank (>= 1).
        precision: training.precision (fp32, bf16, fp16: the module is cast, activations follow).
        checkpointing: model.activation_checkpointing spec ("none", "all", "every:K", "stages:I,J", "every:K+...").
        attn_impl: model.attn_impl (auto, sdpa, explicit).
        window_chunk_size: model.window_chunk_size (0 = off).
        device: "cpu" or an accelerator type ("cuda"): decides the attention path of "auto" and kernel workspaces.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"micro-batch {batch!r}; accepted: a positive integer")
    if window_chunk_size < 0:
        raise ValueError(f"window_chunk_size={window_chunk_size}; accepted: 0 (off) or a positive window count")
    impl = resolve_attn_impl(attn_impl, device, precision)
    e = ACTIVATION_BYTES[precision]
    cpu = device == "cpu"
    ctx = _Ctx(batch, e, e if cpu else F32, impl, window_chunk_size, cpu, shape.drop_rate > 0, shape.attn_drop_rate > 0)
    checkpointed = checkpointed_blocks(checkpointing, shape.depths)
    resolutions = shape.resolutions()
    units = [_embed(ctx, shape, resolutions[0][0] * resolutions[0][1])]
    for i, (res, depth, heads) in enumerate(zip(resolutions, shape.depths, shape.num_heads, strict=True)):
        dim = shape.embed_dim * 2**i
        tokens = res[0] * res[1]
        window = (shape.window_size, shape.window_size)
        for j in range(depth):
            shift = (window[0] // 2, window[1] // 2) if j % 2 else (0, 0)
            win, sh = window_and_shift(res, window, shift)
            flags = {
                "shifted": any(sh),
                "identity": win == res and not any(sh),
                "table": (2 * win[0] - 1) * (2 * win[1] - 1),
                "drop_path": shape.drop_path_rate > 0 and (i > 0 or j > 0),
                "extra_norm": shape.extra_norm_every > 0 and (j + 1) % shape.extra_norm_every == 0 and j + 1 < depth,
            }
            unit = _block(
                ctx, f"stage{i}.block{j}", tokens, dim, heads, win[0] * win[1], int(dim * shape.mlp_ratio), flags
            )
            units.append(Unit(**{**unit.__dict__, "checkpointed": checkpointed[i][j]}))
        if i < shape.num_stages - 1:
            units.append(_merge(ctx, i, tokens, dim))
    last = resolutions[-1]
    units.append(_head(ctx, shape, last[0] * last[1], shape.embed_dim * 2 ** (shape.num_stages - 1)))
    return units


def _walk(units: Sequence[Unit], grads: dict[str, int] | None = None) -> tuple[int, int, int, int]:
    """(forward peak, stored at the end of the forward, backward peak, backward peak with kept gradients) of units
    in forward order; ``grads``: gradient bytes each unit leaves behind once its backward has run (counted from the
    start of that backward)."""
    grads = grads or {}
    live = forward_peak = 0
    for unit in units:
        kept = unit.input_bytes if unit.checkpointed else 0
        # The unit's input stays alive through its forward (the residual), counted once.
        hold = 0 if unit.checkpointed or unit.input_saved else unit.input_bytes
        running = 0
        for op in unit.ops:
            # A checkpointed unit keeps nothing but its input once it has run, but while it runs the forward's
            # locals hold most of what it would keep: counted as kept until the unit ends (an upper bound, and
            # never above the same unit's recompute in backward).
            forward_peak = max(forward_peak, live + kept + hold + running + op.saved + op.fwd_temp)
            running += op.saved
        live += kept if unit.checkpointed else running
    stored = live
    backward_peak = with_grads = kept_grads = 0
    for unit in reversed(units):
        kept_grads += grads.get(unit.name, 0)
        unit_peak = 0
        if unit.checkpointed:
            # Recompute: the block's forward again, keeping everything, with d(output) waiting.
            running = -unit.input_bytes if unit.input_saved else 0
            for op in unit.ops:
                unit_peak = max(unit_peak, live + running + op.saved + op.fwd_temp + unit.out_bytes)
                running += op.saved
            live += running
        for op in reversed(unit.ops):
            unit_peak = max(unit_peak, live + op.bwd_temp)
            live -= op.saved
        backward_peak = max(backward_peak, unit_peak)
        with_grads = max(with_grads, unit_peak + kept_grads)
        if unit.checkpointed:
            live -= 0 if unit.input_saved else unit.input_bytes
    return forward_peak, stored, backward_peak, with_grads


def activation_memory(
    shape: ModelShape,
    batch: int,
    *,
    precision: str = "fp32",
    checkpointing: str = "none",
    attn_impl: str = "auto",
    window_chunk_size: int = 0,
    device: str = "cuda",
    grads: dict[str, int] | None = None,
) -> ActivationEstimate:
    """Peak activation bytes of one SimMIM micro-batch (forward + backward) on one rank.

    Args:
        shape, batch, precision, checkpointing, attn_impl, window_chunk_size, device: as :func:`simmim_units`.
        grads: gradient bytes per unit name that stay once the unit's backward has run (ZeRO-0 keeps them in
            ``.grad``); ``with_grads`` is then the backward's peak of activations plus those gradients.
    """
    units = simmim_units(
        shape,
        batch,
        precision=precision,
        checkpointing=checkpointing,
        attn_impl=attn_impl,
        window_chunk_size=window_chunk_size,
        device=device,
    )
    forward_peak, stored, backward_peak, with_grads = _walk(units, grads)
    return ActivationEstimate(
        peak=max(forward_peak, backward_peak),
        stored=stored,
        forward_peak=forward_peak,
        backward_peak=backward_peak,
        with_grads=max(forward_peak, with_grads),
        attn_impl=resolve_attn_impl(attn_impl, device, precision),
    )
