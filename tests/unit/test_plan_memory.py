"""The planner's memory model against measurement: the allocation tracker's exactness, parameter counts, activation
peaks of SwinV2-T/S/B SimMIM forward + backward on the CPU within 10% of every allocation counted, bad inputs."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from pretrain.config import load_config
from pretrain.masking import MaskGenerator
from pretrain.plan.activations import activation_memory, checkpointed_blocks, model_shape
from pretrain.plan.memory import (
    MemoryEstimate,
    buffer_bytes,
    estimate_memory,
    model_state_bytes,
    parameter_count,
    parameter_tensors_by_unit,
)
from pretrain.plan.tracker import track_peak
from pretrain.simmim import build_simmim
from swinv2 import parse_checkpointing

MIB = 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------------------ tracker
@pytest.mark.parametrize("method", ["allocator", "tensors"])
def test_tracker_peak_of_a_known_sequence(method):
    before = torch.empty(1000)  # allocated before the region: neither it nor its free is counted
    with track_peak("cpu", method=method) as peak:
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(2 << 20, dtype=torch.uint8)
        peak.mark("two")
        del a
        c = torch.empty(3 << 20, dtype=torch.uint8)  # live: b + c = 5 MiB, the peak
        c.zero_()  # in place and a view: no allocation
        view = c.view(-1)
        del before, b, c, view
        d = torch.empty(1 << 10, dtype=torch.uint8)
        peak.mark("end")
    assert peak.peak_bytes == 5 << 20
    assert peak.net_bytes == d.numel() == 1 << 10
    assert peak.marks == {"two": 3 << 20, "end": 1 << 10}
    assert peak.peak_since("two") == 5 << 20 and peak.peak_since("end") == 1 << 10


def test_tracker_tensors_method_sees_frees_on_other_threads():
    with track_peak("cpu", method="tensors") as peak:
        held = [torch.empty(4 << 20, dtype=torch.uint8)]
        thread = threading.Thread(target=held.clear)  # as gloo's threads release an async collective's tensors
        thread.start()
        thread.join()
    assert peak.peak_bytes == 4 << 20 and peak.net_bytes == 0


def test_tracker_bad_arguments():
    with pytest.raises(ValueError, match=r"method='rss'.*allocator, tensors"), track_peak("cpu", method="rss"):
        pass
    with pytest.raises(ValueError, match="'meta' is not supported"), track_peak("meta"):
        pass
    profiler, refused = torch.profiler.profile(), pytest.raises(RuntimeError, match="another profiler window")
    with profiler, refused, track_peak("cpu"):
        pass
    with track_peak("cpu") as peak:
        peak.mark("a")
        with pytest.raises(ValueError, match="mark 'a' is already set"):
            peak.mark("a")
    with pytest.raises(KeyError, match="no mark 'b'"):
        peak.peak_since("b")


# -------------------------------------------------------------------------------------------------- parameter count
@pytest.mark.parametrize("size", ["tiny", "base", "giant"])
def test_parameter_and_buffer_counts_match_the_model(size):
    cfg = load_config(None, [f"model.size={size}"])
    with torch.device("meta"):
        model = build_simmim(cfg)
    shape = model_shape(cfg.model)
    assert parameter_count(shape) == sum(p.numel() for p in model.parameters())
    tensors = sorted(n for _, sizes in parameter_tensors_by_unit(shape) for n in sizes)
    assert tensors == sorted(p.numel() for p in model.parameters())  # ZeRO-3 keeps the small ones whole
    assert buffer_bytes(shape, "fp32") == sum(b.numel() * b.element_size() for b in model.buffers())


def test_parameter_count_of_a_real_tiny_model_with_options():
    overrides = ["model.size=tiny", "model.embed_dim=16", "model.depths=[1,2,3,2]", "model.num_heads=[1,2,2,4]"]
    overrides += ["model.img_size=64", "model.window_size=4", "simmim.mask_patch_size=16", "model.ape=true"]
    overrides += ["model.extra_norm_every=1", "model.mlp_ratio=3.0"]
    cfg = load_config(None, overrides)
    model = build_simmim(cfg)
    assert parameter_count(model_shape(cfg.model)) == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- activation memory
def _measured_activation_peak(
    size: str, batch: int, precision: str, checkpointing: str, chunk: int, attn_impl: str, extra: list[str]
) -> int:
    """Peak bytes allocated during forward + backward of the SimMIM model, over what existed before the forward.

    The model is cast to the precision's dtype as DeepSpeed's bf16 mode does; each parameter gradient is released as
    soon as it is accumulated (the ``gradients`` entry of the estimate holds the kept ones)."""
    cfg = load_config(
        None, [f"model.size={size}", f"model.window_chunk_size={chunk}", f"model.attn_impl={attn_impl}", *extra]
    )
    torch.manual_seed(0)
    model = build_simmim(cfg).to(DTYPES[precision])
    model.encoder.set_grad_checkpointing(**parse_checkpointing(checkpointing))
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    masks = MaskGenerator(cfg.model.img_size, cfg.simmim.mask_patch_size, cfg.model.patch_size, cfg.simmim.mask_ratio)
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(np.stack([masks(rng) for _ in range(batch)]))
    images = torch.randn(batch, 3, cfg.model.img_size, cfg.model.img_size).to(DTYPES[precision])
    with track_peak("cpu") as peak:
        model(images, mask).backward()
    return peak.peak_bytes


# (size, micro-batch, precision, checkpointing, window_chunk_size, attn_impl): T with every setting, S and B with two
# each; "auto" is the explicit path on the CPU, "sdpa" PyTorch's math fallback there.
ACTIVATION_CASES = [
    ("tiny", 2, "fp32", "none", 0, "auto"),
    ("tiny", 2, "fp32", "none", 4, "auto"),
    ("tiny", 1, "fp32", "all", 0, "auto"),
    ("tiny", 1, "fp32", "all", 4, "auto"),
    ("tiny", 1, "fp32", "every:2", 0, "auto"),
    ("tiny", 2, "bf16", "none", 0, "auto"),
    ("tiny", 2, "bf16", "all", 4, "auto"),
    ("tiny", 1, "bf16", "stages:0,1", 0, "auto"),
    ("small", 1, "fp32", "none", 0, "auto"),
    ("small", 2, "bf16", "every:2", 4, "auto"),
    ("base", 2, "fp32", "none", 4, "auto"),
    ("base", 1, "bf16", "all", 0, "auto"),
    ("tiny", 2, "bf16", "none", 0, "sdpa"),
]


def _check_activation_peak(size, batch, precision, checkpointing, chunk, impl, extra=()):
    cfg = load_config(None, [f"model.size={size}", *extra])
    predicted = activation_memory(
        model_shape(cfg.model),
        batch,
        precision=precision,
        checkpointing=checkpointing,
        window_chunk_size=chunk,
        attn_impl=impl,
        device="cpu",
    ).peak
    measured = _measured_activation_peak(size, batch, precision, checkpointing, chunk, impl, list(extra))
    ratio = measured / predicted
    setting = f"{size} b{batch} {precision} {checkpointing} chunk={chunk} {impl} {' '.join(extra)}"
    print(f"{setting}: measured {measured / MIB:.1f} MiB / predicted {predicted / MIB:.1f} MiB = {ratio:.3f}")
    assert 0.9 <= ratio <= 1.1, (measured, predicted, ratio)


@pytest.mark.parametrize(("size", "batch", "precision", "checkpointing", "chunk", "impl"), ACTIVATION_CASES)
def test_activation_peak_within_10_percent(size, batch, precision, checkpointing, chunk, impl):
    _check_activation_peak(size, batch, precision, checkpointing, chunk, impl)


def test_activation_peak_with_dropout_within_10_percent():
    """Dropout (off in the recipes) keeps masks, and the attention dropout a second copy of the weights."""
    _check_activation_peak("tiny", 1, "fp32", "every:2", 0, "auto", ("model.drop_rate=0.1", "model.attn_drop_rate=0.1"))


def test_activation_settings_move_the_estimate_the_right_way():
    shape = model_shape(load_config(None, ["model.size=base"]).model)
    plain = activation_memory(shape, 8, precision="bf16")
    assert activation_memory(shape, 16, precision="bf16").stored > 1.8 * plain.stored
    assert activation_memory(shape, 8, precision="bf16", checkpointing="all").peak < plain.peak / 3
    assert activation_memory(shape, 8, precision="fp32").stored > 1.5 * plain.stored
    explicit = activation_memory(shape, 8, precision="bf16", attn_impl="explicit")
    assert explicit.attn_impl == "explicit" and plain.attn_impl == "sdpa_efficient"
    assert activation_memory(shape, 8, precision="bf16", attn_impl="explicit", window_chunk_size=2).peak < explicit.peak


def test_checkpointed_blocks_follow_set_grad_checkpointing():
    cfg = load_config(
        None, ["model.size=tiny", "model.img_size=64", "model.window_size=4", "simmim.mask_patch_size=16"]
    )
    model = build_simmim(cfg).encoder
    for spec in ("none", "all", "every:2", "every:3+stages:2,3", "stages:0"):
        model.set_grad_checkpointing(**parse_checkpointing(spec))
        expected = [[blk.grad_checkpointing for blk in layer.blocks] for layer in model.layers]
        assert checkpointed_blocks(spec, cfg.model.resolved("depths")) == expected, spec


# ---------------------------------------------------------------------------------------------------- estimate
def test_estimate_adds_up_and_partitions_with_world_size():
    cfg = load_config(None, ["model.size=base", "distributed.zero_stage=3", "data.batch_size=4"])
    one, eight = estimate_memory(cfg, world_size=1), estimate_memory(cfg, world_size=8)
    assert isinstance(one, MemoryEstimate)
    fields = one.to_dict()
    assert one.total == sum(v for k, v in fields.items() if k not in ("host_offloaded", "overlap")) - one.overlap
    assert eight.optimizer_states * 8 == pytest.approx(one.optimizer_states, rel=1e-6)
    assert eight.master_weights < one.master_weights and eight.gradients < one.gradients
    assert eight.activations == one.activations
    offloaded = estimate_memory(
        load_config(None, ["model.size=base", "distributed.offload_optimizer=true"]), world_size=8
    )
    assert offloaded.optimizer_states == offloaded.master_weights == 0 and offloaded.host_offloaded > 0
    zero0 = load_config(None, ["model.size=base", "distributed.zero_stage=0", "training.precision=fp32"])
    assert model_state_bytes(zero0, world_size=4) == model_state_bytes(zero0, world_size=1)
    # overlap_comm auto: on for ZeRO-2 on CUDA (two reduce buckets alternate), off on the CPU
    bucket = "distributed.reduce_bucket_size=100000000"
    zero2 = load_config(None, ["model.size=base", "distributed.zero_stage=2", bucket])
    buckets = {d: estimate_memory(zero2, world_size=8, device=d).deepspeed_buffers for d in ("cuda", "cpu")}
    assert buckets["cuda"] - buckets["cpu"] == 100_000_000 * 2  # bf16 elements


def test_bad_inputs_name_the_value():
    cfg = load_config(None, ["model.size=tiny"])
    shape = model_shape(cfg.model)
    with pytest.raises(ValueError, match="micro-batch 0; accepted: a positive integer"):
        activation_memory(shape, 0)
    with pytest.raises(ValueError, match="every:0"):
        activation_memory(shape, 1, checkpointing="every:0")
    with pytest.raises(ValueError, match="stages \\[7\\] do not exist"):
        activation_memory(shape, 1, checkpointing="stages:7")
    with pytest.raises(ValueError, match="attn_impl='flash'; accepted: auto, sdpa, explicit"):
        activation_memory(shape, 1, attn_impl="flash")
    with pytest.raises(ValueError, match="precision='fp8'"):
        activation_memory(shape, 1, precision="fp8")
    with pytest.raises(ValueError, match="window_chunk_size=-1"):
        activation_memory(shape, 1, window_chunk_size=-1)
    with pytest.raises(ValueError, match="world_size=0; accepted: a positive integer"):
        estimate_memory(cfg, world_size=0)
    with pytest.raises(ValueError, match="micro_batch=-2"):
        estimate_memory(cfg, world_size=1, micro_batch=-2)
    with pytest.raises(ValueError, match="device='tpu'; accepted: cuda, cpu"):
        estimate_memory(cfg, world_size=1, device="tpu")
