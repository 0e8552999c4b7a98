"""SimMIM model: mask-token replacement, decoder geometry, loss against a hand computation, decay groups."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pretrain.config import PretrainConfig, load_config
from pretrain.masking import MaskGenerator
from pretrain.simmim import SimMIM, build_simmim, normalized_target, simmim_param_groups
from tests.helpers.tiny import TINY_MODEL

TINY = [*TINY_MODEL, "model.drop_path_rate=0.0"]


def tiny_cfg(*extra: str) -> PretrainConfig:
    return load_config(None, [*TINY, *extra])


def masks(cfg: PretrainConfig, batch: int, seed: int = 0) -> torch.Tensor:
    gen = MaskGenerator(cfg.model.img_size, cfg.simmim.mask_patch_size, cfg.model.patch_size, cfg.simmim.mask_ratio)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([gen(rng) for _ in range(batch)]))


def test_state_dict_keys_and_shapes() -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_simmim(cfg)
    keys = set(model.state_dict())
    assert {"encoder.mask_token", "decoder.0.weight", "decoder.0.bias", "encoder.patch_embed.proj.weight"} <= keys
    assert not any(k.startswith("encoder.head.") for k in keys)  # num_classes=0: no classification head
    assert model.encoder.mask_token.shape == (1, 1, 16)
    # Final width 16 * 8 = 128 -> stride^2 * 3 = 32 * 32 * 3 channels.
    assert model.decoder[0].weight.shape == (3072, 128, 1, 1)
    images = torch.randn(2, 3, 64, 64)
    loss, rec = model.reconstruct(images, masks(cfg, 2))
    assert rec.shape == images.shape and loss.ndim == 0 and torch.isfinite(loss)


def test_mask_token_replaces_only_masked_tokens() -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg()
    encoder = build_simmim(cfg).encoder
    images = torch.randn(2, 3, 64, 64)
    mask = masks(cfg, 2)
    seen: list[torch.Tensor] = []
    original = encoder.forward_tokens
    encoder.forward_tokens = lambda tokens: (seen.append(tokens.detach().clone()), original(tokens))[1]  # type: ignore[method-assign]
    encoder(images, mask)
    embedded = encoder.embed(images).detach()
    flat = mask.flatten(1).bool()
    replaced = seen[0]
    assert torch.equal(replaced[~flat], embedded[~flat])
    assert torch.equal(replaced[flat], encoder.mask_token.detach().expand(int(flat.sum()), -1, -1)[:, 0])
    assert 0 < int(flat.sum()) < flat.numel()


def test_masked_pixels_only_drive_the_loss() -> None:
    torch.manual_seed(0)
    model = build_simmim(tiny_cfg("simmim.norm_target=false"))
    images = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 16, 16, dtype=torch.uint8)
    mask[0, :8, :8] = 1  # top-left 32 x 32 pixels
    base = model(images, mask)
    changed = images.clone()
    changed[..., 40:, 40:] += 5.0  # unmasked pixels: the target there must not matter ...
    model.encoder.forward = lambda x, m, f=model.encoder.forward: f(images, m)  # ... with the encoder input fixed
    assert torch.equal(model(changed, mask), base)
    changed[..., :4, :4] += 5.0  # a masked pixel
    assert not torch.equal(model(changed, mask), base)


def test_loss_equals_hand_computation() -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg("simmim.norm_target=false")
    model = build_simmim(cfg)
    images = torch.randn(2, 3, 64, 64)
    mask = masks(cfg, 2, seed=3)
    loss, rec = model.reconstruct(images, mask)
    total, count = 0.0, 0
    for b in range(2):
        for ty in range(16):
            for tx in range(16):
                if mask[b, ty, tx]:
                    # Each masked token covers a 4 x 4 pixel block, all channels.
                    diff = (
                        rec[b, :, 4 * ty : 4 * ty + 4, 4 * tx : 4 * tx + 4]
                        - images[b, :, 4 * ty : 4 * ty + 4, 4 * tx : 4 * tx + 4]
                    )
                    total += diff.abs().sum().item()
                    count += 16
    expected = total / (count + 1e-5) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_normalized_target_by_hand() -> None:
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    out = normalized_target(x, patch_size=5)
    for c, y, xx in [(0, 0, 0), (1, 4, 4), (0, 8, 3), (1, 2, 7)]:
        window = x[0, c, max(0, y - 2) : y + 3, max(0, xx - 2) : xx + 3].numpy().ravel()
        expected = (x[0, c, y, xx].item() - window.mean()) / math.sqrt(window.var(ddof=1) + 1e-6)
        assert out[0, c, y, xx].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    with pytest.raises(ValueError, match="odd"):
        normalized_target(x, patch_size=4)


@pytest.mark.parametrize("patch_size", [47, 7])
def test_normalized_target_equals_direct_pooling(patch_size: int) -> None:
    # The official formulation: k x k average pools without padding in the count (what our separable sums replace).
    x = torch.randn(2, 3, 40, 52, dtype=torch.float64)
    pad = patch_size // 2
    mean = torch.nn.functional.avg_pool2d(x, patch_size, 1, pad, count_include_pad=False)
    mean_sq = torch.nn.functional.avg_pool2d(x * x, patch_size, 1, pad, count_include_pad=False)
    ones = torch.ones_like(x[:, :1])
    count = torch.nn.functional.avg_pool2d(ones, patch_size, 1, pad, count_include_pad=True) * patch_size**2
    var = ((mean_sq - mean**2) * count / (count - 1)).clamp(min=0)
    expected = (x - mean) / (var + 1e-6).sqrt()
    assert torch.allclose(normalized_target(x, patch_size), expected, rtol=0, atol=1e-10)
    assert normalized_target(x.float(), patch_size).dtype == torch.float32


def test_norm_target_is_used_when_enabled() -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg("simmim.norm_target_patch_size=7")
    model = build_simmim(cfg)
    images = torch.randn(2, 3, 64, 64)
    mask = masks(cfg, 2)
    loss, rec = model.reconstruct(images, mask)
    pixel = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()
    target = normalized_target(images, 7)
    expected = ((rec - target).abs() * pixel).sum() / (pixel.sum() + 1e-5) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    model.norm_target = False
    assert model(images, mask).item() != pytest.approx(loss.item(), rel=1e-3)


def test_gradients_reach_mask_token_and_decoder() -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_simmim(cfg)
    model(torch.randn(2, 3, 64, 64), masks(cfg, 2)).backward()
    assert model.encoder.mask_token.grad is not None and model.encoder.mask_token.grad.abs().sum() > 0
    assert model.decoder[0].weight.grad.abs().sum() > 0


def test_other_image_size_and_bad_mask() -> None:
    cfg = tiny_cfg("model.img_size=96", "model.window_size=6")
    model = build_simmim(cfg)
    loss = model(torch.randn(1, 3, 96, 96), masks(cfg, 1))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="mask of shape"):
        model(torch.randn(1, 3, 96, 96), torch.zeros(1, 16, 16))


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large", "huge", "giant"])
def test_every_size_builds_on_meta(size: str) -> None:
    cfg = load_config(f"configs/simmim_swinv2_{size}_192_w12.yaml", [])
    with torch.device("meta"):
        model = build_simmim(cfg)
    assert isinstance(model, SimMIM)
    assert model.decoder[0].out_channels == 32 * 32 * 3
    assert model.decoder[0].in_channels == model.encoder.num_features


def _decayed_names(model: SimMIM, groups: list[dict]) -> tuple[set[str], set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    return decay, no_decay


def test_decay_groups_official_counts_and_option() -> None:
    cfg = load_config("configs/simmim_swinv2_base_192_w12.yaml", ["simmim.decay_position_bias=true"])
    with torch.device("meta"):
        model = build_simmim(cfg)
    decay, no_decay = _decayed_names(model, simmim_param_groups(model, cfg))
    # Official SimMIM SwinV2-B (spec 3.6): 173 decayed tensors, 253 not; cpb_mlp weights and logit_scale decayed.
    assert (len(decay), len(no_decay)) == (173, 253)
    assert "encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight" in decay
    assert "encoder.layers.0.blocks.0.attn.logit_scale" in decay
    assert {"encoder.mask_token", "decoder.0.bias", "encoder.layers.0.blocks.0.attn.cpb_mlp.0.bias"} <= no_decay
    assert "decoder.0.weight" in decay

    cfg.simmim.decay_position_bias = False
    decay2, no_decay2 = _decayed_names(model, simmim_param_groups(model, cfg))
    moved = decay - decay2
    assert moved and all("cpb_mlp" in n or "logit_scale" in n for n in moved)
    assert not any("cpb_mlp" in n or "logit_scale" in n for n in decay2)
    assert len(decay2) + len(no_decay2) == 426
    assert {g["weight_decay"] for g in simmim_param_groups(model, cfg)} == {0.0, cfg.optimizer.weight_decay}
