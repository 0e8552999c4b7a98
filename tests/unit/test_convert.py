"""Checkpoint conversion between ours, official, timm and HF: round trips, feature equality, bad-input messages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pretrain import convert
from pretrain.formats import META_KEY, ConversionError, detect_layout, load_weights_file
from swinv2 import SwinTransformerV2

timm_v2 = pytest.importorskip("timm.models.swin_transformer_v2")
transformers = pytest.importorskip("transformers")

# Small SwinV2 (head dim 32 like every released size) at the official SimMIM resolution 192/w12.
ARCH = {"embed_dim": 32, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8)}
PRE_IMG, PRE_WIN = 192, 12
TOL = 1e-5


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (at the official init the post-norms are zero and every block is an identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" in name:
                p.copy_(torch.rand(p.shape, generator=gen) * 2.0 + 1.0)
            elif p.ndim == 1 or name.endswith("mask_token"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if "norm" in name else 0.0))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _ours(img: int = PRE_IMG, window: int = PRE_WIN, pretrained=(0, 0, 0, 0), num_classes: int = 0):
    model = SwinTransformerV2(
        img_size=img, window_size=window, pretrained_window_sizes=pretrained, num_classes=num_classes, **ARCH
    )
    return model.eval()


def _simmim_state(model: SwinTransformerV2, seed: int = 0) -> dict[str, torch.Tensor]:
    """The SimMIM layout (official keys): encoder.* + encoder.mask_token + decoder.0.* (stride 32 -> 32*32*3)."""
    gen = torch.Generator().manual_seed(seed + 1)
    state = {"encoder." + k: v for k, v in model.state_dict().items()}
    state["encoder.mask_token"] = torch.randn(1, 1, ARCH["embed_dim"], generator=gen) * 0.02
    state["decoder.0.weight"] = torch.randn(32 * 32 * 3, model.num_features, 1, 1, generator=gen) * 0.02
    state["decoder.0.bias"] = torch.randn(32 * 32 * 3, generator=gen) * 0.02
    return state


def _meta(model: SwinTransformerV2, kind: str) -> dict:
    return {
        "kind": kind,
        "model": {
            **{k: list(v) for k, v in ARCH.items() if k != "embed_dim"},
            "embed_dim": ARCH["embed_dim"],
            "img_size": model.img_size[0],
            "window_size": list(model.window_size),
            "pretrained_window_sizes": list(model.pretrained_window_sizes),
            "num_classes": model.num_classes,
        },
        "step": 7,
    }


def _save_ours(path: Path, state: dict, meta: dict) -> Path:
    from pretrain.formats import save_weights_file

    save_weights_file(path, state, meta)
    return path


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    model = _ours()
    _randomize(model)
    path = tmp_path_factory.mktemp("ours") / "backbone.safetensors"
    return _save_ours(path, model.state_dict(), _meta(model, "backbone")), model


@pytest.fixture(scope="module")
def simmim_file(tmp_path_factory):
    model = _ours()
    _randomize(model, seed=3)
    path = tmp_path_factory.mktemp("ours") / "simmim.safetensors"
    return _save_ours(path, _simmim_state(model), _meta(model, "simmim")), model


def _images(img: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, img, img, generator=torch.Generator().manual_seed(11))


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------ round trips
def test_timm_round_trip_and_features(backbone_file, tmp_path):
    path, model = backbone_file
    out = tmp_path / "timm.safetensors"
    assert convert.main(["export", "--to", "timm", str(path), "-o", str(out)]) == 0
    timm_state, _, _ = load_weights_file(out)
    assert detect_layout(timm_state) == "timm"
    ref = timm_v2.SwinTransformerV2(img_size=PRE_IMG, window_size=PRE_WIN, num_classes=0, **ARCH).eval()
    ref.load_state_dict(timm_state, strict=True)
    x = _images(PRE_IMG)
    with torch.no_grad():
        diff = (model.forward_features(x) - ref.forward_head(ref.forward_features(x), pre_logits=True)).abs().max()
    assert diff.item() <= TOL

    back = tmp_path / "back.safetensors"
    assert (
        convert.main(
            ["import", "--from", "timm", str(out), "-o", str(back), "--img-size", "192", "--window-size", "12"]
        )
        == 0
    )
    restored, meta, _ = load_weights_file(back)
    _assert_same_tensors(restored, model.state_dict())
    assert meta["model"]["img_size"] == PRE_IMG and meta["model"]["window_size"] == [12, 12, 12, 12]


def test_hf_round_trip_and_features(backbone_file, tmp_path):
    path, model = backbone_file
    out = tmp_path / "hf"
    assert convert.main(["export", "--to", "hf", str(path), "-o", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Swinv2Model"] and config["window_size"] == PRE_WIN
    ref = transformers.Swinv2Model.from_pretrained(out).eval()
    x = _images(PRE_IMG)
    with torch.no_grad():
        # HF adds the shift mask twice (spec §4.4); with these typical weights that changes nothing measurable.
        diff = (model.forward_features(x) - ref(pixel_values=x).pooler_output).abs().max()
    assert diff.item() <= TOL

    back = tmp_path / "back.safetensors"
    assert convert.main(["import", "--from", "hf", str(out), "-o", str(back)]) == 0
    restored, meta, _ = load_weights_file(back)
    _assert_same_tensors(restored, model.state_dict())
    assert meta["model"]["img_size"] == PRE_IMG

    # A sharded save_pretrained directory imports the same.
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert convert.main(["import", "--from", "hf", str(tmp_path / "sharded"), "-o", str(tmp_path / "s.pth")]) == 0
    _assert_same_tensors(load_weights_file(tmp_path / "s.pth")[0], model.state_dict())


def test_hf_masked_image_modeling_export(simmim_file, tmp_path):
    path, model = simmim_file
    out = tmp_path / "hf-mim"
    assert convert.main(["export", "--to", "hf", str(path), "-o", str(out)]) == 0
    ref = transformers.Swinv2ForMaskedImageModeling.from_pretrained(out).eval()
    source, _, _ = load_weights_file(path)
    assert torch.equal(ref.swinv2.embeddings.mask_token.detach(), source["encoder.mask_token"])
    assert torch.equal(ref.decoder[0].weight.detach(), source["decoder.0.weight"])
    x = _images(PRE_IMG)
    side = PRE_IMG // 4
    mask = torch.rand(2, side * side, generator=torch.Generator().manual_seed(5)) < 0.6
    with torch.no_grad():
        # Reference SimMIM forward from the official recipe: masked tokens replaced by the mask token, encoder,
        # tokens back to a map, 1x1 conv + pixel shuffle by the encoder stride.
        tokens = model.embed(x)
        w = mask.unsqueeze(-1).float()
        tokens = tokens * (1 - w) + source["encoder.mask_token"] * w
        z = model.forward_tokens(tokens)
        z = z.transpose(1, 2).reshape(2, model.num_features, side // 8, side // 8)
        expected = torch.nn.functional.pixel_shuffle(
            torch.nn.functional.conv2d(z, source["decoder.0.weight"], source["decoder.0.bias"]), 32
        )
        got = ref(pixel_values=x, bool_masked_pos=mask).reconstruction
    assert (got - expected).abs().max().item() <= TOL

    back = tmp_path / "back.safetensors"
    assert convert.main(["import", "--from", "hf", str(out), "-o", str(back)]) == 0
    restored, meta, _ = load_weights_file(back)
    _assert_same_tensors(restored, source)
    assert meta["kind"] == "simmim"


def test_official_round_trip_keeps_buffers(simmim_file, tmp_path):
    path, _ = simmim_file
    out = tmp_path / "official.pth"
    assert convert.main(["export", "--to", "official", str(path), "-o", str(out)]) == 0
    raw = torch.load(out, map_location="cpu", weights_only=True)
    official = raw["model"]
    # Official SimMIM layout: every block's coords table and index, attn_mask on shifted blocks only.
    assert official["encoder.layers.0.blocks.0.attn.relative_position_index"].dtype == torch.int64
    assert "encoder.layers.1.blocks.1.attn_mask" in official  # 24x24 stage, window 12: shifted
    assert "encoder.layers.2.blocks.1.attn_mask" not in official  # 12x12 stage: window clamped, no shift
    assert "encoder.layers.0.blocks.0.attn_mask" not in official  # even block: no shift
    assert "encoder.layers.3.blocks.0.attn.relative_coords_table" in official

    back = tmp_path / "back.safetensors"
    assert convert.main(["import", "--from", "official", str(out), "-o", str(back)]) == 0
    restored, meta, _ = load_weights_file(back)
    source, _, _ = load_weights_file(path)
    _assert_same_tensors(restored, source)
    # Image and (clamped) window sizes read back from the official buffers.
    assert meta["model"]["img_size"] == PRE_IMG and meta["model"]["window_size"] == [12, 12, 12, 6]
    # The clamped per-stage windows are one HF window_size.
    assert convert.main(["export", "--to", "hf", str(back), "-o", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["window_size"] == 12


def test_classifier_round_trips_keep_logits(tmp_path):
    """A model with a head: timm head.fc, HF classifier, official head; logits equal, tensors identical back."""
    model = _ours(num_classes=5)
    _randomize(model, seed=9)
    path = _save_ours(tmp_path / "clf.safetensors", model.state_dict(), _meta(model, "backbone"))
    x = _images(PRE_IMG, n=1)
    with torch.no_grad():
        expected = model(x)

    assert convert.main(["export", "--to", "timm", str(path), "-o", str(tmp_path / "t.pth")]) == 0
    ref = timm_v2.SwinTransformerV2(img_size=PRE_IMG, window_size=PRE_WIN, num_classes=5, **ARCH).eval()
    ref.load_state_dict(torch.load(tmp_path / "t.pth", weights_only=True), strict=True)
    assert convert.main(["export", "--to", "hf", str(path), "-o", str(tmp_path / "hf")]) == 0
    hf = transformers.Swinv2ForImageClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (ref(x) - expected).abs().max().item() <= TOL
        assert (hf(pixel_values=x).logits - expected).abs().max().item() <= TOL

    for source, src_path in (("timm", tmp_path / "t.pth"), ("hf", tmp_path / "hf")):
        back = tmp_path / f"{source}.safetensors"
        extra = ["--img-size", "192", "--window-size", "12"] if source == "timm" else []
        assert convert.main(["import", "--from", source, str(src_path), "-o", str(back), *extra]) == 0
        _assert_same_tensors(load_weights_file(back)[0], model.state_dict())

    assert convert.main(["export", "--to", "official", str(path), "-o", str(tmp_path / "o.pth")]) == 0
    official = torch.load(tmp_path / "o.pth", weights_only=True)["model"]
    # The official model (buffers persistent) would load it strictly: same keys as ours plus the buffers.
    assert set(official) == set(model.state_dict()) | {
        name
        for name, _ in model.named_buffers()
        if name.rsplit(".", 1)[-1] in ("relative_coords_table", "relative_position_index", "attn_mask")
    }
    assert convert.main(["import", "--from", "official", str(tmp_path / "o.pth"), "-o", str(tmp_path / "b.pth")]) == 0
    _assert_same_tensors(load_weights_file(tmp_path / "b.pth")[0], model.state_dict())


# --------------------------------------------------------------------------------------------- fine-tune path
@pytest.fixture(scope="module")
def official_simmim_file(simmim_file, tmp_path_factory):
    """An official SimMIM training checkpoint: buffers, legacy rpe_mlp names, no metadata, a non-tensor config."""
    path, model = simmim_file
    out = tmp_path_factory.mktemp("official") / "simmim_official.pth"
    assert convert.main(["export", "--to", "official", str(path), "-o", str(out)]) == 0
    state = torch.load(out, map_location="cpu", weights_only=True)["model"]
    state = {k.replace("cpb_mlp", "rpe_mlp"): v for k, v in state.items()}
    torch.save({"model": state, "epoch": 99, "config": {"MODEL": {"TYPE": "swinv2"}}}, out)
    return out, model


def test_backbone_from_official_simmim_loads_at_224_w14(official_simmim_file, tmp_path):
    path, model = official_simmim_file
    out = tmp_path / "backbone.safetensors"
    assert convert.main(["backbone", str(path), "-o", str(out), "--img-size", "224", "--window-size", "14"]) == 0
    state, meta, _ = load_weights_file(out)
    assert meta["model"]["pretrained_window_sizes"] == [12, 12, 12, 6]
    assert not any(k.startswith(("encoder.", "decoder.")) or "mask_token" in k or "rpe_mlp" in k for k in state)
    clf = _ours(224, 14, pretrained=meta["model"]["pretrained_window_sizes"], num_classes=10)
    result = clf.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    assert torch.equal(clf.layers[2].blocks[1].attn.cpb_mlp[0].weight, model.layers[2].blocks[1].attn.cpb_mlp[0].weight)


def test_fine_tune_resolution_matches_timm_and_hf(simmim_file, tmp_path):
    """192/w12 SimMIM -> backbone at 256/w16 with pretrained windows [12,12,12,6]; timm and HF agree with ours."""
    path, _ = simmim_file
    backbone = tmp_path / "b256.safetensors"
    assert convert.main(["backbone", str(path), "-o", str(backbone), "--img-size", "256", "--window-size", "16"]) == 0
    state, meta, _ = load_weights_file(backbone)
    pretrained = meta["model"]["pretrained_window_sizes"]
    assert pretrained == [12, 12, 12, 6]
    ours = _ours(256, 16, pretrained=pretrained)
    ours.load_state_dict(state, strict=True)
    x = _images(256, n=1)
    with torch.no_grad():
        expected = ours.forward_features(x)

    assert convert.main(["export", "--to", "timm", str(backbone), "-o", str(tmp_path / "t.safetensors")]) == 0
    ref = timm_v2.SwinTransformerV2(
        img_size=256, window_size=16, pretrained_window_sizes=pretrained, num_classes=0, **ARCH
    )
    ref.eval().load_state_dict(load_weights_file(tmp_path / "t.safetensors")[0], strict=True)
    assert convert.main(["export", "--to", "hf", str(backbone), "-o", str(tmp_path / "hf")]) == 0
    hf = transformers.Swinv2Model.from_pretrained(tmp_path / "hf").eval()
    assert list(hf.config.pretrained_window_sizes) == pretrained
    with torch.no_grad():
        assert (ref.forward_head(ref.forward_features(x), pre_logits=True) - expected).abs().max().item() <= TOL
        assert (hf(pixel_values=x).pooler_output - expected).abs().max().item() <= TOL
    # Without the recorded pretrained windows the position bias differs: the check above is not vacuous.
    plain = _ours(256, 16)
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        bias, plain_bias = ours.layers[0].blocks[0].attn.position_bias(), plain.layers[0].blocks[0].attn.position_bias()
        assert (bias - plain_bias).abs().max().item() > 1e-2


# ------------------------------------------------------------------------------------------------ bad inputs
def _error(capsys, argv: list[str]) -> str:
    assert convert.main(argv) == 2
    return capsys.readouterr().err


def test_wrong_format_is_named(backbone_file, simmim_file, tmp_path, capsys):
    path, _ = backbone_file
    timm_file = tmp_path / "timm.safetensors"
    assert convert.main(["export", "--to", "timm", str(path), "-o", str(timm_file)]) == 0
    capsys.readouterr()
    err = _error(capsys, ["export", "--to", "hf", str(timm_file), "-o", str(tmp_path / "x")])
    assert "this is a timm state dict: use `import --from timm`" in err
    err = _error(capsys, ["import", "--from", "official", str(timm_file), "-o", str(tmp_path / "y.safetensors")])
    assert "--from official given, but this is a timm state dict" in err
    err = _error(capsys, ["backbone", str(path), "-o", str(tmp_path / "z.safetensors")])
    assert "already a backbone" in err
    err = _error(capsys, ["import", "--from", "timm", str(path), "-o", str(tmp_path / "w.safetensors")])
    assert "this is a SwinV2 backbone/classifier in the official layout" in err
    hf_dir = tmp_path / "hf"
    assert convert.main(["export", "--to", "hf", str(path), "-o", str(hf_dir)]) == 0
    capsys.readouterr()
    err = _error(capsys, ["export", "--to", "timm", str(hf_dir), "-o", str(tmp_path / "v.safetensors")])
    assert "HF model directory: use `import --from hf`" in err
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary outputs left behind"


def test_existing_output_needs_force(backbone_file, tmp_path, capsys):
    path, _ = backbone_file
    out = tmp_path / "t.safetensors"
    out.write_bytes(b"precious")
    err = _error(capsys, ["export", "--to", "timm", str(path), "-o", str(out)])
    assert f"{out} exists; pass --force" in err
    assert out.read_bytes() == b"precious"
    assert convert.main(["export", "--to", "timm", str(path), "-o", str(out), "--force"]) == 0
    assert detect_layout(load_weights_file(out)[0]) == "timm"
    err = _error(capsys, ["export", "--to", "timm", str(path), "-o", str(tmp_path / "weights.npz")])
    assert "output suffix '.npz' not understood; accepted: .safetensors, .pth" in err


def test_shape_mismatch_and_missing_keys_are_listed(backbone_file, tmp_path, capsys):
    path, _ = backbone_file
    state, meta, _ = load_weights_file(path)
    state = dict(state)
    del state["layers.1.blocks.0.mlp.fc2.bias"]
    state["norm.weight"] = torch.ones(7)
    meta["model"]["embed_dim"] = 32
    bad = _save_ours(tmp_path / "bad.safetensors", state, meta)
    simmim = {"encoder." + k: v for k, v in state.items()} | {"decoder.0.weight": torch.zeros(3072, 256, 1, 1)}
    bad_simmim = _save_ours(tmp_path / "bad_simmim.safetensors", simmim, meta)
    err = _error(capsys, ["backbone", str(bad_simmim), "-o", str(tmp_path / "o.safetensors")])
    assert "missing keys (1): layers.1.blocks.0.mlp.fc2.bias" in err
    assert "norm.weight: file (7,) vs model (256,)" in err
    assert "Traceback" not in err
    err = _error(capsys, ["import", "--from", "timm", str(bad), "-o", str(tmp_path / "p.safetensors")])
    assert "official layout" in err


def test_unknown_sizes_and_untrusted_pickle(backbone_file, official_simmim_file, tmp_path, capsys):
    path, _ = backbone_file
    timm_file = tmp_path / "timm.pth"
    assert convert.main(["export", "--to", "timm", str(path), "-o", str(timm_file)]) == 0
    plain = tmp_path / "plain.safetensors"
    assert convert.main(["import", "--from", "timm", str(timm_file), "-o", str(plain)]) == 0
    capsys.readouterr()
    err = _error(capsys, ["export", "--to", "hf", str(plain), "-o", str(tmp_path / "hf")])
    assert "needs the model's img_size and window_size" in err and "--img-size and --window-size" in err
    assert (
        convert.main(
            ["export", "--to", "hf", str(plain), "-o", str(tmp_path / "hf"), "--img-size", "192", "--window-size", "12"]
        )
        == 0
    )

    official, _ = official_simmim_file
    torch.save({"model": load_weights_file(official)[0], "config": _NotATensor()}, tmp_path / "pickled.pth")
    capsys.readouterr()
    err = _error(capsys, ["backbone", str(tmp_path / "pickled.pth"), "-o", str(tmp_path / "b.safetensors")])
    assert "--trust-pickle" in err
    assert "--trust-pickle" in _error(capsys, ["inspect", str(tmp_path / "pickled.pth")])
    assert convert.main(["inspect", str(tmp_path / "pickled.pth"), "--trust-pickle"]) == 0
    assert "other entries: ['config']" in capsys.readouterr().out
    err = _error(
        capsys, ["export", "--to", "timm", str(path), "-o", str(tmp_path / "x.safetensors"), "--window-size", "12", "5"]
    )
    assert "one value or one per stage (4 stages)" in err


def test_models_without_a_counterpart_are_refused(tmp_path, capsys):
    """SwinV2-H/G style extra norms exist only here: timm, HF and official exports say so instead of dropping them."""
    model = SwinTransformerV2(img_size=PRE_IMG, window_size=PRE_WIN, num_classes=0, extra_norm_every=1, **ARCH)
    meta = _meta(model, "backbone")
    meta["model"]["extra_norm_every"] = 1
    path = _save_ours(tmp_path / "h.safetensors", model.state_dict(), meta)
    for target, name in (("timm", "t.safetensors"), ("hf", "hf"), ("official", "o.pth")):
        err = _error(capsys, ["export", "--to", target, str(path), "-o", str(tmp_path / name)])
        assert "extra_norm_every=1" in err, target
    # Without metadata the extra norms are found from the keys.
    from pretrain.formats import infer_spec

    assert infer_spec(model.state_dict()).extra_norm_every == 1


class _NotATensor:
    """A pickled Python object like the official yacs config."""


def test_inspect_reads_headers(simmim_file, official_simmim_file, capsys):
    path, _ = simmim_file
    assert convert.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layout: simmim" in out and "header read only" in out and "step: 7" in out
    assert "window_size=[12, 12, 12, 12]" in out
    official, _ = official_simmim_file
    assert convert.main(["inspect", str(official)]) == 0
    out = capsys.readouterr().out
    assert "layout: simmim" in out and "metadata: none" in out and "other entries: ['config', 'epoch']" in out


def test_meta_key_stored_in_pth(backbone_file, tmp_path):
    path, model = backbone_file
    out = tmp_path / "o.pth"
    assert convert.main(["import", "--from", "official", str(path), "-o", str(out)]) == 0
    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert set(raw) == {"model", META_KEY}
    _assert_same_tensors(raw["model"], model.state_dict())


def test_conversion_error_is_value_error():
    assert issubclass(ConversionError, ValueError)


def test_command_line_entry_point(backbone_file, tmp_path):
    """`python -m pretrain.convert` runs the same main: results on stdout, one error line and exit 2 on bad input."""
    import subprocess
    import sys

    path, _ = backbone_file
    ok = subprocess.run(
        [sys.executable, "-m", "pretrain.convert", "inspect", str(path)], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "layout: ours" in ok.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.convert",
            "export",
            "--to",
            "timm",
            str(tmp_path / "nope.pth"),
            "-o",
            str(tmp_path / "x.pth"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "error: " in bad.stderr and "no such file" in bad.stderr
    assert "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------------- pretrained window sizes
def _official_file(path: Path, model: SwinTransformerV2, extra: dict | None = None) -> Path:
    """An official classification checkpoint: persistent derived buffers, no metadata, ``{"model": ...}``."""
    from pretrain.formats import official_buffers

    torch.save({"model": {**model.state_dict(), **official_buffers(model), **(extra or {})}}, path)
    return path


@pytest.fixture(scope="module")
def official_256_file(tmp_path_factory):
    """An official 256/w16 model fine-tuned from 192/w12: pretrained_window_sizes [12, 12, 12, 6]."""
    model = _ours(256, 16, pretrained=(12, 12, 12, 6))
    _randomize(model, seed=21)
    return _official_file(tmp_path_factory.mktemp("official256") / "swinv2_256_w16.pth", model), model


def test_import_official_reads_pretrained_windows_from_buffers(official_256_file, tmp_path, capsys):
    """The audit case: official 256/w16 from [12,12,12,6] -> ours -> HF gives the model's features, not a default
    position bias."""
    path, model = official_256_file
    ours = tmp_path / "ours.safetensors"
    assert convert.main(["import", "--from", "official", str(path), "-o", str(ours)]) == 0
    meta = load_weights_file(ours)[1]["model"]
    assert meta["pretrained_window_sizes"] == [12, 12, 12, 6]
    assert meta["img_size"] == 256 and meta["window_size"] == [16, 16, 16, 8]
    assert convert.main(["export", "--to", "hf", str(ours), "-o", str(tmp_path / "hf")]) == 0
    hf = transformers.Swinv2Model.from_pretrained(tmp_path / "hf").eval()
    assert list(hf.config.pretrained_window_sizes) == [12, 12, 12, 6] and hf.config.window_size == 16
    x = _images(256, n=1)
    with torch.no_grad():
        assert (hf(pixel_values=x).pooler_output - model.forward_features(x)).abs().max().item() <= TOL

    # A flag that agrees with the buffers is accepted (the stage's own window is the same table as 0) ...
    same = tmp_path / "same.safetensors"
    argv = ["import", "--from", "official", str(path), "-o", str(same), "--pretrained-window-sizes", "12", "12", "12"]
    assert convert.main([*argv, "6"]) == 0
    assert load_weights_file(same)[1]["model"]["pretrained_window_sizes"] == [12, 12, 12, 6]
    # ... one that contradicts them is refused, naming what the buffers say.
    capsys.readouterr()
    bad = tmp_path / "bad.safetensors"
    err = _error(capsys, ["import", "--from", "official", str(path), "-o", str(bad), "--pretrained-window-sizes", "0"])
    assert "--pretrained-window-sizes [0, 0, 0, 0] contradicts the relative_coords_table buffers" in err
    assert "built with pretrained_window_sizes [12, 12, 12, 6]" in err and "stages [0, 1, 2, 3] differ" in err
    assert not bad.exists()
    err = _error(capsys, ["import", "--from", "official", str(path), "-o", str(bad), "--pretrained-window-sizes", "8"])
    assert "stages [0, 1, 2, 3] differ" in err
    err = _error(
        capsys, ["import", "--from", "official", str(path), "-o", str(bad), "--pretrained-window-sizes", "12", "6"]
    )
    assert "--pretrained-window-sizes [12, 6]: give one value or one per stage (4 stages)" in err
    err = _error(capsys, ["import", "--from", "official", str(path), "-o", str(bad), "--pretrained-window-sizes", "1"])
    assert "accepted per stage: 0 (the stage's own window) or a window of at least 2" in err


def test_pretrained_window_inference_from_tables():
    from pretrain.formats import pretrained_window_from_table, pretrained_windows_from_tables
    from swinv2.swin_transformer_v2 import relative_coords_table

    for window, pretrained, expected in ((16, 12, 12), (8, 6, 6), (24, 12, 12), (12, 0, 0), (12, 12, 0), (7, 0, 0)):
        table = relative_coords_table((window, window), (pretrained, pretrained))
        assert pretrained_window_from_table(table) == expected
        # Stored in half precision (a converted file) the table is still recognised.
        assert pretrained_window_from_table(table.to(torch.bfloat16)) == expected
    with pytest.raises(ConversionError, match="not the relative_coords_table of a 16x16 window"):
        pretrained_window_from_table(relative_coords_table((16, 16), (12, 12)) * 1.5, "t")
    with pytest.raises(ConversionError, match=r"shape \(1, 4, 4, 2\); a relative_coords_table is"):
        pretrained_window_from_table(torch.zeros(1, 4, 4, 2), "t")
    tables = {
        "layers.0.blocks.0.attn.relative_coords_table": relative_coords_table((8, 8), (6, 6)),
        "layers.0.blocks.1.attn.relative_coords_table": relative_coords_table((8, 8), (0, 0)),
    }
    with pytest.raises(ConversionError, match=r"stage 0: .* disagree .*blocks \[1\]: 0, blocks \[0\]: 6"):
        pretrained_windows_from_tables(tables, [2])
    assert pretrained_windows_from_tables({}, [2]) is None


def test_pretrained_windows_flag_without_buffers(backbone_file, tmp_path, capsys):
    """timm files carry no tables: the flag records the value, a note asks for it when missing; export overrides
    recorded metadata; a window change keeps the normalisation the MLP was trained with."""
    path, model = backbone_file
    timm_file = tmp_path / "timm.safetensors"
    assert convert.main(["export", "--to", "timm", str(path), "-o", str(timm_file)]) == 0
    capsys.readouterr()
    sizes = ["--img-size", "192", "--window-size", "12"]
    plain = tmp_path / "plain.safetensors"
    assert convert.main(["import", "--from", "timm", str(timm_file), "-o", str(plain), *sizes]) == 0
    assert "does not record pretrained_window_sizes" in capsys.readouterr().err
    given = tmp_path / "given.safetensors"
    argv = ["import", "--from", "timm", str(timm_file), "-o", str(given), *sizes, "--pretrained-window-sizes", "12"]
    assert convert.main(argv) == 0
    assert load_weights_file(given)[1]["model"]["pretrained_window_sizes"] == [12, 12, 12, 12]

    # export: the flag replaces what the metadata records, with a note.
    capsys.readouterr()
    out = tmp_path / "hf"
    assert convert.main(["export", "--to", "hf", str(given), "-o", str(out), "--pretrained-window-sizes", "0"]) == 0
    assert "records pretrained_window_sizes [12, 12, 12, 12]; --pretrained-window-sizes [0, 0, 0, 0]" in (
        capsys.readouterr().err
    )
    assert json.loads((out / "config.json").read_text())["pretrained_window_sizes"] == [0, 0, 0, 0]

    # export at a new window: stages whose window changes keep the pretraining normalisation ([12, 12, 12, 6]).
    big = tmp_path / "hf256"
    assert (
        convert.main(["export", "--to", "hf", str(path), "-o", str(big), "--img-size", "256", "--window-size", "16"])
        == 0
    )
    assert "recording pretrained_window_sizes [12, 12, 12, 6]" in capsys.readouterr().err
    hf = transformers.Swinv2Model.from_pretrained(big).eval()
    assert list(hf.config.pretrained_window_sizes) == [12, 12, 12, 6]
    ours = _ours(256, 16, pretrained=(12, 12, 12, 6))
    ours.load_state_dict(model.state_dict(), strict=True)
    x = _images(256, n=1)
    with torch.no_grad():
        assert (hf(pixel_values=x).pooler_output - ours.forward_features(x)).abs().max().item() <= TOL

    # An official file (tables built at w12 with 0 = own window) exported at w16 with the flag 0, which the tables
    # confirm for the old windows: the flag is carried across the window change like a recorded value.
    official = tmp_path / "official.pth"
    assert convert.main(["export", "--to", "official", str(path), "-o", str(official)]) == 0
    big0 = tmp_path / "hf256-flag0"
    argv = ["export", "--to", "hf", str(official), "-o", str(big0), "--img-size", "256", "--window-size", "16"]
    assert convert.main([*argv, "--pretrained-window-sizes", "0"]) == 0
    assert json.loads((big0 / "config.json").read_text())["pretrained_window_sizes"] == [12, 12, 12, 6]


def test_backbone_pretrained_windows_flag(simmim_file, tmp_path, capsys):
    path, _ = simmim_file
    out = tmp_path / "b.safetensors"
    argv = ["backbone", str(path), "-o", str(out), "--img-size", "256", "--window-size", "16"]
    err = _error(capsys, [*argv, "--pretrained-window-sizes", "16", "16", "16", "8"])
    assert "--pretrained-window-sizes [16, 16, 16, 8] contradicts the file: pretraining ran at img_size 192" in err
    assert "trained for windows [12, 12, 12, 6]; stages [0, 1, 2, 3] differ" in err
    assert convert.main([*argv, "--pretrained-window-sizes", "12", "12", "12", "6"]) == 0
    assert load_weights_file(out)[1]["model"]["pretrained_window_sizes"] == [12, 12, 12, 6]

    # A SimMIM file without recorded sizes: the flag stands in for --pretrain-img-size/--pretrain-window-size.
    state, _, _ = load_weights_file(path)
    bare = _save_ours(tmp_path / "bare.safetensors", state, {})
    capsys.readouterr()
    err = _error(capsys, ["backbone", str(bare), "-o", str(tmp_path / "x.safetensors")])
    assert "needs the pretraining img_size and window_size, which the file does not record" in err
    assert "--pretrained-window-sizes" in err
    out2 = tmp_path / "b2.safetensors"
    assert convert.main(["backbone", str(bare), "-o", str(out2), *argv[4:], "--pretrained-window-sizes", "12"]) == 0
    meta = load_weights_file(out2)[1]["model"]
    assert meta["pretrained_window_sizes"] == [12, 12, 12, 12] and meta["img_size"] == 256


# ------------------------------------------------------------------------------------ keys without sizes
def test_keys_checked_without_sizes(backbone_file, tmp_path, capsys):
    """Unknown img/window size no longer skips the key check: names and shapes are checked on a placeholder."""
    path, _ = backbone_file
    timm_file = tmp_path / "timm.pth"
    assert convert.main(["export", "--to", "timm", str(path), "-o", str(timm_file)]) == 0
    timm_state = torch.load(timm_file, weights_only=True)
    extra = tmp_path / "extra.pth"
    torch.save({**timm_state, "foo.bar": torch.zeros(3)}, extra)
    capsys.readouterr()
    out = tmp_path / "out.safetensors"
    err = _error(capsys, ["import", "--from", "timm", str(extra), "-o", str(out)])
    assert "imported weights do not fit our SwinV2: unexpected keys (1): foo.bar" in err
    assert not out.exists()

    broken = dict(timm_state)
    del broken["layers.2.blocks.1.attn.q_bias"]
    broken["layers.1.downsample.reduction.weight"] = torch.zeros(64, 100)  # timm name of official layers.0
    torch.save(broken, tmp_path / "broken.pth")
    err = _error(capsys, ["import", "--from", "timm", str(tmp_path / "broken.pth"), "-o", str(out)])
    assert "missing keys (1): layers.2.blocks.1.attn.q_bias" in err
    assert "layers.0.downsample.reduction.weight: file (64, 100) vs model (64, 128)" in err

    # Our own files without recorded sizes (imported from timm without flags) are checked on export too.
    plain = tmp_path / "plain.safetensors"
    assert convert.main(["import", "--from", "timm", str(timm_file), "-o", str(plain)]) == 0
    state, meta, _ = load_weights_file(plain)
    _save_ours(tmp_path / "plain_extra.safetensors", {**state, "layers.0.blocks.0.attn.foo": torch.zeros(3)}, meta)
    capsys.readouterr()
    err = _error(capsys, ["export", "--to", "timm", str(tmp_path / "plain_extra.safetensors"), "-o", str(out)])
    assert "weights do not match their recorded model: unexpected keys (1): layers.0.blocks.0.attn.foo" in err


def test_simmim_parts_are_checked(official_simmim_file, tmp_path, capsys):
    """Keys outside the encoder (decoder, mask token, strays) of a SimMIM file are checked as well."""
    path, _ = official_simmim_file
    raw = torch.load(path, weights_only=False)
    state = dict(raw["model"])
    state["decoder.0.bias"] = torch.zeros(5)
    state["extra.step"] = torch.zeros(1)
    del state["encoder.mask_token"]
    torch.save({"model": state}, tmp_path / "bad.pth")
    out = tmp_path / "o.safetensors"
    err = _error(capsys, ["import", "--from", "official", str(tmp_path / "bad.pth"), "-o", str(out)])
    assert "missing keys (1): encoder.mask_token" in err and "unexpected keys (1): extra.step" in err
    assert "decoder.0.bias: file (5,) vs model (3072,)" in err


# -------------------------------------------------------------------------------------- atomic replacement
def test_force_on_a_directory_keeps_the_old_one_until_the_new_is_in_place(backbone_file, tmp_path, monkeypatch):
    import os

    from pretrain import atomic

    path, _ = backbone_file
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_replace = os.replace
    seen = []

    def failing_replace(src, dst):
        # The moment the new directory would take the old one's place: the old one must still exist (aside).
        if Path(dst) == out and Path(src).name.endswith(".tmp"):
            aside = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.") and p.name.endswith(".old")]
            seen.append([(p / "hf" / "old.txt").read_text() for p in aside])
            raise OSError("simulated crash while renaming")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        convert.export("hf", path, out, force=True)
    assert seen == [["old"]]
    assert (out / "old.txt").read_text() == "old" and not (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"], "temporary or set-aside copies left behind"

    monkeypatch.setattr(atomic.os, "replace", real_replace)
    convert.export("hf", path, out, force=True)
    assert (out / "config.json").is_file() and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    # A file replaced by a directory (and back) goes the same way.
    target = tmp_path / "t"
    target.write_text("a file")
    convert.export("hf", path, target, force=True)
    assert (target / "config.json").is_file()
    convert.export("timm", path, tmp_path / "t.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "t", "t.safetensors"]


# ----------------------------------------------------------------------------------------------- HF dtype
def test_hf_config_records_dtype_for_old_and_new_transformers(backbone_file, tmp_path):
    path, _ = backbone_file
    assert convert.main(["export", "--to", "hf", str(path), "-o", str(tmp_path / "a"), "--dtype", "bf16"]) == 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    # transformers >= 4.56 reads "dtype", older ones "torch_dtype".
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    hf = transformers.Swinv2Model.from_pretrained(tmp_path / "a", dtype="auto")
    assert hf.embeddings.patch_embeddings.projection.weight.dtype == torch.bfloat16
    assert convert.main(["export", "--to", "hf", str(path), "-o", str(tmp_path / "b")]) == 0
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float32"


# ------------------------------------------------------------------------------ stage-0 fp32 master weights
def test_master_weights_named_by_value_and_order():
    """bf16 module copies and fp32 masters in two interleaved groups, with bf16-equal pairs b/e (across groups, told
    apart by their neighbours) and g/h (in one group, told apart by order)."""
    from pretrain.convert import name_master_weights

    masters = {
        "a": torch.tensor([0.5, 0.25]),
        "b": torch.tensor([2.3000, 1.0]),
        "c": torch.tensor([[1.0, 3.0]]),
        "d": torch.tensor([[5.0, 6.0]]),
        "e": torch.tensor([2.3010, 1.0]),
        "f": torch.tensor([0.125]),
        "g": torch.tensor([4.0]),
        "h": torch.tensor([4.001]),
    }
    module = {k: v.to(torch.bfloat16) for k, v in masters.items()}
    assert torch.equal(module["b"], module["e"]) and torch.equal(module["g"], module["h"])
    layout = [["a", "b", "d"], ["c", "e", "f", "g", "h"]]
    groups = [[masters[k] for k in names] for names in layout]
    named = name_master_weights(module, groups)
    assert sorted(named) == sorted(masters)
    for key, value in masters.items():
        assert named[key] is value, key

    # Tied copies in different groups with nothing around them cannot be placed.
    with pytest.raises(ConversionError, match="cannot tell which fp32 master belongs to which of b, e"):
        name_master_weights({"b": module["b"], "e": module["e"]}, [[masters["e"]], [masters["b"]]], where="x")
    with pytest.raises(ConversionError, match=r"fp32 master #0 of optimizer group 1 \(shape \[1\]\) rounds to none"):
        name_master_weights(module, [groups[0], [torch.tensor([7.0])]])
    with pytest.raises(ConversionError, match="2 fp32 masters but only 1 module weights round to the same values"):
        name_master_weights({"a": module["a"]}, [[masters["a"], masters["a"].clone()]])


def _fake_stage0_checkpoint(root: Path, module: dict, optimizer: dict) -> Path:
    """What DeepSpeed's stage-0 save of a bf16 engine writes (checked against DeepSpeed 0.19 in
    test_convert_deepspeed.py), plus the trainer's client state and COMPLETE marker."""
    tag_dir = root / "checkpoints" / "step-5"
    tag_dir.mkdir(parents=True)
    config = {"model": {"size": "tiny", "img_size": PRE_IMG, "window_size": PRE_WIN}}
    states = {"module": module, "buffer_names": [], "optimizer": optimizer, "param_shapes": None, "ds_version": "0.19"}
    torch.save(
        {**states, "step": 5, "world_size": 1, "zero_stage": 0, "config": config},
        tag_dir / "mp_rank_00_model_states.pt",
    )
    (tag_dir / "COMPLETE").write_text(json.dumps({"step": 5, "world_size": 1, "zero_stage": 0}))
    return tag_dir


