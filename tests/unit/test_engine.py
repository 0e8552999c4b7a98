"""pretrain/engine.py without a process group: distributed.deepspeed keys checked by DeepSpeed's own config parser
at load time, the generated DeepSpeed dict for CPU and CUDA, and the TF32 switch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from pretrain.config import ConfigError, load_config
from pretrain.engine import configure_matmul_precision, deepspeed_config

DS = "distributed.deepspeed"


@pytest.mark.parametrize(
    ("override", "key", "near", "accepted"),
    [
        (f"{DS}.gradient_clippin=1.0", "gradient_clippin", "'gradient_clipping'? set optimizer.clip_grad", "aio"),
        (f"{DS}.steps_per_prnt=10", "steps_per_prnt", "'steps_per_print'", "steps_per_print"),
        (f"{DS}.zero_optimization.overlap_com=true", "zero_optimization.overlap_com", "'overlap_comm'", "overlap_comm"),
        (
            f"{DS}.zero_optimization.offload_optimizer.pin_memry=true",
            "zero_optimization.offload_optimizer.pin_memry",
            "'pin_memory'",
            "pin_memory",
        ),
        (
            f"{DS}.activation_checkpointing.partition_activation=true",
            "activation_checkpointing.partition_activation",
            "'partition_activations'",
            "partition_activations",
        ),
        (f"{DS}.flops_profiler.enable=true", "flops_profiler.enable", "'enabled'", "profile_step"),
        (f"{DS}.comms_logger.verbos=true", "comms_logger.verbos", "'verbose'", "prof_all"),
        (f"{DS}.tensorboard.output_pth=runs", "tensorboard.output_pth", "'output_path'", "job_name"),
        (f"{DS}.fp16.initial_scale_powr=12", "fp16.initial_scale_powr", "'initial_scale_power'", "loss_scale_window"),
    ],
)
def test_unknown_deepspeed_keys_are_refused_naming_the_key_and_the_accepted_ones(
    override: str, key: str, near: str, accepted: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    section = f"{DS}.{key.rpartition('.')[0]}" if "." in key else DS
    assert f"unknown key {DS}.{key}: DeepSpeed " in message, message
    assert f"did you mean {near}" in message, message
    listed = message.split(f"accepted keys in {section}: ")[1].split(", ")
    assert accepted in listed, message
    assert key.rpartition(".")[2] not in listed


def test_accepted_key_lists_leave_out_typed_and_removed_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{DS}.zero_optimisation.stage3_max_live_parameters=10"])
    listed = str(info.value).split(f"accepted keys in {DS}: ")[1].split(", ")
    assert {"zero_optimization", "activation_checkpointing", "flops_profiler", "comms_logger"} <= set(listed)
    assert not {"train_batch_size", "gradient_clipping", "optimizer", "scheduler"} & set(listed)  # typed
    assert "amp" not in listed and "progressive_layer_drop" not in listed  # removed from DeepSpeed, looked up to refuse
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{DS}.zero_optimization.stag=3"])
    listed = str(info.value).split(f"accepted keys in {DS}.zero_optimization: ")[1].split(", ")
    assert "reduce_bucket_size" in listed and "stage" not in listed  # zero_optimization.stage is typed


def test_valid_deepspeed_keys_are_accepted_and_merged() -> None:
    cfg = load_config(
        None,
        [
            "distributed.zero_stage=3",
            f"{DS}.zero_optimization.reduce_bucket_size=1000",
            f"{DS}.zero_optimization.stage3_prefetch_bucket_size=500",
            f"{DS}.zero_optimization.offload_param={{device: cpu, pin_memory: false}}",
            f"{DS}.activation_checkpointing={{partition_activations: true, cpu_checkpointing: false, profile: true}}",
            f"{DS}.flops_profiler={{enabled: true, profile_step: 2, module_depth: -1, top_modules: 3}}",
            f"{DS}.comms_logger={{enabled: true, verbose: false, prof_all: true}}",
            f"{DS}.tensorboard={{enabled: false, output_path: runs, job_name: x}}",
            f"{DS}.fp16.initial_scale_power=12",
            f"{DS}.bfloat16.immediate_grad_update=true",  # DeepSpeed's other spelling of bf16
            f"{DS}.checkpoint.tag_validation=Warn",
            f"{DS}.dump_state=true",
        ],
    )
    ds = deepspeed_config(cfg, world_size=2, device=torch.device("cpu"))
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["activation_checkpointing"]["partition_activations"] is True
    assert ds["flops_profiler"]["profile_step"] == 2 and ds["comms_logger"]["prof_all"] is True
    assert ds["checkpoint"] == {"load_universal": False, "tag_validation": "Warn"}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (f"{DS}.zero_optimization.reduce_bucket_size=-1", "zero_optimization.reduce_bucket_size=-1: DeepSpeed"),
        (f"{DS}.zero_optimization.offload_optimizer.device=disk", "offload_optimizer.device='disk': DeepSpeed"),
        (f"{DS}.amp.enabled=true", "Apex AMP integration has been removed"),  # DeepSpeed's own refusal
    ],
)
def test_values_deepspeed_refuses_are_config_errors(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=r"refuses it") as info:
        load_config(None, [override])
    assert expected in str(info.value)


def test_a_mistyped_deepspeed_key_exits_2_before_any_work(capsys: pytest.CaptureFixture[str]) -> None:
    from pretrain.__main__ import main

    assert main([f"{DS}.zero_optimization.overlap_com=true", "training.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "config error: unknown key distributed.deepspeed.zero_optimization.overlap_com" in err
    assert "did you mean 'overlap_comm'?" in err


def test_print_config_stdout_stays_yaml_when_deepspeed_is_imported_to_check_keys() -> None:
    # Checking pass-through keys imports DeepSpeed, whose accelerator notice goes to stdout on a CPU-only machine.
    run = subprocess.run(
        [sys.executable, "-m", "pretrain", "--print-config", f"{DS}.steps_per_print=7"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert yaml.safe_load(run.stdout)["distributed"]["deepspeed"] == {"steps_per_print": 7}


@pytest.mark.parametrize("key", ["overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size"])
def test_a_typed_zero_setting_and_its_pass_through_key_are_not_both_set(key: str) -> None:
    value = "true" if key in ("overlap_comm", "contiguous_gradients") else "1000"
    with pytest.raises(ConfigError, match=rf"{DS}\.zero_optimization\.{key}=.* and distributed\.{key}=.* both set"):
        load_config(None, [f"distributed.{key}={value}", f"{DS}.zero_optimization.{key}={value}"])
    # Left auto, the pass-through key sets it.
    cfg = load_config(None, [f"{DS}.zero_optimization.{key}={value}"])
    assert deepspeed_config(cfg, 1)["zero_optimization"][key] == yaml.safe_load(value)


@pytest.mark.parametrize("key", ["reduce_bucket_size", "allgather_bucket_size"])
def test_bucket_sizes_must_be_positive(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"distributed\.{key}=0; accepted: null \(DeepSpeed's default\) or > 0"):
        load_config(None, [f"distributed.{key}=0"])


def _zero(device: str, stage: int, *overrides: str) -> dict:
    cfg = load_config(None, [f"distributed.zero_stage={stage}", *overrides])
    return deepspeed_config(cfg, world_size=4, device=torch.device(device))["zero_optimization"]


@pytest.mark.parametrize(
    ("device", "stage", "overlap"),
    [("cpu", 1, False), ("cpu", 2, False), ("cpu", 3, False), ("cuda", 1, False), ("cuda", 2, True), ("cuda", 3, True)],
)
def test_overlap_comm_auto_is_on_for_zero_2_and_3_on_cuda_only(device: str, stage: int, overlap: bool) -> None:
    zero = _zero(device, stage)
    assert zero == {"stage": stage, "overlap_comm": overlap, "reduce_scatter": True}
    # Forced either way, whatever the device.
    assert _zero(device, stage, f"distributed.overlap_comm={not overlap}")["overlap_comm"] is (not overlap)


def test_zero_stage_0_generates_no_zero_settings() -> None:
    assert _zero("cuda", 0) == {"stage": 0}
    assert _zero("cpu", 0, "distributed.overlap_comm=true", "distributed.reduce_bucket_size=7") == {"stage": 0}


def test_auto_zero_settings_are_deepspeeds_defaults() -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    for device, stage in [("cpu", 2), ("cuda", 2), ("cuda", 3)]:
        cfg = load_config(None, [f"distributed.zero_stage={stage}", "training.precision=fp32"])
        parsed = DeepSpeedConfig(deepspeed_config(cfg, world_size=1, device=torch.device(device))).zero_config
        assert parsed.contiguous_gradients is True
        assert parsed.reduce_bucket_size == 5 * 10**8 and parsed.allgather_bucket_size == 5 * 10**8
        assert parsed.overlap_comm is (device == "cuda")


def test_typed_zero_settings_reach_the_generated_dict_for_cpu_and_cuda() -> None:
    overrides = [
        "distributed.offload_optimizer=true",
        "distributed.contiguous_gradients=false",
        "distributed.reduce_bucket_size=200000000",
        "distributed.allgather_bucket_size=100000000",
    ]
    for device in ("cpu", "cuda"):
        zero = _zero(device, 2, *overrides)
        assert zero == {
            "stage": 2,
            "overlap_comm": device == "cuda",
            "reduce_scatter": True,
            "contiguous_gradients": False,
            "reduce_bucket_size": 200000000,
            "allgather_bucket_size": 100000000,
            "offload_optimizer": {"device": "cpu", "pin_memory": device == "cuda"},
        }


def test_device_defaults_to_training_device() -> None:
    cfg = load_config(None, ["distributed.zero_stage=2", "training.device=cpu"])
    assert deepspeed_config(cfg, 1)["zero_optimization"]["overlap_comm"] is False


@pytest.fixture
def tf32_flags() -> object:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.usefixtures("tf32_flags")
def test_tf32_is_set_for_cuda_only() -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    assert configure_matmul_precision(True, torch.device("cpu")) is False
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    # Simulated CUDA device: the flags are process-wide switches, settable without a GPU.
    assert configure_matmul_precision(True, torch.device("cuda", 0)) is True
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    assert torch.get_float32_matmul_precision() == "high"  # the legacy and new APIs were not mixed
    assert configure_matmul_precision(False, torch.device("cuda", 0)) is False
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)


def test_compile_with_zero3_is_refused_with_the_measured_reason() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.compile=true", "distributed.zero_stage=3"])
    message = str(info.value)
    assert "measured with DeepSpeed 0.19.8 and torch 2.14.1 (CPU)" in message
    assert "breaks the graph at every module's ZeRO-3 parameter hook" in message
    assert "accepted: zero_stage 0, 1 or 2 with model.compile=true, or model.compile=false" in message
    assert load_config(None, ["model.compile=true", "distributed.zero_stage=2"]).model.compile
