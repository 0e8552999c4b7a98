"""Swin Transformer V2 backbone (Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", CVPR 2022).

One readable file in the manner of timm's ``swin_transformer_v2.py``, with the constructor argument names and the
state-dict keys of the official Microsoft implementation (``models/swin_transformer_v2.py``), so an official checkpoint
loads with ``strict=True`` once its derived buffers are dropped (:func:`swinv2.checkpoint_keys.strip_derived_buffers`).

What the V2 block does differently from V1 (spec §1):
- res-post-norm: LayerNorm on the residual *branch output* (after attention, after the MLP), zero-initialised so a
  fresh block is an exact identity;
- scaled cosine attention with a learnable per-head logit scale clamped at ln(100);
- a log-spaced continuous position bias produced by a small MLP (2 -> 512 -> heads) and squashed by 16*sigmoid;
- patch merging V2: linear reduction first, LayerNorm after.

Engineering choices (why):
- Every parameter is initialised inside the ``__init__`` of the module that owns it (``_TruncNormalLinear``,
  ``ResPostNorm``, ``WindowAttention``). DeepSpeed ``zero.Init`` partitions a module's own parameters right after its
  ``__init__`` returns, so an ``apply(init_fn)`` run by the parent afterwards would touch empty shards. Nothing in any
  constructor reads tensor values, so the model also builds on ``torch.device("meta")`` (the 3B SwinV2-G in seconds).
- Derived tables (``relative_coords_table``, ``relative_position_index``, ``attn_mask``, the window token permutation)
  are non-persistent buffers rebuilt by :meth:`SwinTransformerV2.set_input_size` / :meth:`reset_derived_buffers`. They
  are computed from integer tensors and converted explicitly, because ``zero.Init`` casts every floating tensor made
  by ``torch.arange``/``torch.zeros`` to the half dtype, and ``module.half()`` leaves integer buffers alone.
- The shifted-window roll and the window partition are one gather with a precomputed permutation (and its inverse
  in backward), instead of roll + permute + contiguous copies each way.
- Windows are folded into the head dimension, ``(B, nW * nH, N, hd)``, so the position bias and the shift mask form a
  single additive bias ``(nW * nH, N, N)`` that broadcasts over the batch; this is what lets the same tensors go
  through ``F.scaled_dot_product_attention`` or the explicit matmul/softmax path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .geometry import check_geometry, divisors, per_stage, to_2tuple, window_and_shift

__all__ = [
    "ATTN_IMPLS",
    "PatchEmbed",
    "PatchMerging",
    "ResPostNorm",
    "SwinTransformerBlock",
    "SwinTransformerV2",
    "WindowAttention",
    "choose_attn_impl",
]

# Official: torch.clamp(logit_scale, max=torch.log(torch.tensor(1. / 0.01))). A Python float avoids the CPU-tensor
# device bug (spec §4.2) and rounds to the same float32 value.
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)
ATTN_IMPLS = ("auto", "sdpa", "explicit")

# attn_impl="auto": measured on this project's CPU machine (AMD EPYC, 2 cores, torch 2.14.1), SwinV2-T 192/w12,
# batch 8, best of 4 interleaved rounds. Figures are img/s, explicit path / SDPA path.
#   device   dtype              train step (fwd+bwd+AdamW)     inference (no_grad)      choice
#   CPU      float32            5.35 / 5.13  (sdpa 0.96x)      16.4 / 15.2 (0.93x)      explicit
#   CPU      bfloat16 autocast  8.43 / 7.20  (sdpa 0.85x)      23.5 / 18.4 (0.78x)      explicit
# On CPU the SDPA kernels take the math fallback whenever the additive bias needs a gradient (the cpb MLP trains),
# and add mask bookkeeping; the explicit path folds the logit scale into q and adds the bias in place.
# CUDA was not measured in this task (no GPU was lent); "auto" takes SDPA there, whose memory-efficient kernel accepts
# an additive bias with gradient and never materialises the N x N weights (the memory reason holds regardless of speed).
_AUTO_SDPA: dict[tuple[str, torch.dtype], bool] = {
    ("cpu", torch.float32): False,
    ("cpu", torch.bfloat16): False,
    ("cpu", torch.float16): False,
}


def choose_attn_impl(device_type: str, dtype: torch.dtype) -> str:
    """The attention path that ``attn_impl="auto"`` takes for one device type and compute dtype.

    Args:
        device_type: ``torch.device.type`` of the activations ("cpu", "cuda", ...).
        dtype: dtype the attention matmuls run in (the autocast dtype when autocast is on).

    Returns:
        "sdpa" or "explicit".
    """
    if device_type == "cpu":
        return "sdpa" if _AUTO_SDPA.get((device_type, dtype), False) else "explicit"
    # CUDA and other accelerators: fused kernels that accept an additive bias beat the explicit path.
    return "sdpa"


class _TruncNormalLinear(nn.Linear):
    """nn.Linear with the official SwinV2 init (weight trunc_normal std .02, bias 0) applied in its own __init__."""

    def reset_parameters(self) -> None:
        # a=-2, b=2 are absolute cut-offs as in timm's trunc_normal_ (practically untruncated at std .02).
        nn.init.trunc_normal_(self.weight, std=0.02, a=-2.0, b=2.0)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class _QKVLinear(_TruncNormalLinear):
    """The bias-free qkv projection, called with the (q_bias, 0, v_bias) bias built by its parent.

    Calling the module (rather than F.linear on ``self.qkv.weight`` from the parent, as the official code does) keeps
    the weight used inside its owner's forward, the point at which DeepSpeed ZeRO-3's hooks gather a module's
    partitioned parameters (no reliance on ZeRO-3 detecting a parameter used by another module).
    """

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)


class ResPostNorm(nn.LayerNorm):
    """LayerNorm on a residual branch output, weight and bias initialised to zero (official ``_init_respostnorm``).

    A freshly initialised res-post-norm block is therefore an exact identity.
    """

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.zeros_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample, scaling kept samples by 1 / keep_prob.

    Args:
        drop_prob: probability of dropping the branch of a sample.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def _keep(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-sample factor (B, 1, ...): 0 for dropped samples, 1 / keep_prob for kept ones; None when inactive."""
        if self.drop_prob == 0.0 or not self.training:
            return None
        keep_prob = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        # A comparison with uniform draws rather than bernoulli_(keep_prob): under torch.compile the rate stays a
        # graph input, so blocks that differ only in their drop rate share one compiled graph.
        kept = torch.rand(shape, device=x.device) < keep_prob
        return kept.to(x.dtype) / keep_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self._keep(x)
        return x if keep is None else x * keep

    def add_to(self, residual: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """``residual + self(branch)`` in one pass (addcmul) instead of a product and then a sum."""
        keep = self._keep(branch)
        return residual + branch if keep is None else torch.addcmul(residual, branch, keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    """fc1 -> GELU (erf) -> dropout -> fc2 -> dropout (official key names fc1, fc2).

    Args:
        in_features: input and output channels.
        hidden_features: hidden channels.
        drop: dropout after the activation and after fc2.
    """

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = _TruncNormalLinear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = _TruncNormalLinear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class _PermuteTokens(torch.autograd.Function):
    """x[:, perm] along the token axis, with the inverse permutation as the backward (a gather, not a scatter-add)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, perm: torch.Tensor, inv_perm: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inv_perm)
        return x.index_select(1, perm)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inv_perm,) = ctx.saved_tensors
        return grad.index_select(1, inv_perm), None, None


class _CosineQKV(torch.autograd.Function):
    """Split qkv into heads and windows, L2-normalise q and k, and scale q by the per-head logit scale.

    qkv (B, nW*N, 3C) -> q, k, v, each (B, nW*nH, N, hd) and contiguous, with q = s * q / |q| and k = k / |k|
    (|x| clamped at 1e-12 as F.normalize does). Composed from autograd ops this takes a reshape copy per tensor in
    forward, and in backward the norm, the scale product, the unbind (a stack) and the un-permute each make a full
    pass over q/k; here the forward writes the head-folded layout directly and the backward writes each gradient
    once, into the qkv-shaped result: dx = f * g - y * (<g, y> * f / s^2), with f = s / |x| and y the output.
    """

    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, scale: torch.Tensor, windows: int, heads: int) -> tuple[torch.Tensor, ...]:
        b, length, c3 = qkv.shape
        n, hd = length // windows, c3 // (3 * heads)
        q, k, v = qkv.view(b, windows, n, 3, heads, hd).permute(3, 0, 1, 4, 2, 5).unbind(0)  # (B, nW, nH, N, hd)
        # Norms and factors in float32 whatever the activation dtype (bf16/fp16 rounding of |x| would be scaled by
        # up to 100 through the logit scale).
        dtype = torch.promote_types(qkv.dtype, torch.float32)
        q_factor = scale / torch.linalg.vector_norm(q, dim=-1, keepdim=True, dtype=dtype).clamp_min(1e-12)
        k_factor = torch.linalg.vector_norm(k, dim=-1, keepdim=True, dtype=dtype).clamp_min(1e-12).reciprocal()
        if torch.compiler.is_compiling():
            # The compiler fuses the product and the layout change itself (and does not keep out= strides).
            q_out, k_out = (q * q_factor.to(q.dtype)).contiguous(), (k * k_factor.to(k.dtype)).contiguous()
        else:
            shape = (b, windows, heads, n, hd)
            q_out = torch.mul(q, q_factor.to(q.dtype), out=qkv.new_empty(shape))
            k_out = torch.mul(k, k_factor.to(k.dtype), out=qkv.new_empty(shape))
        v_out = v.contiguous()
        ctx.save_for_backward(q_out, k_out, q_factor, k_factor, scale)
        folded = (b, windows * heads, n, hd)
        return q_out.reshape(folded), k_out.reshape(folded), v_out.reshape(folded)

    @staticmethod
    def backward(ctx: Any, gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q_out, k_out, q_factor, k_factor, scale = ctx.saved_tensors
        b, windows, heads, n, hd = q_out.shape
        compiling = torch.compiler.is_compiling()
        if not compiling:
            grad = q_out.new_empty((b, windows, n, 3, heads, hd))
            slots = grad.permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, nH, N, hd) views into the qkv-shaped gradient
        grads, grad_scale = [], None
        for slot, g, y, factor, s in ((0, gq, q_out, q_factor, scale), (1, gk, k_out, k_factor, None)):
            g = g.reshape(y.shape)
            dot = (g * y).sum(dim=-1, keepdim=True, dtype=factor.dtype)  # <g, y>
            coef = (dot * factor / (s * s if s is not None else 1.0)).to(y.dtype)
            if compiling:
                # The compiler fuses this itself, and it cannot trace writes into strided out= views.
                grads.append(g * factor.to(g.dtype) - y * coef)
            else:
                torch.mul(g, factor.to(g.dtype), out=slots[slot])
                slots[slot].addcmul_(y, coef, value=-1.0)
            if s is not None and ctx.needs_input_grad[1]:
                # d/ds of s * u is u: sum <g, u> = <g, y> / s over everything but the head axis.
                grad_scale = (dot / s).sum(dim=(0, 1, 3)).view_as(s).to(s.dtype)
        if compiling:
            grad = torch.stack([*grads, gv.reshape(y.shape)]).permute(1, 2, 4, 0, 3, 5)
        else:
            slots[2].copy_(gv.reshape(slots[2].shape))
        return grad.reshape(b, windows * n, 3 * heads * hd), grad_scale, None, None


def _diagonal_sum_matrix(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n * n, 2n - 1) 0/1 matrix: x.view(-1, n * n) @ it sums x[..., i, j] over each diagonal i - j = k - (n - 1)."""
    ids = torch.arange(n, device=device)
    return F.one_hot((ids[:, None] - ids[None, :] + n - 1).view(-1), 2 * n - 1).to(dtype)


class _RelativeBiasGather(torch.autograd.Function):
    """table ((2Wh-1)(2Ww-1), nH) -> bias (nH, N, N), bias[h, i, j] = table[relative_position_index[i, j], h].

    The gradient of a gather is a scatter-add of N^2 values into (2Wh-1)(2Ww-1) slots: with many values per slot it
    runs as atomic adds in compiled code (under torch.compile it took most of a stage-3 block's non-GEMM backward
    time). Token pairs share a slot exactly when they share the offset (yi - yj, xi - xj), so the same sums are
    diagonal sums of the (Wh, Ww, Wh, Ww) gradient, taken one axis at a time as small matmuls with 0/1 matrices.
    """

    @staticmethod
    def forward(ctx: Any, table: torch.Tensor, index: torch.Tensor, window_size: tuple[int, int]) -> torch.Tensor:
        n = window_size[0] * window_size[1]
        ctx.window_size = window_size
        return table.t().index_select(1, index.view(-1).long()).view(table.shape[1], n, n)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        wh, ww = ctx.window_size
        heads = grad.shape[0]
        per_pair = grad.reshape(heads, wh, ww, wh, ww).permute(0, 2, 4, 1, 3)  # (nH, xi, xj, yi, yj)
        rows = per_pair.reshape(-1, wh * wh) @ _diagonal_sum_matrix(wh, grad.dtype, grad.device)
        rows = rows.view(heads, ww, ww, 2 * wh - 1).permute(0, 3, 1, 2)  # (nH, 2Wh-1, xi, xj): summed over yi - yj
        offsets = rows.reshape(-1, ww * ww) @ _diagonal_sum_matrix(ww, grad.dtype, grad.device)  # and over xi - xj
        return offsets.view(heads, -1).t(), None, None


def relative_coords_table(
    window_size: tuple[int, int], pretrained_window_size: tuple[int, int], device: torch.device | str | None = None
) -> torch.Tensor:
    """Log-spaced relative coordinates (1, 2Wh-1, 2Ww-1, 2), float32 (spec §1.3).

    Args:
        window_size: window (height, width) of the block.
        pretrained_window_size: window the cpb MLP was trained with; (0, 0) means this window.
        device: device of the result.
    """
    wh, ww = window_size
    # Integer arange then an explicit float32 conversion: zero.Init rewrites float arange results to the half dtype.
    dh = torch.arange(-(wh - 1), wh, dtype=torch.int64, device=device).to(torch.float32)
    dw = torch.arange(-(ww - 1), ww, dtype=torch.int64, device=device).to(torch.float32)
    table = torch.stack(torch.meshgrid(dh, dw, indexing="ij"), dim=-1).unsqueeze(0)
    ph, pw = pretrained_window_size if pretrained_window_size[0] > 0 else window_size
    # max(P - 1, 1): a 1x1 window has only the offset 0; the official code divides 0 by 0 there.
    table = table / torch.tensor([max(ph - 1, 1), max(pw - 1, 1)], dtype=torch.int64, device=device).to(torch.float32)
    table = table * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def relative_position_index(window_size: tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """Index (N, N) int64 into the row-major flattened coords table for each token pair of a window (spec §1.3)."""
    wh, ww = window_size
    coords = torch.stack(
        torch.meshgrid(
            torch.arange(wh, dtype=torch.int64, device=device),
            torch.arange(ww, dtype=torch.int64, device=device),
            indexing="ij",
        )
    ).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def window_token_permutation(
    resolution: tuple[int, int], window_size: tuple[int, int], shift_size: tuple[int, int], device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token order of the shifted, window-partitioned feature map, as a permutation of the H*W row-major tokens.

    ``x.view(B, H*W, C)[:, perm]`` equals ``window_partition(roll(x, -shift))`` flattened to (B, nW*N, C): windows
    row-major over the window grid, tokens row-major inside a window. ``inv_perm`` undoes it (merge + roll back).
    """
    h, w = resolution
    wh, ww = window_size
    grid = torch.arange(h * w, dtype=torch.int64, device=device).view(h, w)
    if shift_size[0] or shift_size[1]:
        grid = torch.roll(grid, shifts=(-shift_size[0], -shift_size[1]), dims=(0, 1))
    perm = grid.view(h // wh, wh, w // ww, ww).permute(0, 2, 1, 3).reshape(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(h * w, dtype=torch.int64, device=device)
    return perm, inv_perm


def shifted_window_mask(
    resolution: tuple[int, int], window_size: tuple[int, int], shift_size: tuple[int, int], device: Any = None
) -> torch.Tensor:
    """The official SW-MSA mask (nW, N, N) float32: 0 within a region, -100 across regions (spec §1.4)."""
    h, w = resolution
    wh, ww = window_size
    img = torch.zeros((h, w), dtype=torch.int64, device=device)
    cnt = 0
    for hs in (slice(0, -wh), slice(-wh, -shift_size[0]), slice(-shift_size[0], None)):
        for ws in (slice(0, -ww), slice(-ww, -shift_size[1]), slice(-shift_size[1], None)):
            img[hs, ws] = cnt
            cnt += 1
    windows = img.view(h // wh, wh, w // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = windows[:, None, :] - windows[:, :, None]
    return (diff != 0).to(torch.float32) * -100.0


class WindowAttention(nn.Module):
    """Window multi-head self-attention with scaled cosine attention and a continuous position bias.

    Args:
        dim: channels.
        window_size: window (height, width).
        num_heads: attention heads.
        qkv_bias: learnable q and v biases (the k bias is a constant zero, as in the official code).
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
        pretrained_window_size: window the cpb MLP was trained with, (0, 0) for "this window".
        attn_impl: "auto" (per device and dtype, see ``choose_attn_impl``), "sdpa" or "explicit".
        window_chunk_size: process at most this many windows (per image) at a time; 0 = all at once.
    """

    def __init__(
        self,
        dim: int,
        window_size: tuple[int, int],
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window_size: tuple[int, int] = (0, 0),
        attn_impl: str = "auto",
        window_chunk_size: int = 0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(
                f"dim {dim} is not divisible by num_heads {num_heads}; head counts that divide it: {divisors(dim)}"
            )
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={attn_impl!r}; accepted: {', '.join(ATTN_IMPLS)}")
        if window_chunk_size < 0:
            raise ValueError(f"window_chunk_size={window_chunk_size}; accepted: 0 (off) or a positive window count")
        self.dim = dim
        self.window_size = to_2tuple(window_size)
        self.pretrained_window_size = to_2tuple(pretrained_window_size)
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.window_chunk_size = window_chunk_size

        self.logit_scale = nn.Parameter(torch.empty(num_heads, 1, 1))
        self.cpb_mlp = nn.Sequential(
            _TruncNormalLinear(2, 512, bias=True), nn.ReLU(inplace=True), _TruncNormalLinear(512, num_heads, bias=False)
        )
        self.qkv = _QKVLinear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.empty(dim))
            self.v_bias = nn.Parameter(torch.empty(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = _TruncNormalLinear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()
        self._bias_cache: tuple[tuple, torch.Tensor] | None = None
        self._build_buffers(device=None)

    def reset_parameters(self) -> None:
        """Official init of this module's own parameters: logit scale ln(10), q/v biases zero."""
        nn.init.constant_(self.logit_scale, math.log(10.0))
        if self.q_bias is not None:
            nn.init.zeros_(self.q_bias)
            nn.init.zeros_(self.v_bias)

    def _build_buffers(self, device: Any) -> None:
        self.register_buffer(
            "relative_coords_table",
            relative_coords_table(self.window_size, self.pretrained_window_size, device=device),
            persistent=False,
        )
        self.register_buffer(
            "relative_position_index", relative_position_index(self.window_size, device=device), persistent=False
        )
        self._bias_cache = None

    def set_window_size(self, window_size: tuple[int, int], pretrained_window_size: tuple[int, int]) -> None:
        """Change the window (and the pretrained window normaliser) and rebuild the derived tables."""
        self.window_size = to_2tuple(window_size)
        self.pretrained_window_size = to_2tuple(pretrained_window_size)
        self._build_buffers(device=self.relative_position_index.device)

    def position_bias(self) -> torch.Tensor:
        """16 * sigmoid(cpb_mlp(table)) gathered to (nH, N, N), in float32.

        Cached while the module is in eval mode under no_grad (the value only depends on the cpb weights); the cache
        key includes the weights' version counters, so a weight update or load_state_dict invalidates it.
        """
        params = list(self.cpb_mlp.parameters())
        cacheable = not self.training and not torch.is_grad_enabled()
        if cacheable:
            key = (*((p.data_ptr(), p._version) for p in params), self.relative_position_index.data_ptr())
            if self._bias_cache is not None and self._bias_cache[0] == key:
                return self._bias_cache[1]
        weight = params[0]
        # The table may have been cast to a half dtype with the module; compute in the weight's dtype.
        table = self.relative_coords_table.to(weight.dtype)
        # 16 * sigmoid on the (2Wh-1)(2Ww-1) table entries, then the gather: the same values as the official gather
        # then sigmoid (both elementwise), with the sigmoid and its backward on the small table.
        bias_table = 16 * torch.sigmoid(self.cpb_mlp(table).view(-1, self.num_heads).float())
        bias = _RelativeBiasGather.apply(bias_table, self.relative_position_index, self.window_size)
        if cacheable:
            self._bias_cache = (key, bias)
        else:
            self._bias_cache = None
        return bias

    def _impl_for(self, x: torch.Tensor) -> str:
        if self.attn_impl != "auto":
            return self.attn_impl
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        return choose_attn_impl(x.device.type, dtype)

    def _core(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pos_bias: torch.Tensor,
        mask: torch.Tensor | None,
        impl: str,
    ) -> torch.Tensor:
        """Attention of (B, nW*nH, N, hd) tensors (q already cos-scaled) over nW windows.

        ``pos_bias`` is the (nH, N, N) position bias, ``mask`` the (nW, N, N) shift mask of these windows or None.
        Their sum is formed here, per call, so that a chunked caller never holds more than one chunk's bias.
        """
        b, heads, n, _ = q.shape
        nh = pos_bias.shape[0]
        bias = None
        if mask is not None:
            bias = (pos_bias.unsqueeze(0) + mask.unsqueeze(1).to(pos_bias.dtype)).flatten(0, 1)  # (nW*nH, N, N)
        if impl == "sdpa":
            if bias is None:
                bias = pos_bias.repeat(heads // nh, 1, 1)
            p = self.attn_drop.p if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=p, scale=1.0)
        if bias is None:
            # Without a mask the (nH, N, N) bias broadcasts over the windows: nothing of size nW*nH*N*N is built.
            # The logits are made 5-D by the matmul itself: an in-place add on a *view* of them would make autograd
            # copy the N x N gradient three times (CopySlices) in backward.
            q, k = q.view(b, heads // nh, nh, n, -1), k.view(b, heads // nh, nh, n, -1)
            bias = pos_bias
        attn = q @ k.transpose(-2, -1)
        # In place when the dtypes agree (fp32): the matmul output is not saved for backward, so this skips one
        # N x N allocation. Under autocast the sum must stay float32 (bias precision), so out of place.
        attn = attn.add_(bias) if attn.dtype == bias.dtype else attn + bias
        attn = attn.view(b, heads, n, n).softmax(dim=-1)
        attn = self.attn_drop(attn)
        return attn.to(v.dtype) @ v

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention inside windows.

        Args:
            x: (B, nW * N, C) tokens, window-partitioned (windows row-major, tokens row-major inside each window).
            mask: optional (nW, N, N) additive shift mask.

        Returns:
            (B, nW * N, C).
        """
        b, length, c = x.shape
        n = self.window_size[0] * self.window_size[1]
        nw = length // n
        nh = self.num_heads
        bias_qkv = None
        if self.q_bias is not None:
            bias_qkv = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = self.qkv(x, bias_qkv)
        # Cosine attention with the logit scale folded into q's inverse norm: one multiply of q (N x hd) by a
        # (N x 1) factor instead of dividing q and then scaling the N x N logits.
        logit_scale = torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()
        q, k, v = _CosineQKV.apply(qkv, logit_scale, nw, nh)
        pos_bias = self.position_bias()  # (nH, N, N) float32
        impl = self._impl_for(x)
        chunk = self.window_chunk_size
        if chunk and chunk < nw:
            outs = []
            for start in range(0, nw, chunk):
                windows = slice(start, min(start + chunk, nw))
                heads = slice(windows.start * nh, windows.stop * nh)
                chunk_mask = mask[windows] if mask is not None else None
                args = (q[:, heads], k[:, heads], v[:, heads], pos_bias, chunk_mask, impl)
                if torch.is_grad_enabled() and q.requires_grad:
                    # Recompute each chunk's attention in backward so only one chunk's N x N weights ever exist:
                    # the paper's sequential self-attention bounds memory in training, not only in inference.
                    outs.append(torch.utils.checkpoint.checkpoint(self._core, *args, use_reentrant=False))
                else:
                    outs.append(self._core(*args))
            out = torch.cat(outs, dim=1)
        else:
            out = self._core(q, k, v, pos_bias, mask, impl)
        # (B, nW*nH, N, hd) -> (B, nW, N, nH, hd) -> (B, nW*N, C)
        out = out.view(b, nw, nh, n, -1).transpose(2, 3).reshape(b, length, c)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, window_size={self.window_size}, pretrained_window_size={self.pretrained_window_size}, "
            f"num_heads={self.num_heads}, attn_impl={self.attn_impl}, window_chunk_size={self.window_chunk_size}"
        )


class SwinTransformerBlock(nn.Module):
    """Res-post-norm Swin V2 block: x + DropPath(norm1(W-MSA(x))), then x + DropPath(norm2(MLP(x))).

    Args:
        dim: channels.
        input_resolution: token grid (H, W) of the stage.
        num_heads: attention heads.
        window_size: requested window; clamped to the resolution when min(resolution) <= window (official rule).
        shift_size: requested shift (window // 2 on odd blocks); forced to 0 by the same rule.
        mlp_ratio: MLP hidden / dim.
        qkv_bias: learnable q and v biases.
        drop: dropout in the MLP and after the attention projection.
        attn_drop: dropout on attention weights.
        drop_path: stochastic depth rate of this block.
        pretrained_window_size: window of the pretrained cpb MLP (0 = none).
        extra_norm: add the paper's extra LayerNorm on the main branch after this block (SwinV2-H/G).
        attn_impl: attention path, see ``WindowAttention``.
        window_chunk_size: windows per attention chunk, 0 = all.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int | tuple[int, int] = 7,
        shift_size: int | tuple[int, int] = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        pretrained_window_size: int | tuple[int, int] = 0,
        extra_norm: bool = False,
        attn_impl: str = "auto",
        window_chunk_size: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.grad_checkpointing = False
        self.target_window_size = to_2tuple(window_size)
        self.target_shift_size = to_2tuple(shift_size)
        self.input_resolution = to_2tuple(input_resolution)
        self.window_size, self.shift_size = self._clamp(self.input_resolution)
        self.attn = WindowAttention(
            dim,
            window_size=self.window_size,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
            pretrained_window_size=to_2tuple(pretrained_window_size),
            attn_impl=attn_impl,
            window_chunk_size=window_chunk_size,
        )
        self.norm1 = ResPostNorm(dim)
        self.drop_path = DropPath(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.norm2 = ResPostNorm(dim)
        self.extra_norm = nn.LayerNorm(dim) if extra_norm else None
        self._build_buffers(device=None)

    def _clamp(self, resolution: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        return window_and_shift(resolution, self.target_window_size, self.target_shift_size)

    def _build_buffers(self, device: Any) -> None:
        shifted = any(self.shift_size)
        mask = (
            shifted_window_mask(self.input_resolution, self.window_size, self.shift_size, device) if shifted else None
        )
        self.register_buffer("attn_mask", mask, persistent=False)
        perm, inv_perm = window_token_permutation(self.input_resolution, self.window_size, self.shift_size, device)
        # One unshifted window covering the whole stage (stages 2 and 3 at 192/w12): the order is already right.
        self.identity_order = self.window_size == self.input_resolution and not shifted
        self.register_buffer("token_perm", perm, persistent=False)
        self.register_buffer("token_inv_perm", inv_perm, persistent=False)

    def set_input_size(
        self,
        input_resolution: tuple[int, int],
        window_size: tuple[int, int],
        pretrained_window_size: tuple[int, int],
    ) -> None:
        """Re-derive window, shift and all derived buffers for a new stage resolution / window."""
        self.target_window_size = to_2tuple(window_size)
        if any(self.target_shift_size):
            self.target_shift_size = (self.target_window_size[0] // 2, self.target_window_size[1] // 2)
        self.input_resolution = to_2tuple(input_resolution)
        self.window_size, self.shift_size = self._clamp(self.input_resolution)
        device = self.token_perm.device
        self.attn.set_window_size(self.window_size, pretrained_window_size)
        self._build_buffers(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H*W, C) -> (B, H*W, C)."""
        if self.identity_order:
            attn = self.attn(x, self.attn_mask)
        else:
            windows = _PermuteTokens.apply(x, self.token_perm, self.token_inv_perm)
            attn = _PermuteTokens.apply(self.attn(windows, self.attn_mask), self.token_inv_perm, self.token_perm)
        x = self.drop_path.add_to(x, self.norm1(attn))
        x = self.drop_path.add_to(x, self.norm2(self.mlp(x)))
        if self.extra_norm is not None:
            x = self.extra_norm(x)
        return x

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, "
            f"window_size={self.window_size}, shift_size={self.shift_size}, mlp_ratio={self.mlp_ratio}"
        )


class PatchMerging(nn.Module):
    """Patch merging V2: 2x2 neighbours concatenated (order x0, x1, x2, x3), Linear(4C, 2C, no bias), then LayerNorm.

    Args:
        input_resolution: token grid (H, W), both even.
        dim: input channels C.
    """

    def __init__(self, input_resolution: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.input_resolution = to_2tuple(input_resolution)
        self.dim = dim
        self.reduction = _TruncNormalLinear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H*W, C) -> (B, H/2*W/2, 2C)."""
        h, w = self.input_resolution
        b, _, c = x.shape
        # (B, H/2, 2[h], W/2, 2[w], C) -> (B, H/2, W/2, 2[w], 2[h], C): channel blocks come out as
        # [h0w0, h1w0, h0w1, h1w1] = x0, x1, x2, x3 of the official code.
        x = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, (h // 2) * (w // 2), 4 * c)
        return self.norm(self.reduction(x))

    def extra_repr(self) -> str:
        return f"input_resolution={self.input_resolution}, dim={self.dim}"


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks, then (stages 0..n-2) a patch merging, as in the official layout.

    Args:
        dim: channels of the stage.
        input_resolution: token grid of the stage.
        depth: number of blocks.
        num_heads: attention heads.
        window_size: requested window.
        mlp_ratio: MLP hidden / dim.
        qkv_bias: learnable q and v biases.
        drop: dropout rate.
        attn_drop: attention dropout rate.
        drop_path: per-block stochastic depth rates (length depth).
        downsample: add a patch merging at the end.
        pretrained_window_size: pretrained window of the cpb MLPs of this stage.
        extra_norm_every: extra main-branch LayerNorm after every k-th block of the stage (not after the last one).
        attn_impl: attention path.
        window_chunk_size: windows per attention chunk.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int | tuple[int, int],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        downsample: bool = False,
        pretrained_window_size: int | tuple[int, int] = 0,
        extra_norm_every: int = 0,
        attn_impl: str = "auto",
        window_chunk_size: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = to_2tuple(input_resolution)
        self.depth = depth
        window = to_2tuple(window_size)
        self.blocks = nn.ModuleList(
            [
                SwinTransformerBlock(
                    dim=dim,
                    input_resolution=self.input_resolution,
                    num_heads=num_heads,
                    window_size=window,
                    shift_size=0 if i % 2 == 0 else (window[0] // 2, window[1] // 2),
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[i] if drop_path else 0.0,
                    pretrained_window_size=pretrained_window_size,
                    extra_norm=extra_norm_every > 0 and (i + 1) % extra_norm_every == 0 and i + 1 < depth,
                    attn_impl=attn_impl,
                    window_chunk_size=window_chunk_size,
                )
                for i in range(depth)
            ]
        )
        self.downsample = PatchMerging(self.input_resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if blk.grad_checkpointing and torch.is_grad_enabled() and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class PatchEmbed(nn.Module):
    """Conv2d(kernel = stride = patch) to tokens (B, L, C) row-major, then LayerNorm (official ``patch_embed``).

    Args:
        img_size: input image (H, W).
        patch_size: patch side.
        in_chans: input channels.
        embed_dim: output channels.
        patch_norm: LayerNorm after the projection.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        patch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.set_img_size(img_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def set_img_size(self, img_size: int | tuple[int, int]) -> None:
        """Validate and record the input size; the patch grid follows from it."""
        img_size = to_2tuple(img_size)
        for side, p in zip(img_size, self.patch_size, strict=True):
            if side <= 0 or side % p:
                lower = (side // p) * p
                nearest = f"{lower} or {lower + p}" if lower > 0 else f"{p}, {2 * p}, {3 * p}, ..."
                raise ValueError(
                    f"image size {img_size[0]}x{img_size[1]} is not a positive multiple of the patch size {p}; "
                    f"nearest valid sizes: {nearest}"
                )
        self.img_size = img_size
        self.patches_resolution = (img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1])
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected images (B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}), got {tuple(x.shape)}"
            )
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"input size {x.shape[2]}x{x.shape[3]} does not match the model's img_size "
                f"{self.img_size[0]}x{self.img_size[1]}; resize the input or call set_input_size(img_size=...)"
            )
        x = self.proj(x).flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return x


class SwinTransformerV2(nn.Module):
    """Swin Transformer V2 with the official Microsoft argument and state-dict names.

    Args:
        img_size: input image side (int) or (H, W).
        patch_size: patch side.
        in_chans: input channels.
        num_classes: classes of the head; 0 = no head (``head`` is Identity).
        embed_dim: channels of stage 0 (C0); stage i has C0 * 2^i.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: window side, one int for all stages or one per stage (clamped per stage, spec §1.4).
        mlp_ratio: MLP hidden / dim.
        qkv_bias: learnable q and v biases.
        drop_rate: dropout rate (after patch embed, in MLPs and after attention projections).
        attn_drop_rate: attention-weight dropout rate.
        drop_path_rate: stochastic depth, linearly increasing over all blocks from 0 to this value.
        norm_layer: accepted for the official signature; only ``nn.LayerNorm`` (what every official model uses).
        ape: learnable absolute position embedding (1, L, C0).
        patch_norm: LayerNorm after the patch projection.
        use_checkpoint: official flag; True checkpoints every block (same as ``set_grad_checkpointing(True)``).
        pretrained_window_sizes: per stage, the window the cpb MLP was pretrained with (0 = none); used to fine-tune
            at a larger window, e.g. 192/w12 -> 256/w16 with (12, 12, 12, 6).
        extra_norm_every: the SwinV2 paper's extra LayerNorm on the main branch for H and G (section 3.4), placed after
            every k-th block *within a stage*, except after a stage's last block. 0 = off (official architecture).
            Why there: the paper says "every 6 layers" without more; counting within a stage keeps the norms at the
            same depth positions whatever the stage depths are, and a norm after the last block would duplicate the
            LayerNorm that immediately follows it (patch merging's norm, or the final norm).
        attn_impl: "auto" (per device and dtype, measured; see ``choose_attn_impl``), "sdpa" or "explicit".
        window_chunk_size: sequential window attention; attention runs over at most this many windows per image at a
            time (each chunk recomputed in backward), bounding attention memory at high resolution. 0 = off.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0),
        *,
        extra_norm_every: int = 0,
        attn_impl: str = "auto",
        window_chunk_size: int = 0,
    ) -> None:
        super().__init__()
        depths = tuple(int(d) for d in depths)
        num_heads = tuple(int(h) for h in num_heads)
        self.num_layers = len(depths)
        if len(num_heads) != self.num_layers:
            raise ValueError(f"depths {depths} and num_heads {num_heads} must have the same length")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={attn_impl!r}; accepted: {', '.join(ATTN_IMPLS)}")
        if extra_norm_every < 0:
            raise ValueError(f"extra_norm_every={extra_norm_every}; accepted: 0 (off) or a positive block count")
        if norm_layer is not nn.LayerNorm:
            raise ValueError(
                f"norm_layer={norm_layer!r}; accepted: torch.nn.LayerNorm (res-post-norm is defined on it)"
            )
        if embed_dim <= 0 or any(h <= 0 for h in num_heads) or patch_size <= 0:
            raise ValueError(
                f"embed_dim={embed_dim}, num_heads={num_heads}, patch_size={patch_size}; accepted: positive integers"
            )
        window_sizes = self._per_stage(window_size, "window_size")
        if any(w <= 0 for w in window_sizes):
            raise ValueError(f"window_size={window_size}; accepted: positive integers (one, or one per stage)")
        if not any(pretrained_window_sizes):
            # The all-zero default means "no pretrained window" whatever the number of stages.
            pretrained_window_sizes = [0] * self.num_layers
        pretrained = self._per_stage(pretrained_window_sizes, "pretrained_window_sizes")
        if any(w < 0 for w in pretrained):
            raise ValueError(f"pretrained_window_sizes={pretrained}; accepted: 0 (none) or positive window sizes")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.depths = depths
        self.num_heads = num_heads
        self.ape = ape
        self.patch_norm = patch_norm
        self.mlp_ratio = mlp_ratio
        self.extra_norm_every = extra_norm_every
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.window_size = window_sizes
        self.pretrained_window_sizes = pretrained

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, patch_norm)
        self.patch_size = patch_size
        self.img_size = self.patch_embed.img_size
        resolutions = self._check_geometry(self.patch_embed.patches_resolution, window_sizes)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.empty(1, self.patch_embed.num_patches, embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02, a=-2.0, b=2.0)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(p=drop_rate)

        # Linear in the global block index (stage-major), computed in Python: no tensor values read at build time.
        total = sum(depths)
        dpr = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            self.layers.append(
                BasicLayer(
                    dim=int(embed_dim * 2**i),
                    input_resolution=resolutions[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=window_sizes[i],
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    downsample=i < self.num_layers - 1,
                    pretrained_window_size=pretrained[i],
                    extra_norm_every=extra_norm_every,
                    attn_impl=attn_impl,
                    window_chunk_size=window_chunk_size,
                )
            )
        self.norm = nn.LayerNorm(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = _TruncNormalLinear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if use_checkpoint:
            self.set_grad_checkpointing(True)

    # ----------------------------------------------------------------------------------------------- construction
    def _per_stage(self, value: int | Sequence[int], name: str) -> list[int]:
        return per_stage(value, self.num_layers, name)

    def _check_geometry(self, grid: tuple[int, int], windows: Sequence[int]) -> list[tuple[int, int]]:
        """Stage resolutions for a patch grid, after checking that every stage's windows tile it."""
        return check_geometry(
            (grid[0] * self.patch_size, grid[1] * self.patch_size), self.patch_size, windows, self.num_layers
        )

    def init_weights(self) -> None:
        """Re-apply the official initialisation to every parameter and rebuild the derived buffers.

        Construction already initialises everything; call this after materialising a meta-device model with
        ``to_empty(device=...)``.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm, nn.Conv2d, WindowAttention)):
                module.reset_parameters()
        if self.absolute_pos_embed is not None:
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02, a=-2.0, b=2.0)
        self.reset_derived_buffers()

    def reset_derived_buffers(self, device: torch.device | str | None = None) -> None:
        """Rebuild relative_coords_table, relative_position_index, attn_mask and the token permutations.

        Args:
            device: where to build them; default the device of the patch-embed weight (or CPU for meta models
                being materialised, whose parameters are then already real).
        """
        if device is None:
            device = self.patch_embed.proj.weight.device
        for layer in self.layers:
            for blk in layer.blocks:
                blk.attn._build_buffers(device)
                blk._build_buffers(device)

    def set_input_size(
        self,
        img_size: int | tuple[int, int] | None = None,
        window_size: int | Sequence[int] | None = None,
        pretrained_window_sizes: Sequence[int] | None = None,
    ) -> None:
        """Change input size, window size and pretrained windows after construction (e.g. for fine-tuning).

        Weights are untouched (the cpb MLP is resolution independent); the coords tables, indices, masks and
        permutations are rebuilt. With ``ape`` the absolute position embedding is resized bicubically.

        Args:
            img_size: new input side or (H, W); None keeps the current one.
            window_size: new window, one int or one per stage; None keeps the current one.
            pretrained_window_sizes: per-stage windows the cpb MLPs were pretrained with; None keeps them.
        """
        new_windows = self._per_stage(window_size, "window_size") if window_size is not None else self.window_size
        new_pre = (
            self._per_stage(pretrained_window_sizes, "pretrained_window_sizes")
            if pretrained_window_sizes is not None
            else self.pretrained_window_sizes
        )
        old_grid = self.patch_embed.patches_resolution
        old_img = self.patch_embed.img_size
        if img_size is not None:
            self.patch_embed.set_img_size(img_size)
        try:
            # Validate every stage before changing any block, so a bad request leaves the model as it was.
            resolutions = self._check_geometry(self.patch_embed.patches_resolution, new_windows)
        except ValueError:
            self.patch_embed.set_img_size(old_img)
            raise
        for i, layer in enumerate(self.layers):
            layer.input_resolution = resolutions[i]
            for blk in layer.blocks:
                blk.set_input_size(resolutions[i], to_2tuple(new_windows[i]), to_2tuple(new_pre[i]))
            if layer.downsample is not None:
                layer.downsample.input_resolution = resolutions[i]
        if self.absolute_pos_embed is not None and self.patch_embed.patches_resolution != old_grid:
            c = self.embed_dim
            grid = self.absolute_pos_embed.data.view(1, *old_grid, c).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=self.patch_embed.patches_resolution, mode="bicubic", align_corners=False)
            self.absolute_pos_embed = nn.Parameter(grid.permute(0, 2, 3, 1).reshape(1, -1, c))
        self.img_size = self.patch_embed.img_size
        self.window_size = new_windows
        self.pretrained_window_sizes = new_pre

    # ------------------------------------------------------------------------------------------------ training aids
    def set_grad_checkpointing(
        self, enable: bool = True, *, every: int = 1, stages: Sequence[int] | None = None
    ) -> None:
        """Non-reentrant activation checkpointing per block.

        Args:
            enable: turn checkpointing on for the selected blocks (and off for all others); False turns all off.
            every: select every k-th block counted over the whole network (global block index % every == 0).
            stages: restrict to these stage indices (None = all stages).
        """
        if every < 1:
            raise ValueError(f"every={every}; accepted: a positive integer (1 = every block)")
        if stages is not None:
            stages = [int(s) for s in stages]
            bad = [s for s in stages if not 0 <= s < self.num_layers]
            if bad:
                raise ValueError(f"stages {bad} out of range; accepted: 0..{self.num_layers - 1}")
        index = 0
        for i, layer in enumerate(self.layers):
            for blk in layer.blocks:
                blk.grad_checkpointing = bool(enable and (stages is None or i in stages) and index % every == 0)
                index += 1

    def no_weight_decay(self) -> set[str]:
        """Exact parameter names excluded from weight decay (official list)."""
        return {"absolute_pos_embed"}

    def no_weight_decay_keywords(self) -> set[str]:
        """Substrings of parameter names excluded from weight decay (official list)."""
        return {"cpb_mlp", "logit_scale", "relative_position_bias_table"}

    # ----------------------------------------------------------------------------------------------------- forward
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, H, W) -> patch tokens (B, L, C0) after the patch-embed norm."""
        return self.patch_embed(x)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, L, C0) -> final-norm tokens (B, L_last, C_last): ape, pos_drop, stages, norm."""
        if self.absolute_pos_embed is not None:
            tokens = tokens + self.absolute_pos_embed
        x = self.pos_drop(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> pooled features (B, num_features)."""
        x = self.forward_tokens(self.embed(x))
        return self.avgpool(x.transpose(1, 2)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> logits (B, num_classes), or pooled features when num_classes = 0."""
        return self.head(self.forward_features(x))