def test_consolidate_stage0_bf16_uses_fp32_masters(simmim_file, tmp_path, capsys):
    path, _ = simmim_file
    masters = {k: v + 1e-4 * torch.randn_like(v) for k, v in load_weights_file(path)[0].items()}
    module = {k: v.to(torch.bfloat16) for k, v in masters.items()}
    # Two groups like the trainer's: decayed matrices and the rest, each in module order.
    decay = [k for k, v in masters.items() if v.ndim > 1 and "cpb_mlp" not in k]
    groups = [[masters[k] for k in decay], [v for k, v in masters.items() if k not in decay]]
    run = tmp_path / "run"
    _fake_stage0_checkpoint(run, module, {"fp32_groups": groups, "cur_scale": 1.0})
    out = tmp_path / "fp32.safetensors"
    assert convert.main(["consolidate", str(run), "-o", str(out)]) == 0
    state, meta, _ = load_weights_file(out)
    assert meta["step"] == 5 and meta["kind"] == "simmim"
    _assert_same_tensors(state, masters)
    assert convert.main(["consolidate", str(run), "-o", str(tmp_path / "bf16.pth"), "--dtype", "bf16"]) == 0
    _assert_same_tensors(load_weights_file(tmp_path / "bf16.pth")[0], module)

    # Without the masters, fp32 is refused rather than widened from bf16.
    bare = tmp_path / "bare"
    _fake_stage0_checkpoint(bare, module, {"cur_scale": 1.0})
    capsys.readouterr()
    err = _error(capsys, ["consolidate", str(bare), "-o", str(tmp_path / "x.safetensors")])
    assert "the module weights are bfloat16 and the optimizer state holds no fp32 master copy" in err
    assert "found: ['cur_scale']" in err and "Use --dtype bf16" in err
    assert convert.main(["consolidate", str(bare), "-o", str(tmp_path / "y.safetensors"), "--dtype", "bf16"]) == 0
    # A fused Adam's flat per-group buffers carry no shapes to split them by.
    flat = tmp_path / "flat"
    _fake_stage0_checkpoint(flat, module, {"fp32_groups_flat": [torch.cat([t.flatten() for t in g]) for g in groups]})
    err = _error(capsys, ["consolidate", str(flat), "-o", str(tmp_path / "z.safetensors")])
    assert "saved flattened per param group (fp32_groups_flat" in err and "Use --dtype bf16" in err


