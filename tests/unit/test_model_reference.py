"""SwinTransformerV2 against timm's implementation (same weights through the official<->timm key mapping)."""

from __future__ import annotations

import pytest
import torch

from swinv2 import create_model, official_to_timm, strip_derived_buffers, timm_to_official

timm_v2 = pytest.importorskip("timm.models.swin_transformer_v2")

TINY = {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)}


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere: at the official init post-norms are zero and every block is an identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" in name:
                # Half the heads above ln(100), so the clamp is exercised.
                p.copy_(torch.rand(p.shape, generator=gen) * 5.0 + 0.5)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if name.endswith("norm1.weight") else 0.0))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _pair(img: int, window: int, pretrained: tuple[int, ...], attn_impl: str):
    ours = create_model(
        "tiny", img_size=img, window_size=window, pretrained_window_sizes=pretrained, attn_impl=attn_impl
    )
    ours.eval()
    _randomize(ours)
    ref = timm_v2.SwinTransformerV2(img_size=img, window_size=window, pretrained_window_sizes=pretrained, **TINY)
    ref.eval()
    ref.load_state_dict(official_to_timm(ours.state_dict()), strict=True)
    return ours, ref


@pytest.mark.parametrize("attn_impl", ["explicit", "sdpa"])
@pytest.mark.parametrize(
    ("img", "window", "pretrained"),
    [(192, 12, (0, 0, 0, 0)), (256, 8, (0, 0, 0, 0)), (256, 16, (12, 12, 12, 6))],
    ids=["192w12", "256w8", "256w16-from-w12"],
)
def test_matches_timm_features_logits_and_gradients(img, window, pretrained, attn_impl):
    ours, ref = _pair(img, window, pretrained, attn_impl)
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(1))

    feats = ours.forward_features(x)
    ref_feats = ref.forward_head(ref.forward_features(x), pre_logits=True)
    assert (feats - ref_feats).abs().max().item() <= 1e-5

    logits = ours(x)
    ref_logits = ref(x)
    assert logits.shape == (2, 1000)
    assert (logits - ref_logits).abs().max().item() <= 1e-5

    # Gradients of a scalar that depends on every logit, compared parameter by parameter (mapped names).
    weights = torch.randn(2, 1000, generator=torch.Generator().manual_seed(2))
    (logits * weights).sum().backward()
    (ref_logits * weights).sum().backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    ref_grads = timm_to_official({n: p.grad for n, p in ref.named_parameters()})
    assert set(ours_grads) == set(ref_grads)
    for name, grad in ours_grads.items():
        scale = max(1.0, ref_grads[name].abs().max().item())
        assert (grad - ref_grads[name]).abs().max().item() <= 1e-5 * scale, name


def test_window_clamp_and_shift_follow_official_rule():
    # 192/w12: stage resolutions 48, 24, 12, 6 -> stage 2 unshifted with window 12, stage 3 window 6 unshifted.
    model = create_model("tiny", img_size=192, window_size=12, num_classes=0)
    windows = [[blk.window_size for blk in layer.blocks] for layer in model.layers]
    shifts = [[blk.shift_size for blk in layer.blocks] for layer in model.layers]
    assert windows[0] == [(12, 12)] * 2 and shifts[0] == [(0, 0), (6, 6)]
    assert windows[2] == [(12, 12)] * 6 and all(s == (0, 0) for s in shifts[2])
    assert windows[3] == [(6, 6)] * 2 and shifts[3] == [(0, 0), (0, 0)]
    assert model.layers[0].blocks[1].attn_mask is not None and model.layers[2].blocks[1].attn_mask is None


def test_official_format_state_dict_loads_strict_after_stripping_buffers():
    # 256/w8 is a released SwinV2-T config: stages 0-2 have shifted blocks, so 3 + 3 + ... attn_mask entries.
    model = create_model("tiny", img_size=256, window_size=8)
    _randomize(model, seed=3)
    # An official checkpoint also carries the derived buffers (persistent there), attn_mask at block level.
    official = dict(model.state_dict())
    official.update({n: b for n, b in model.named_buffers() if not n.endswith(("token_perm", "token_inv_perm"))})
    assert "layers.0.blocks.1.attn_mask" in official
    assert "layers.0.blocks.0.attn.relative_position_index" in official
    assert len(official) == 250  # the official SwinV2-T state dict has 250 entries (spec §2.2)

    fresh = create_model("tiny", img_size=256, window_size=8)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict(official, strict=True)
    fresh.load_state_dict(strip_derived_buffers(official), strict=True)
    x = torch.randn(1, 3, 256, 256)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))

    # Round trip through timm's layout is lossless and uses the documented renames.
    timm_sd = official_to_timm(official)
    assert "layers.1.downsample.reduction.weight" in timm_sd and "layers.0.downsample.reduction.weight" not in timm_sd
    assert "head.fc.weight" in timm_sd
    back = timm_to_official(timm_sd)
    assert set(back) == set(strip_derived_buffers(official))
    assert all(torch.equal(back[k], official[k]) for k in back)
