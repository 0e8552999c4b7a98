"""SwinTransformerV2: sizes, init, meta device, resolution transfer, attention paths, checkpointing, param groups."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import swinv2
from swinv2 import MODEL_SIZES, SwinTransformerV2, create_model, param_groups, parse_checkpointing
from swinv2.swin_transformer_v2 import WindowAttention, relative_coords_table

# Spec §1.8 (num_classes 0 unless noted), official architecture (extra_norm_every=0).
EXPECTED_BACKBONE_PARAMS = {
    "tiny": 27_578_154,
    "small": 48_959_418,
    "base": 86_893_816,
    "large": 195_202_932,
    "huge": 655_210_922,
    "giant": 2_997_815_008,
}


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _small(**kwargs) -> SwinTransformerV2:
    """A 64x64 tiny-width model: stage resolutions 16, 8, 4, 2 with window 4 (shifted stages 0 and 1)."""
    args = {"img_size": 64, "window_size": 4, "embed_dim": 32, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8)}
    args.update(kwargs)
    return SwinTransformerV2(**args)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" in name:
                p.copy_(torch.rand(p.shape, generator=gen) * 5.0 + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.ndim == 1 else 0.05))


@pytest.mark.parametrize("size", list(EXPECTED_BACKBONE_PARAMS))
def test_parameter_counts_equal_spec_table(size):
    with torch.device("meta"):
        model = create_model(size, num_classes=0, img_size=192, window_size=12, extra_norm_every=0)
    assert _numel(model) == EXPECTED_BACKBONE_PARAMS[size]


def test_tiny_with_head_and_extra_norm_deltas():
    with torch.device("meta"):
        tiny = create_model("tiny", img_size=256, window_size=8)
        huge = create_model("huge", num_classes=0, img_size=192, window_size=12)
        giant = create_model("giant", num_classes=0, img_size=192, window_size=12)
    assert _numel(tiny) == 28_347_154
    # Extra norms after blocks 6 and 12 of H's 18-block stage 2 (C=1408) and after blocks 6..36 of G's 42-block
    # stage 2 (C=2048); none after a stage's last block, none in the 2- and 4-block stages.
    assert MODEL_SIZES["huge"]["extra_norm_every"] == 6 and MODEL_SIZES["giant"]["extra_norm_every"] == 6
    assert _numel(huge) - EXPECTED_BACKBONE_PARAMS["huge"] == 2 * (2 * 1408)
    assert _numel(giant) - EXPECTED_BACKBONE_PARAMS["giant"] == 6 * (2 * 2048)
    placed = [f"{i}.{j}" for i, layer in enumerate(giant.layers) for j, b in enumerate(layer.blocks) if b.extra_norm]
    assert placed == ["2.5", "2.11", "2.17", "2.23", "2.29", "2.35"]


def test_giant_builds_on_meta_device_quickly():
    start = time.perf_counter()
    with torch.device("meta"):
        model = create_model("giant", img_size=192, window_size=12)
    assert time.perf_counter() - start < 30.0
    assert all(p.is_meta for p in model.parameters())


def test_official_init_and_identity_blocks():
    model = _small(num_classes=10)
    for layer in model.layers:
        for blk in layer.blocks:
            for norm in (blk.norm1, blk.norm2):
                assert torch.count_nonzero(norm.weight) == 0 and torch.count_nonzero(norm.bias) == 0
            assert torch.allclose(blk.attn.logit_scale, torch.full_like(blk.attn.logit_scale, math.log(10.0)))
            assert torch.count_nonzero(blk.attn.q_bias) == 0 and torch.count_nonzero(blk.attn.v_bias) == 0
            # Zero post-norms: a fresh block is an exact identity.
            x = torch.randn(2, blk.input_resolution[0] * blk.input_resolution[1], blk.dim)
            assert torch.equal(blk(x), x)
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    big = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Linear)])
    assert abs(big.std().item() - 0.02) < 0.002 and big.abs().max().item() < 0.02 * 6


def test_meta_model_materialises_with_to_empty_and_init_weights():
    with torch.device("meta"):
        model = _small(num_classes=0)
    model.to_empty(device="cpu")
    model.init_weights()
    reference = _small(num_classes=0)
    reference.load_state_dict(model.state_dict())
    for (name, buf), (_, ref_buf) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(buf, ref_buf), name
    assert torch.count_nonzero(model.layers[0].blocks[0].norm1.weight) == 0
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model(x), reference(x))


def test_derived_buffers_are_non_persistent_and_survive_half_casts():
    model = _small()
    keys = model.state_dict().keys()
    assert not any(w in k for k in keys for w in ("relative_coords_table", "relative_position_index", "attn_mask"))
    model = model.to(torch.bfloat16)
    attn = model.layers[0].blocks[1].attn
    assert attn.relative_position_index.dtype == torch.int64
    assert model.layers[0].blocks[1].token_perm.dtype == torch.int64
    out = model(torch.randn(2, 3, 64, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_relative_coords_table_values_from_spec():
    table = relative_coords_table((12, 12), (0, 0))
    assert table.shape == (1, 23, 23, 2) and table.dtype == torch.float32
    expected = torch.tensor([-1.056642, -1.016121, -0.971869])
    assert torch.allclose(table[0, :3, 0, 0], expected, atol=1e-6)
    assert torch.allclose(table[0, 0, :3, 1], expected, atol=1e-6)
    larger = relative_coords_table((14, 14), (12, 12))
    assert abs(larger.max().item() - 1.128686) < 1e-6


def test_set_input_size_equals_direct_construction():
    pretrained = create_model("tiny", img_size=192, window_size=12)
    _randomize(pretrained)
    pretrained.set_input_size(img_size=256, window_size=16, pretrained_window_sizes=(12, 12, 12, 6))
    direct = create_model("tiny", img_size=256, window_size=16, pretrained_window_sizes=(12, 12, 12, 6))
    direct.load_state_dict(pretrained.state_dict(), strict=True)
    for (name, buf), (_, ref_buf) in zip(pretrained.named_buffers(), direct.named_buffers(), strict=True):
        assert buf.shape == ref_buf.shape and torch.equal(buf, ref_buf), name
    pretrained.eval()
    direct.eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(pretrained(x), direct(x))
    assert pretrained.layers[3].blocks[0].window_size == (8, 8)  # stage 3 is 8x8: clamped to 8


def test_bad_inputs_raise_value_errors_naming_sizes():
    with pytest.raises(ValueError, match=r"190x190 is not a positive multiple of the patch size 4.*188 or 192"):
        create_model("tiny", img_size=190, window_size=12)
    with pytest.raises(ValueError, match=r"48x48 is not a multiple of window size 10.*\[2, 3, 4, 6, 8, 12, 16"):
        create_model("tiny", img_size=192, window_size=10)
    with pytest.raises(ValueError, match="odd"):
        create_model("tiny", img_size=200, window_size=5)
    model = _small()
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 64, 64\), got \(2, 1, 64, 64\)"):
        model(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"input size 32x32 does not match the model's img_size 64x64"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="not a multiple of window size"):
        model.set_input_size(window_size=3)
    assert model.layers[0].blocks[0].window_size == (4, 4)  # a rejected request leaves the model unchanged
    with pytest.raises(ValueError, match="unknown model size 'medium'; accepted: tiny, small"):
        create_model("medium")
    with pytest.raises(ValueError, match="attn_impl='flash'; accepted"):
        _small(attn_impl="flash")
    # The usual fix is the image size: the message lists nearby sizes whose every stage fits the window.
    with pytest.raises(ValueError, match=r"320x320 is not a multiple of window size 12.*near 1280 .*\[768, 1152, 1536"):
        create_model("tiny", img_size=1280, window_size=12)
    with pytest.raises(ValueError, match=r"window_size=0; accepted: positive"):
        _small(window_size=0)
    with pytest.raises(ValueError, match=r"patch_size=0; accepted: positive"):
        _small(patch_size=0)
    with pytest.raises(ValueError, match=r"image size 0x0 is not a positive multiple of the patch size 4"):
        _small(img_size=0)
    with pytest.raises(
        ValueError, match=r"dim 30 is not divisible by num_heads 4; head counts that divide it: \[1, 2, 3"
    ):
        _small(embed_dim=30, num_heads=(4, 8, 16, 32))
    with pytest.raises(ValueError, match=r"pretrained_window_sizes=\[-1, 0, 0, 0\]; accepted"):
        _small(pretrained_window_sizes=(-1, 0, 0, 0))
    with pytest.raises(ValueError, match=r"norm_layer=.*BatchNorm1d.*accepted: torch.nn.LayerNorm"):
        _small(norm_layer=torch.nn.BatchNorm1d)


def test_official_signature_and_any_stage_count():
    """The official constructor's extra arguments are accepted; the all-zero default works for any stage count."""
    model = SwinTransformerV2(img_size=64, window_size=4, norm_layer=torch.nn.LayerNorm, use_checkpoint=True)
    assert all(blk.grad_checkpointing for layer in model.layers for blk in layer.blocks)
    three = SwinTransformerV2(img_size=64, window_size=4, embed_dim=16, depths=(1, 1, 1), num_heads=(1, 2, 4))
    assert three.pretrained_window_sizes == [0, 0, 0]
    assert three(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_and_explicit_attention_agree(dtype):
    explicit = _small(attn_impl="explicit", drop_path_rate=0.0)
    _randomize(explicit)
    sdpa = _small(attn_impl="sdpa", drop_path_rate=0.0)
    sdpa.load_state_dict(explicit.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        a = explicit(x)
        b = sdpa(x)
    a.float().sum().backward()
    b.float().sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 0.1
    assert (a.float() - b.float()).abs().max().item() <= tol
    if dtype == torch.float32:
        for (name, p), (_, q) in zip(explicit.named_parameters(), sdpa.named_parameters(), strict=True):
            assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


def test_auto_attention_choice_table():
    assert swinv2.choose_attn_impl("cpu", torch.float32) == "explicit"
    assert swinv2.choose_attn_impl("cpu", torch.bfloat16) == "explicit"
    assert swinv2.choose_attn_impl("cuda", torch.bfloat16) == "sdpa"
    assert swinv2.choose_attn_impl("cuda", torch.float32) == "sdpa"
    x = torch.randn(1, 16, 32)
    assert _small().layers[0].blocks[0].attn._impl_for(x) == "explicit"
    forced = _small(attn_impl="sdpa").layers[0].blocks[0].attn
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert forced._impl_for(x) == "sdpa"


def test_cosine_qkv_gradients():
    """The fused split/normalise/scale of q, k, v: gradcheck in float64, and equal to the composed autograd ops."""
    from swinv2.swin_transformer_v2 import _CosineQKV

    gen = torch.Generator().manual_seed(0)
    windows, heads, n, hd = 3, 2, 4, 5
    qkv = torch.randn(2, windows * n, 3 * heads * hd, dtype=torch.float64, generator=gen, requires_grad=True)
    scale = (torch.rand(heads, 1, 1, dtype=torch.float64, generator=gen) * 5 + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, s: _CosineQKV.apply(a, s, windows, heads), (qkv, scale))

    q, k, v = qkv.view(2, windows, n, 3, heads, hd).permute(3, 0, 1, 4, 2, 5).unbind(0)
    composed = [
        t.reshape(2, windows * heads, n, hd)
        for t in (torch.nn.functional.normalize(q, dim=-1) * scale, torch.nn.functional.normalize(k, dim=-1), v)
    ]
    fused = _CosineQKV.apply(qkv, scale, windows, heads)
    weights = [torch.randn(t.shape, dtype=torch.float64, generator=gen) for t in fused]
    grads_fused = torch.autograd.grad(sum((t * w).sum() for t, w in zip(fused, weights, strict=True)), (qkv, scale))
    grads_ref = torch.autograd.grad(sum((t * w).sum() for t, w in zip(composed, weights, strict=True)), (qkv, scale))
    for a, b in zip([*fused, *grads_fused], [*composed, *grads_ref], strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("window", [(1, 1), (2, 3), (4, 4), (12, 12)])
def test_relative_bias_gather_equals_index_select_with_gradients(window):
    """The position-bias gather and its diagonal-sum backward: gradcheck on small windows, and equal to index_select
    with autograd's scatter-add backward (float64) up to the official 12x12 window."""
    from swinv2.swin_transformer_v2 import _RelativeBiasGather, relative_position_index

    gen = torch.Generator().manual_seed(0)
    heads, n = 3, window[0] * window[1]
    index = relative_position_index(window)
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads, dtype=torch.float64, generator=gen)
    table.requires_grad_()
    if n <= 16:
        assert torch.autograd.gradcheck(lambda t: _RelativeBiasGather.apply(t, index, window), (table,))
    reference = table.index_select(0, index.view(-1)).view(n, n, heads).permute(2, 0, 1)
    gathered = _RelativeBiasGather.apply(table, index, window)
    assert torch.equal(gathered, reference)
    weight = torch.randn(heads, n, n, dtype=torch.float64, generator=gen)
    (ours,) = torch.autograd.grad((gathered * weight).sum(), table)
    (expected,) = torch.autograd.grad((reference * weight).sum(), table)
    assert torch.allclose(ours, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
def test_window_chunked_attention_gives_same_results(impl):
    full = _small(attn_impl=impl, drop_path_rate=0.0)
    _randomize(full)
    chunked = _small(attn_impl=impl, drop_path_rate=0.0, window_chunk_size=3)  # 16 windows in stage 0: 3+3+...+1
    chunked.load_state_dict(full.state_dict())
    x = torch.randn(2, 3, 64, 64)
    a, b = full(x), chunked(x)
    assert (a - b).abs().max().item() <= 1e-6
    a.sum().backward()
    b.sum().backward()
    for (name, p), (_, q) in zip(full.named_parameters(), chunked.named_parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name


class _LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest storage any op allocates (views such as expand allocate nothing and are not counted)."""

    def __init__(self, *existing: torch.Tensor) -> None:
        super().__init__()
        self.largest = 0
        # Views of tensors that exist beforehand (inputs, weights, buffers) allocate nothing.
        self.seen = {t.untyped_storage().data_ptr() for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.seen:
                    self.seen.add(storage.data_ptr())
                    self.largest = max(self.largest, storage.nbytes())
        return out


@pytest.mark.parametrize("shifted", [False, True], ids=["unshifted", "shifted"])
@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
def test_window_chunked_attention_bounds_memory(impl, shifted):
    """Sequential attention: no tensor of forward or backward holds more than one chunk's N x N weights or bias."""
    resolution, window, heads, dim = (64, 64), (8, 8), 2, 16
    attn = WindowAttention(dim, window, heads, attn_impl=impl, window_chunk_size=2)
    n, nw = 64, 64
    mask = swinv2.swin_transformer_v2.shifted_window_mask(resolution, window, (4, 4)) if shifted else None
    x = torch.randn(1, nw * n, dim, requires_grad=True)
    existing = [x, *attn.parameters(), *attn.buffers(), *([mask] if shifted else [])]
    with _LargestAllocation(*existing) as tracker:
        attn(x, mask).sum().backward()
    full_weights = nw * heads * n * n * 4  # one image's attention weights (or bias), float32: 2 MiB
    # What may be larger than one chunk's weights: the qkv activations and the cpb MLP's hidden layer (15*15 x 512).
    others = max(nw * n * 3 * dim * 4, 15 * 15 * 512 * 4)
    assert tracker.largest <= others < full_weights / 2, (tracker.largest, others, full_weights)


def test_activation_checkpointing_same_results_and_selection():
    torch.manual_seed(0)
    plain = _small(drop_path_rate=0.3)
    _randomize(plain)
    ckpt = _small(drop_path_rate=0.3)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing(**parse_checkpointing("all"))
    x = torch.randn(2, 3, 64, 64)
    # Same RNG stream for stochastic depth: non-reentrant checkpointing restores the RNG state on recompute.
    torch.manual_seed(1)
    a = plain(x)
    a.sum().backward()
    torch.manual_seed(1)
    b = ckpt(x)
    b.sum().backward()
    assert torch.equal(a, b)
    for (name, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name

    def selected(model):
        return [b.grad_checkpointing for layer in model.layers for b in layer.blocks]

    ckpt.set_grad_checkpointing(**parse_checkpointing("every:3"))
    assert selected(ckpt) == [True, False, False, True, False, False, True, False]
    ckpt.set_grad_checkpointing(**parse_checkpointing("stages:0,2"))
    assert selected(ckpt) == [True, True, False, False, True, True, False, False]
    ckpt.set_grad_checkpointing(**parse_checkpointing("none"))
    assert not any(selected(ckpt))


def test_compile_blocks_one_graph_per_block_kind_and_equal_to_eager():
    """Regional compilation: blocks that differ only in their drop-path rate share a graph (6 graphs for 8 blocks
    here), no graph breaks, state-dict keys unchanged, and forward and gradients equal eager ones (inductor told to
    draw its random numbers with eager's generator, so stochastic depth drops the same samples)."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    # Stages at 16, 8, 4, 2 tokens with window 4: unshifted and shifted blocks in stages 0 and 1, then one kind per
    # stage (window clamped, no shift) whose two blocks have different drop rates.
    eager = _small(drop_path_rate=0.2)
    _randomize(eager)
    compiled = _small(drop_path_rate=0.2)
    compiled.load_state_dict(eager.state_dict())
    assert swinv2.compile_blocks(compiled) == 8
    assert list(compiled.state_dict()) == list(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    results = []
    for model in (eager, compiled):
        torch.manual_seed(7)
        with inductor_config.patch(fallback_random=True):
            out = model(x)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    assert counters["stats"]["unique_graphs"] == 6
    assert sum(counters["graph_break"].values()) == 0
    (out_e, grads_e), (out_c, grads_c) = results
    assert torch.allclose(out_c, out_e, atol=1e-5, rtol=1e-4)
    for name, grad in grads_e.items():
        assert torch.allclose(grads_c[name], grad, atol=1e-5, rtol=1e-3), name
    with pytest.raises(ValueError, match="contains no SwinTransformerBlock"):
        swinv2.compile_blocks(torch.nn.Linear(2, 2))


def test_parse_checkpointing_rejects_bad_specs():
    assert parse_checkpointing("every:2") == {"enable": True, "every": 2}
    assert parse_checkpointing("every:2+stages:2,3") == {"enable": True, "every": 2, "stages": [2, 3]}
    model = _small(depths=(2, 2, 4, 2))
    model.set_grad_checkpointing(**parse_checkpointing("every:2+stages:2,3"))
    chosen = [blk.grad_checkpointing for layer in model.layers for blk in layer.blocks]
    # Global block indices 0..9; stages 2 and 3 hold 4..7 and 8..9; every 2nd of those: 4, 6, 8.
    assert [i for i, on in enumerate(chosen) if on] == [4, 6, 8]
    for bad in ("every:0", "stages:", "some", "every:x", "every:2+every:3", "every:2+"):
        with pytest.raises(ValueError, match="accepted"):
            parse_checkpointing(bad)
    with pytest.raises(ValueError, match="stages \\[7\\] out of range"):
        _small().set_grad_checkpointing(stages=[7])


def test_position_bias_cached_in_eval_and_invalidated_on_update():
    attn = WindowAttention(32, (4, 4), 2)
    attn.eval()
    with torch.no_grad():
        first = attn.position_bias()
        assert attn.position_bias() is first
        attn.cpb_mlp[2].weight.add_(0.1)
        second = attn.position_bias()
    assert second is not first and not torch.equal(first, second)
    attn.train()
    assert attn.position_bias().requires_grad


def test_param_groups_layer_decay_matches_official_ids():
    with torch.device("meta"):
        model = create_model("base", img_size=192, window_size=12)
    groups = param_groups(
        model, 0.05, layer_decay=0.75, no_decay_names=model.no_weight_decay(),
        no_decay_keywords=model.no_weight_decay_keywords(),
    )  # fmt: skip
    assert len(groups) == 52  # spec §3.9 for SwinV2-B
    by_id = {(g["layer_id"], g["weight_decay"] > 0): g for g in groups}
    assert math.isclose(by_id[(0, True)]["lr_scale"], 0.75**25)  # patch_embed.proj.weight
    assert math.isclose(by_id[(1, True)]["lr_scale"], 0.75**24)
    assert math.isclose(by_id[(25, True)]["lr_scale"], 1.0)  # head.weight
    assert all("lr" not in g for g in groups)  # the scale is stored once, never pre-multiplied
    names = {id(p): n for n, p in model.named_parameters()}

    def ids_of(name):
        return [g["layer_id"] for g in groups for p in g["params"] if names[id(p)] == name]

    assert ids_of("layers.0.downsample.reduction.weight") == [2]
    assert ids_of("layers.2.blocks.17.mlp.fc1.weight") == [22]
    assert ids_of("layers.3.blocks.1.attn.qkv.weight") == [24]
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "layers.0.blocks.0.attn.cpb_mlp.0.weight" in no_decay and "layers.0.blocks.0.attn.logit_scale" in no_decay
    assert "layers.0.blocks.0.attn.qkv.weight" not in no_decay


def test_param_groups_with_prefixed_backbone():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = _small(num_classes=0)
            self.decoder = torch.nn.Conv2d(256, 48, 1)

    model = Wrapper()
    groups = param_groups(model, 0.05, layer_decay=0.5, no_decay_keywords=("cpb_mlp",))
    names = {id(p): n for n, p in model.named_parameters()}
    layer = {names[id(p)]: g["layer_id"] for g in groups for p in g["params"]}
    assert layer["encoder.patch_embed.proj.weight"] == 0
    assert layer["encoder.layers.1.blocks.0.mlp.fc1.weight"] == 3
    assert layer["decoder.weight"] == 9
    decay = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert decay["encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight"] == 0.0
    flat = param_groups(model, 0.05)
    assert len(flat) == 2 and all(g["lr_scale"] == 1.0 and "layer_id" not in g for g in flat)


@pytest.mark.slow
def test_builds_under_deepspeed_zero_init_with_official_init(tmp_path):
    """zero.Init partitions each module's parameters after its own __init__: the init must happen there.

    Then a real ZeRO-3 engine trains the model for a few steps (one process, gloo).
    """
    script = textwrap.dedent(
        """
        import math, os, torch, deepspeed
        deepspeed.init_distributed(dist_backend="gloo")
        from swinv2 import create_model
        cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = create_model("tiny", img_size=64, window_size=4)
        blk = model.layers[0].blocks[1]
        assert blk.attn.relative_position_index.dtype == torch.int64
        assert blk.attn.relative_coords_table.dtype == torch.float32
        assert blk.attn.qkv.weight.numel() == 0  # partitioned away from the module
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            assert blk.attn.qkv.weight.dtype == torch.bfloat16
            assert torch.count_nonzero(blk.norm1.weight) == 0
            assert abs(blk.attn.qkv.weight.float().std().item() - 0.02) < 0.003
            assert torch.allclose(blk.attn.logit_scale.float(), torch.tensor(math.log(10.0)), atol=0.01)
            assert torch.equal(model.norm.weight.float(), torch.ones(768))
        # A real ZeRO-3 engine (partitioned parameters gathered around module forwards) trains the model.
        fp32 = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
                "zero_allow_untested_optimizer": True}
        with deepspeed.zero.Init(config_dict_or_path=fp32):
            small = create_model("tiny", img_size=64, window_size=4, num_classes=10, embed_dim=32,
                                 num_heads=(1, 2, 4, 8))
        engine, *_ = deepspeed.initialize(
            model=small, optimizer=torch.optim.AdamW(small.parameters(), lr=1e-3), config=fp32
        )
        x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
        losses = []
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], losses
        print("ZERO_INIT_OK")
        """
    )
    with socket.socket() as sock:  # a free port: other test processes may run rendezvous at the same time
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert "ZERO_INIT_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_set_input_size_resizes_absolute_position_embedding():
    model = _small(ape=True)
    assert model.absolute_pos_embed.shape == (1, 256, 32)
    model.set_input_size(img_size=128)
    assert model.absolute_pos_embed.shape == (1, 1024, 32)
    assert model.layers[3].input_resolution == (4, 4) and model.layers[3].blocks[0].window_size == (4, 4)
    assert model(torch.randn(1, 3, 128, 128)).shape == (1, 1000)
    names = {n for n, _ in model.named_parameters()}
    assert "absolute_pos_embed" in names and model.no_weight_decay() == {"absolute_pos_embed"}