# ------------------------------------------------------------------------------------- more bad inputs
def test_bad_hf_directories_and_paths(backbone_file, tmp_path, capsys):
    path, _ = backbone_file
    out = str(tmp_path / "o.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _error(capsys, ["import", "--from", "hf", str(empty), "-o", out])
    assert "no config.json; an HF model directory (save_pretrained output) is expected" in err
    swin = tmp_path / "swin"
    swin.mkdir()
    (swin / "config.json").write_text(json.dumps({"model_type": "swin"}))
    assert "model_type 'swin'; accepted: 'swinv2'" in _error(capsys, ["import", "--from", "hf", str(swin), "-o", out])
    hf = tmp_path / "hf"
    assert convert.main(["export", "--to", "hf", str(path), "-o", str(hf)]) == 0
    (hf / "model.safetensors").unlink()
    capsys.readouterr()
    err = _error(capsys, ["import", "--from", "hf", str(hf), "-o", out])
    assert "no model.safetensors, pytorch_model.bin or a sharded index next to config.json" in err
    err = _error(capsys, ["import", "--from", "hf", str(path), "-o", out])
    assert "--from hf reads an HF model directory (with config.json), not a file" in err
    err = _error(capsys, ["consolidate", str(path), "-o", out])
    assert "not a directory; expected a DeepSpeed checkpoint directory (step-<N>)" in err
    assert "no such file or directory" in _error(capsys, ["inspect", str(tmp_path / "missing.pth")])
    assert "this directory holds no checkpoint this tool knows" in _error(capsys, ["inspect", str(empty)])
    assert not (tmp_path / "o.safetensors").exists()


def test_hf_refuses_what_it_cannot_express(tmp_path, capsys):
    cases = {
        "windows": ({"window_size": [12, 12, 6, 6]}, "window_size=[12, 12, 6, 6] differs between stages"),
        "ape": ({"ape": True}, "ape=True (HF's absolute position embedding has L+1 positions"),
        "patch_norm": ({"patch_norm": False}, "patch_norm=False (HF always normalises patch embeddings)"),
    }
    for name, (kwargs, message) in cases.items():
        model = SwinTransformerV2(img_size=PRE_IMG, num_classes=0, **{"window_size": PRE_WIN, **kwargs, **ARCH})
        meta = _meta(model, "backbone")
        meta["model"].update({k: v for k, v in kwargs.items() if k != "window_size"})
        path = _save_ours(tmp_path / f"{name}.safetensors", model.state_dict(), meta)
        err = _error(capsys, ["export", "--to", "hf", str(path), "-o", str(tmp_path / f"{name}-hf")])
        assert f"cannot express this model in HF Swinv2: {message}" in err, name
        assert not (tmp_path / f"{name}-hf").exists()
        if name == "ape":
            from pretrain.formats import infer_spec

            # Without metadata, the image size is read from the embedding's length (one row per patch).
            assert infer_spec(model.state_dict()).img_size == PRE_IMG


# ------------------------------------------------------------------------------------------- damaged inputs
def test_damaged_files_get_one_line_naming_them(backbone_file, tmp_path, capsys):
    """Corrupt or truncated safetensors, an empty .pth, a truncated .pth and random bytes: exit 2, one line naming
    the file and what is wrong with it; never the --trust-pickle advice, which is for intact pickles."""
    path, model = backbone_file
    pth = tmp_path / "good.pth"
    torch.save(model.state_dict(), pth)
    data, pth_data = path.read_bytes(), pth.read_bytes()
    damaged = {
        "cut.safetensors": (data[: len(data) // 2], "not a readable safetensors file"),
        "garbage.safetensors": (bytes(range(256)) * 40, "not a readable safetensors file"),
        "empty.pth": (b"", "the file is empty (0 bytes); it was cut short or never written"),
        "cut.pth": (pth_data[: len(pth_data) // 2], "not a torch checkpoint: neither a zip archive"),
        "random.pth": (os.urandom(5000), "not a torch checkpoint: neither a zip archive"),
    }
    out = tmp_path / "o.safetensors"
    for name, (content, expected) in damaged.items():
        (tmp_path / name).write_bytes(content)
        for argv in (
            ["export", "--to", "timm", str(tmp_path / name), "-o", str(out)],
            ["import", "--from", "official", str(tmp_path / name), "-o", str(out)],
            ["inspect", str(tmp_path / name)],
        ):
            err = _error(capsys, argv)
            assert err.startswith(f"error: {tmp_path / name}: ") and expected in err, (name, err)
            assert len(err.strip().splitlines()) == 1 and "--trust-pickle" not in err and "Traceback" not in err
    assert f"({len(data) // 2} bytes)" in _error(capsys, ["inspect", str(tmp_path / "cut.safetensors")])
    assert not out.exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_exported_hf_directory_has_plain_mkdir_permissions(backbone_file, tmp_path, umask):
    path, _ = backbone_file
    previous = os.umask(umask)
    try:
        assert convert.main(["export", "--to", "hf", str(path), "-o", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "hf" / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask
