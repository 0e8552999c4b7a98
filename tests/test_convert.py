"""Checkpoint conversion between ours, official, timm and HF: round trips, feature equality, bad-input messages."""

from __future__ import annotations

import json
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
