"""Checkpoint conversion: ``python -m pretrain.convert SUBCOMMAND ...`` (console script ``swinv2-convert``).

Subcommands:
  consolidate  DeepSpeed checkpoint (any ZeRO stage / world size) -> one weights file with metadata
  backbone     SimMIM checkpoint (ours or official) -> backbone weights ready for fine-tuning
  import       official / timm / HF weights -> ours
  export       ours -> timm / HF directory / official layout
  universal    DeepSpeed checkpoint -> DeepSpeed universal checkpoint (resume at another world size)
  inspect      show what a checkpoint file or directory holds

Every output is written under a temporary name and renamed; an existing output needs --force. Bad inputs end with
one line ``error: ...`` naming what was found and what is accepted (exit code 2).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import MARKER, has_zero_shards, universal_dir
from pretrain.formats import (
    META_KEY,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    ConversionError,
    ModelSpec,
    backbone_from_simmim,
    check_weights,
    coords_table_matches,
    detect_layout,
    effective_windows,
    hf_config,
    hf_to_official,
    infer_spec,
    layout_hint,
    load_weights_file,
    official_buffers,
    official_to_hf,
    official_to_timm,
    pretrained_windows_from_tables,
    rename_legacy,
    save_weights_file,
    spec_from_config,
    spec_from_hf_config,
    strip_derived_buffers,
    timm_to_official,
    write_atomically,
)

__all__ = [
    "consolidate",
    "export",
    "import_weights",
    "inspect_path",
    "main",
    "make_backbone",
    "name_master_weights",
    "resolve_checkpoint",
    "to_universal",
]

DTYPES = ("fp32", "bf16")


def _log(message: str) -> None:
    print(message, file=sys.stderr)


# ------------------------------------------------------------------------------------------ DeepSpeed directories
def _is_tag_dir(path: Path) -> bool:
    return any(path.glob("*model_states.pt"))


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> Path:
    """Find the DeepSpeed tag directory to read, refusing incomplete ones.

    Args:
        path: a tag directory (``.../checkpoints/step-<N>``), a checkpoints directory, or a run directory (with
            ``checkpoints/`` inside).
        tag: a tag inside the checkpoints directory; None = the newest complete one.

    Returns:
        The tag directory (which holds the COMPLETE marker).
    """
    from pretrain.checkpoint import find_latest_complete, is_complete

    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory; expected a DeepSpeed checkpoint directory (step-<N>)")
    if _is_tag_dir(path):
        if tag is not None and tag != path.name:
            raise ConversionError(f"{path} is itself the checkpoint {path.name!r}; --tag {tag!r} does not apply")
        tag_dir = path
    else:
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        if tag is not None:
            tag_dir = ckpt_dir / tag
            if not _is_tag_dir(tag_dir):
                tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and _is_tag_dir(p))
                raise ConversionError(f"{tag_dir}: no DeepSpeed checkpoint with tag {tag!r}; tags found: {tags}")
        else:
            latest = find_latest_complete(ckpt_dir)
            if latest is None:
                tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and _is_tag_dir(p))
                raise ConversionError(
                    f"{ckpt_dir}: no complete checkpoint (a step-<N> directory with a {MARKER} marker); "
                    f"incomplete tags found: {tags}"
                )
            tag_dir = Path(latest)
    if not is_complete(tag_dir):
        raise ConversionError(
            f"{tag_dir}: no {MARKER} marker, so the save did not finish (interrupted or still running); "
            f"refusing to read it. Use an earlier complete tag, or the newest complete one by passing the "
            f"checkpoints directory without --tag"
        )
    return tag_dir


def _model_states_file(tag_dir: Path) -> Path:
    files = sorted(tag_dir.glob("*model_states.pt"))
    # mp_rank_00_model_states.pt (ZeRO 0-2) or zero_pp_rank_0_mp_rank_00_model_states.pt (ZeRO-3) holds rank 0's
    # client state.
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    if not files:
        raise ConversionError(f"{tag_dir}: no *model_states.pt file")
    return files[0]


def read_client_state(tag_dir: Path) -> dict[str, Any]:
    """The client state saved with a DeepSpeed checkpoint (memory-mapped; the module weights are not read)."""
    # Our own trainer's file: it holds RNG states and the config as Python objects, so weights_only cannot be used.
    obj = torch.load(_model_states_file(tag_dir), map_location="cpu", mmap=True, weights_only=False)
    skip = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params"}
    state = {k: v for k, v in obj.items() if k not in skip and not isinstance(v, torch.Tensor)}
    if "ds_config" in obj and "zero_stage" not in state:
        state["zero_stage"] = obj["ds_config"].get("zero_optimization", {}).get("stage")
    return state


def _stage0_state_dict(tag_dir: Path, target: torch.dtype) -> dict[str, torch.Tensor]:
    """Stage 0 (no ZeRO shards): the model-states file holds the whole module, in the training precision.

    Under bf16/fp16 the module holds the low-precision copies; the fp32 master weights live in the optimizer state
    (DeepSpeed's FP16_UnfusedOptimizer: ``optimizer["fp32_groups"]``, one list of tensors per param group). The
    module copies are exactly the masters rounded, so they serve as they are for a bf16 output from bf16 training.
    """
    path = _model_states_file(tag_dir)
    # DeepSpeed's own file: it pickles its config objects, so weights_only cannot be used.
    obj = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    module = obj["module"]
    low = {v.dtype for v in module.values() if v.is_floating_point() and v.dtype != torch.float32}
    if not low or low == {target}:
        return {k: v.to(target) if v.is_floating_point() else v for k, v in module.items()}
    optimizer = obj.get("optimizer") or {}
    if "fp32_groups_flat" in optimizer:
        # FP16_Optimizer (DeepSpeed's or apex's FusedAdam) keeps one flat fp32 buffer per group and no shapes.
        raise ConversionError(
            f"{path}: the fp32 master weights were saved flattened per param group (fp32_groups_flat, from a fused "
            f"Adam), without the shapes needed to split them; this tool cannot recover fp32 weights from it. Use "
            f"--dtype bf16 for the training-precision weights, or train with ZeRO stage 1-3 or torch's AdamW"
        )
    if "fp32_groups" not in optimizer:
        found = sorted(optimizer) if isinstance(optimizer, Mapping) else type(optimizer).__name__
        raise ConversionError(
            f"{path}: the module weights are {', '.join(sorted(str(d).replace('torch.', '') for d in low))} and "
            f"the optimizer state holds no fp32 master copy DeepSpeed's stage-0 optimizer would write "
            f"(fp32_groups; found: {found}); the fp32 weights cannot be recovered. Use --dtype bf16 for the "
            f"training-precision weights"
        )
    buffers = set(obj.get("buffer_names") or [])
    masters = name_master_weights(module, optimizer["fp32_groups"], buffers, where=str(path))
    return {k: masters.get(k, v).to(target) if v.is_floating_point() else v for k, v in module.items()}


def name_master_weights(
    module: Mapping[str, torch.Tensor],
    groups: Sequence[Sequence[torch.Tensor]],
    buffers: set[str] | frozenset[str] = frozenset(),
    *,
    where: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Name the fp32 master weights of a stage-0 fp16/bf16 DeepSpeed optimizer.

    DeepSpeed saves them per param group, without names. Each master rounds exactly to its parameter's
    low-precision module copy, which names it; parameters whose copies are identical (small tensors such as
    one-head logit scales end up equal after rounding) are told apart by order: param groups list their parameters
    in module order (they are built by walking ``named_parameters``).

    Args:
        module: the low-precision module state dict (names in module order).
        groups: the fp32 masters, one sequence per param group.
        buffers: module entries that are buffers (no master).
        where: names the file in messages.

    Returns:
        name -> fp32 master, for every parameter the optimizer holds.

    Raises:
        ConversionError: a master matches no parameter, or equal copies cannot be told apart.
    """
    names = [k for k, v in module.items() if k not in buffers and v.is_floating_point()]
    half = (torch.bfloat16, torch.float16)
    low_dtype = next((module[k].dtype for k in names if module[k].dtype in half), torch.bfloat16)

    def key(t: torch.Tensor) -> tuple[tuple[int, ...], bytes]:
        # Bit pattern of the rounded values: a cheap digest of a possibly large tensor.
        bits = t.detach().to(low_dtype).contiguous().view(torch.int16).numpy().tobytes()
        return tuple(t.shape), hashlib.blake2b(bits, digest_size=16).digest()

    classes: dict[tuple[tuple[int, ...], bytes], list[int]] = {}
    for index, name in enumerate(names):
        classes.setdefault(key(module[name]), []).append(index)
    tensors = [(g, j, t) for g, group in enumerate(groups) for j, t in enumerate(group)]
    keys = {(g, j): key(t) for g, j, t in tensors}
    for (g, j), k in keys.items():
        if k not in classes:
            raise ConversionError(
                f"{where}: fp32 master #{j} of optimizer group {g} (shape {list(k[0])}) rounds to none of the module "
                f"weights; the optimizer state does not belong to this module"
            )
    counts: dict[tuple[tuple[int, ...], bytes], int] = {}
    for k in keys.values():
        counts[k] = counts.get(k, 0) + 1
    for k, n in counts.items():
        if n > len(classes[k]):
            raise ConversionError(
                f"{where}: {n} fp32 masters but only {len(classes[k])} module weights round to the same values "
                f"({', '.join(names[i] for i in classes[k])}); the optimizer state does not belong to this module"
            )

    assigned: dict[tuple[int, int], int] = {}
    taken: set[int] = set()

    def assign(item: tuple[int, int], index: int) -> None:
        assigned[item] = index
        taken.add(index)

    for item, k in keys.items():
        if len(classes[k]) == 1:
            assign(item, classes[k][0])
    changed = True
    while changed and len(assigned) < len(keys):
        changed = False
        # Bounds from the resolved neighbours in the same group (group order = module order).
        for g, group in enumerate(groups):
            for j in range(len(group)):
                if (g, j) in assigned:
                    continue
                lower = max((assigned[(g, i)] for i in range(j) if (g, i) in assigned), default=-1)
                upper = min((assigned[(g, i)] for i in range(j + 1, len(group)) if (g, i) in assigned), default=1 << 62)
                options = [i for i in classes[keys[(g, j)]] if i not in taken and lower < i < upper]
                if len(options) == 1:
                    assign((g, j), options[0])
                    changed = True
        # Equal copies all in one group take the free names of their class in order.
        pending: dict[tuple[tuple[int, ...], bytes], list[tuple[int, int]]] = {}
        for item, k in keys.items():
            if item not in assigned:
                pending.setdefault(k, []).append(item)
        for k, items in pending.items():
            free = [i for i in classes[k] if i not in taken]
            if len({g for g, _ in items}) == 1 and len(free) == len(items):
                for item, index in zip(sorted(items), free, strict=True):
                    assign(item, index)
                changed = True
    unresolved = sorted(item for item in keys if item not in assigned)
    if unresolved:
        tied = sorted({names[i] for item in unresolved for i in classes[keys[item]] if i not in taken})
        raise ConversionError(
            f"{where}: cannot tell which fp32 master belongs to which of {', '.join(tied)} (their bf16/fp16 copies "
            f"are identical and the optimizer groups do not order them); use --dtype bf16 for the training-precision "
            f"weights"
        )
    for g, group in enumerate(groups):
        order = [assigned[(g, j)] for j in range(len(group))]
        tied = any(len(classes[keys[(g, j)]]) > 1 for j in range(len(group)))
        if tied and order != sorted(order):
            # Ties were broken by an order this optimizer does not follow: the choice may be wrong.
            raise ConversionError(
                f"{where}: optimizer group {g} does not list its parameters in module order, so fp32 masters with "
                f"identical bf16/fp16 copies cannot be told apart; use --dtype bf16 for the training-precision weights"
            )
    return {names[index]: groups[g][j] for (g, j), index in assigned.items()}


def _consolidated_state_dict(tag_dir: Path, dtype: str) -> dict[str, torch.Tensor]:
    target = torch.float32 if dtype == "fp32" else torch.bfloat16
    if not has_zero_shards(tag_dir):
        return _stage0_state_dict(tag_dir, target)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # lazy_mode memory-maps the optimizer shards and gathers one parameter at a time, so peak memory is about the
    # output itself instead of every rank's full optimizer state. DeepSpeed prints progress on stdout: keep it off
    # ours (stdout of this tool is for results).
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name, lazy_mode=True)
        except (ValueError, FileNotFoundError) as err:
            # e.g. a rank's optimizer shard is missing: DeepSpeed's own message says which and how many.
            raise ConversionError(f"{tag_dir}: DeepSpeed cannot consolidate it: {err}") from err
        out = {}
        for key, value in lazy.items():
            tensor = value.contiguous() if not isinstance(value, torch.Tensor) else value
            tensor = tensor.to(target) if tensor.is_floating_point() else tensor
            if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
                # A view of DeepSpeed's padded merge buffer: keep only the parameter now, or every buffer stays
                # alive until saving copies it (one more model copy at the peak).
                tensor = tensor.clone()
            out[key] = tensor
    return out


def consolidate(
    path: str | Path, output: str | Path, *, tag: str | None = None, dtype: str = "fp32", force: bool = False
) -> dict[str, Any]:
    """DeepSpeed checkpoint (any stage, any world size) -> one weights file with metadata.

    Args:
        path: tag, checkpoints or run directory (see :func:`resolve_checkpoint`).
        output: .safetensors (default format) or .pth/.pt file.
        tag: checkpoint tag; None = newest complete.
        dtype: fp32 or bf16.
        force: replace an existing output.

    Returns:
        The metadata written with the weights.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    output = Path(output)
    _check_output(output, force)
    tag_dir = resolve_checkpoint(path, tag)
    client = read_client_state(tag_dir)
    config = client.get("config") or {}
    state_dict = strip_derived_buffers(_consolidated_state_dict(tag_dir, dtype))
    layout = detect_layout(state_dict)
    if layout not in ("simmim", "ours"):
        raise ConversionError(f"{tag_dir}: consolidated weights are not a SwinV2/SimMIM model ({layout_hint(layout)})")
    backbone = backbone_from_simmim(state_dict) if layout == "simmim" else state_dict
    spec = spec_from_config(config, backbone) if config else infer_spec(backbone)
    check_weights(state_dict, spec, f"{tag_dir}: weights do not match the configured model", simmim=layout == "simmim")
    meta = {
        "kind": "simmim" if layout == "simmim" else "backbone",
        "model_size": (config.get("model") or {}).get("size"),
        "model": spec.to_dict(),
        "step": client.get("step"),
        "world_size": client.get("world_size"),
        "zero_stage": client.get("zero_stage"),
        "source": str(tag_dir),
        "dtype": dtype,
        "config": config,
    }
    with write_atomically(output, force=force) as tmp:
        save_weights_file(tmp, state_dict, meta)
    _log(f"consolidated {tag_dir} (step {meta['step']}, {len(state_dict)} tensors, {dtype}) -> {output}")
    return meta


def to_universal(
    path: str | Path, output: str | Path | None = None, *, tag: str | None = None, force: bool = False
) -> Path:
    """Convert a DeepSpeed checkpoint to DeepSpeed's universal format (``ds_to_universal``).

    The result is a tag directory (default ``<tag>_universal`` next to the source, where the trainer looks for it when
    a ZeRO-3 run resumes at another world size) holding the model-states files,
    DeepSpeed's ``zero/`` per-parameter folders, a copy of the COMPLETE marker and a ``UNIVERSAL`` marker; resume
    from it with DeepSpeed's ``checkpoint.load_universal: true`` at any world size.
    """
    import shutil
    from types import SimpleNamespace

    from deepspeed.checkpoint import ds_to_universal

    tag_dir = resolve_checkpoint(path, tag)
    if not has_zero_shards(tag_dir):
        raise ConversionError(
            f"{tag_dir}: a ZeRO stage 0 checkpoint holds the whole model and optimizer state in one file and resumes "
            f"at any world size as it is; universal conversion applies to ZeRO stages 1-3"
        )
    output = Path(output) if output is not None else universal_dir(tag_dir)
    _check_output(output, force, weights_file=False)
    with write_atomically(output, force=force, directory=True) as tmp:
        args = SimpleNamespace(
            input_folder=str(tag_dir),
            output_folder=str(tmp),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        with contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal.main(args)
        # DeepSpeed loads the client state and module buffers from the model-states files of the tag directory.
        for src in tag_dir.glob("*model_states.pt"):
            if not (tmp / src.name).exists():
                shutil.copy2(src, tmp / src.name)
        (tmp / "UNIVERSAL").write_text(f"converted from {tag_dir}\n")
        (tmp / MARKER).write_text((tag_dir / MARKER).read_text())
    _log(f"universal checkpoint of {tag_dir} -> {output}")
    return output


# ---------------------------------------------------------------------------------------------- single files
def _check_output(output: Path, force: bool, *, weights_file: bool = True) -> None:
    # Checked before any heavy work; write_atomically checks again when it starts writing.
    if output.exists() and not force:
        raise ConversionError(f"{output} exists; pass --force to replace it")
    if weights_file and output.suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        accepted = ", ".join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
        raise ConversionError(f"{output}: output suffix {output.suffix!r} not understood; accepted: {accepted}")


def _stage_values(values: Sequence[int] | None, stages: int, flag: str) -> list[int] | None:
    """A per-stage flag value: one number for every stage, or one per stage; None when not given."""
    if not values:
        return None
    out = [int(v) for v in values]
    if len(out) == 1:
        out *= stages
    if len(out) != stages:
        raise ConversionError(f"{flag} {list(values)}: give one value or one per stage ({stages} stages)")
    return out


def _pretrained_flag(values: Sequence[int] | None, stages: int) -> list[int] | None:
    out = _stage_values(values, stages, "--pretrained-window-sizes")
    if out is not None and any(p < 0 or p == 1 for p in out):
        raise ConversionError(
            f"--pretrained-window-sizes {list(values or [])}: accepted per stage: 0 (the stage's own window) or a "
            f"window of at least 2"
        )
    return out


def _apply_sizes(
    spec: ModelSpec, img_size: int | None, window_size: Sequence[int] | None, *, carry: bool = True
) -> ModelSpec:
    """Set new image/window sizes.

    With ``carry``, a stage whose effective window changes and that records no pretrained window gets the window
    it had: the position-bias MLP was trained on coordinates normalised by that one (spec §2.1), and recording 0
    would silently change the bias.
    """
    stages = len(spec.depths)
    before = None
    if spec.img_size is not None and spec.window_size is not None:
        before = effective_windows(spec.img_size, spec.window_size, spec.patch_size, stages)
    if img_size is not None:
        spec.img_size = int(img_size)
    windows = _stage_values(window_size, stages, "--window-size")
    if windows is not None:
        spec.window_size = windows
    if carry and before is not None and spec.img_size is not None and spec.window_size is not None:
        after = effective_windows(spec.img_size, spec.window_size, spec.patch_size, stages)
        carried = [
            p or (b if b != a else 0) for p, b, a in zip(spec.pretrained_window_sizes, before, after, strict=True)
        ]
        if carried != spec.pretrained_window_sizes:
            _log(
                f"note: windows per stage change from {before} to {after}; recording pretrained_window_sizes "
                f"{carried} so the position-bias MLP keeps the coordinates it was trained with"
            )
            spec.pretrained_window_sizes = carried
    return spec


def _has_tables(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith("attn.relative_coords_table") for k in state_dict)


def _check_flag_against_tables(
    state_dict: Mapping[str, torch.Tensor], spec: ModelSpec, flag: list[int], where: str
) -> None:
    """Refuse a --pretrained-window-sizes that does not rebuild the relative_coords_table buffers the file stores."""
    bad = []
    for i, depth in enumerate(spec.depths):
        for j in range(depth):
            key = f"layers.{i}.blocks.{j}.attn.relative_coords_table"
            if key in state_dict and not coords_table_matches(state_dict[key], flag[i], key):
                bad.append(i)
                break
    if bad:
        stored = pretrained_windows_from_tables(state_dict, list(spec.depths))
        raise ConversionError(
            f"{where}: --pretrained-window-sizes {flag} contradicts the relative_coords_table buffers stored in the "
            f"file, built with pretrained_window_sizes {stored} (0 = the stage's own window; windows per stage "
            f"{spec.window_size}); stages {bad} differ. Leave the flag out to use the stored value"
        )


def _settle_spec(
    spec: ModelSpec,
    *,
    img_size: int | None,
    window_size: Sequence[int] | None,
    pretrained: Sequence[int] | None,
    buffers: Mapping[str, torch.Tensor],
    origin: str,
    where: str,
) -> ModelSpec:
    """Apply the size flags and --pretrained-window-sizes to what the input records.

    The pretrained windows only change the position-bias MLP's coordinate normaliser. Buffers stored in official
    files are the truth: a flag that rebuilds other tables is refused. Metadata and HF configs may be wrong (imports
    used to record zeros), so the flag replaces them, with a note.

    Args:
        spec: what the input records (modified in place).
        img_size, window_size: new sizes (None: keep).
        pretrained: the --pretrained-window-sizes flag (None: keep); either is carried across a window change.
        buffers: the unprefixed backbone state dict before derived buffers are dropped.
        origin: what recorded ``spec.pretrained_window_sizes`` ("its metadata", "config.json"), "" for nothing.
        where: the input, for messages.
    """
    flag = _pretrained_flag(pretrained, len(spec.depths))
    if flag is not None:
        if _has_tables(buffers):
            _check_flag_against_tables(buffers, spec, flag, where)
        elif origin and flag != spec.pretrained_window_sizes:
            _log(
                f"note: {where}: {origin} records pretrained_window_sizes {spec.pretrained_window_sizes}; "
                f"--pretrained-window-sizes {flag} replaces it"
            )
        # The flag describes the weights as they are (the tables checked it against their windows), so a window
        # change carries it like a recorded value: a 0 becomes the stage's old window.
        spec.pretrained_window_sizes = flag
    _apply_sizes(spec, img_size, window_size)
    if flag is None and not origin and not _has_tables(buffers):
        _log(
            f"note: {where} does not record pretrained_window_sizes; recording {spec.pretrained_window_sizes}. Pass "
            f"--pretrained-window-sizes if the weights were fine-tuned from another window (e.g. 12 12 12 6 for "
            f"the 192/w12 -> 256/w16 releases)"
        )
    return spec


def _load_ours(path: Path, *, trust_pickle: bool, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Load a file that must be in our layout (backbone or SimMIM); name the right subcommand otherwise."""
    if path.is_dir():
        raise ConversionError(f"{path}: {what} reads a weights file; {_describe_directory(path)}")
    state_dict, meta, _ = load_weights_file(path, trust_pickle=trust_pickle)
    layout = detect_layout(state_dict)
    if layout not in ("ours", "simmim"):
        raise ConversionError(f"{path}: {what} needs our layout (backbone or SimMIM); {layout_hint(layout)}")
    return rename_legacy(state_dict), meta, layout


def _recorded_spec(backbone_full: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> tuple[ModelSpec, str]:
    """The model an input records: its metadata (our files), else what tensor shapes and official buffers show.

    Returns:
        (spec, what recorded its pretrained windows: "its metadata" or "" when only the buffers, if any, do).
    """
    inferred = infer_spec(backbone_full)
    if meta.get("model"):
        spec = ModelSpec.from_dict(meta["model"])
        spec.num_classes = inferred.num_classes
        return spec, "its metadata"
    return inferred, ""


def _encoder_part(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder of a SimMIM state dict, unprefixed, buffers kept (they show the sizes), mask token dropped."""
    out = {k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    out.pop("mask_token", None)
    return out


def make_backbone(
    path: str | Path,
    output: str | Path,
    *,
    img_size: int | None = None,
    window_size: Sequence[int] | None = None,
    pretrain_img_size: int | None = None,
    pretrain_window_size: Sequence[int] | None = None,
    pretrained_window_sizes: Sequence[int] | None = None,
    dtype: str | None = None,
    force: bool = False,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """SimMIM checkpoint (ours or official) -> backbone weights for fine-tuning (spec §3.8), loadable strictly.

    Args:
        path: SimMIM weights (our consolidated file or an official SimMIM .pth).
        output: weights file to write.
        img_size: fine-tuning image size (default: the pretraining one).
        window_size: fine-tuning window, one or per stage (default: the pretraining one).
        pretrain_img_size: pretraining image size when the file does not record it.
        pretrain_window_size: pretraining window when the file does not record it.
        pretrained_window_sizes: the value to record, one or per stage; by default the windows each stage ran with
            in pretraining. It stands in for unknown pretraining sizes; one that contradicts them is refused.
        dtype: fp32/bf16 (default: keep).
        force: replace an existing output.
        trust_pickle: allow Python objects in a pickled input.

    Returns:
        The metadata written, whose ``model.pretrained_window_sizes`` is the per-stage window of pretraining.
    """
    path, output = Path(path), Path(output)
    _check_output(output, force)
    state_dict, meta, layout = _load_ours(path, trust_pickle=trust_pickle, what="backbone")
    if layout != "simmim":
        raise ConversionError(
            f"{path}: already a backbone/classifier (no encoder./decoder. keys); backbone expects a SimMIM checkpoint"
        )
    # Infer from the unstripped encoder so official buffers can reveal the pretraining windows and image size.
    pre, _ = _recorded_spec(_encoder_part(state_dict), meta)
    _apply_sizes(pre, pretrain_img_size, pretrain_window_size, carry=False)
    stages = len(pre.depths)
    trained_for = None  # per stage, the window that normalised the MLP's coordinates in pretraining
    if pre.img_size is not None and pre.window_size is not None:
        ran = effective_windows(pre.img_size, pre.window_size, pre.patch_size, stages)
        # A stage of a pretraining that itself started from another window keeps that window's normalisation.
        trained_for = [p or r for p, r in zip(pre.pretrained_window_sizes, ran, strict=True)]
    flag = _pretrained_flag(pretrained_window_sizes, stages)
    spec = ModelSpec.from_dict(pre.to_dict())
    spec.num_classes = 0
    _apply_sizes(spec, img_size, window_size, carry=False)
    if flag is None:
        if trained_for is None:
            missing = " and ".join(n for n in ("img_size", "window_size") if getattr(pre, n) is None)
            raise ConversionError(
                f"{path}: finding the windows each stage ran with in pretraining needs the pretraining {missing}, "
                f"which the file does not record; pass --pretrain-img-size and --pretrain-window-size, or "
                f"--pretrained-window-sizes"
            )
        pretrained = trained_for
    else:
        if trained_for is not None:
            # 0 stands for the stage's new window: equivalent when that is the window pretraining normalised by.
            new = (
                effective_windows(spec.img_size, spec.window_size, spec.patch_size, stages)
                if spec.img_size is not None and spec.window_size is not None
                else [0] * stages
            )
            differ = [i for i in range(stages) if (flag[i] or new[i]) != trained_for[i]]
            if differ:
                raise ConversionError(
                    f"{path}: --pretrained-window-sizes {flag} contradicts the file: pretraining ran at img_size "
                    f"{pre.img_size} with windows {pre.window_size} (pretrained_window_sizes "
                    f"{pre.pretrained_window_sizes}), so the position-bias MLP was trained for windows {trained_for}; "
                    f"stages {differ} differ. Leave the flag out to record {trained_for}"
                )
        pretrained = flag
    spec.pretrained_window_sizes = pretrained
    backbone = backbone_from_simmim(state_dict)
    check_weights(backbone, spec, f"{path}: backbone weights do not fit the model")
    out_meta = {
        "kind": "backbone",
        "model": spec.to_dict(),
        "pretrain": {"img_size": pre.img_size, "window_size": pre.window_size},
        "step": meta.get("step"),
        "source": str(path),
        "dtype": dtype,
    }
    with write_atomically(output, force=force) as tmp:
        save_weights_file(tmp, backbone, out_meta, dtype=dtype)
    _log(f"backbone of {path}: {len(backbone)} tensors, pretrained_window_sizes={pretrained} -> {output}")
    return out_meta


IMPORT_SOURCES = ("official", "timm", "hf")
EXPORT_TARGETS = ("timm", "hf", "official")


def _read_hf_directory(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{path}: no config.json; an HF model directory (save_pretrained output) is expected")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "swinv2":
        raise ConversionError(f"{path}: model_type {config.get('model_type')!r}; accepted: 'swinv2'")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            state_dict, _, _ = load_weights_file(path / name)
            return state_dict, config
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            # Sharded save_pretrained output: the index maps every key to its shard file.
            shards = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
            state_dict = {}
            for shard in shards:
                state_dict.update(load_weights_file(path / shard)[0])
            return state_dict, config
    raise ConversionError(f"{path}: no model.safetensors, pytorch_model.bin or a sharded index next to config.json")


def import_weights(
    source: str,
    path: str | Path,
    output: str | Path,
    *,
    img_size: int | None = None,
    window_size: Sequence[int] | None = None,
    pretrained_window_sizes: Sequence[int] | None = None,
    dtype: str | None = None,
    force: bool = False,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Official / timm / HF weights -> ours (backbone/classifier layout, or SimMIM layout for SimMIM inputs).

    Args:
        source: official, timm or hf.
        path: a weights file (official, timm) or an HF model directory (hf).
        output: weights file to write.
        img_size: image size to record (official files with buffers and HF configs record their own).
        window_size: window to record, one or per stage.
        pretrained_window_sizes: pretrained windows to record, one or per stage (official files with
            relative_coords_table buffers and HF configs record their own; a value contradicting the buffers is
            refused).
        dtype: fp32/bf16 (default: keep).
        force: replace an existing output.
        trust_pickle: allow Python objects in a pickled input (official training checkpoints).
    """
    if source not in IMPORT_SOURCES:
        raise ConversionError(f"--from {source!r}; accepted: {', '.join(IMPORT_SOURCES)}")
    path, output = Path(path), Path(output)
    _check_output(output, force)
    hf_cfg: dict[str, Any] | None = None
    if path.is_dir():
        if source != "hf":
            raise ConversionError(f"{path}: --from {source} reads a weights file; {_describe_directory(path)}")
        state_dict, hf_cfg = _read_hf_directory(path)
    else:
        if source == "hf":
            raise ConversionError(f"{path}: --from hf reads an HF model directory (with config.json), not a file")
        state_dict, _, _ = load_weights_file(path, trust_pickle=trust_pickle)
    layout = detect_layout(state_dict)
    expected = {"official": ("ours", "simmim"), "timm": ("timm",), "hf": ("hf",)}[source]
    if layout not in expected:
        raise ConversionError(f"{path}: --from {source} given, but {layout_hint(layout)}")
    # Official files carry the derived buffers: read sizes and pretrained windows from them before dropping them.
    full: dict[str, torch.Tensor] = {}
    origin = ""
    if source == "official":
        state_dict = rename_legacy(state_dict)
        simmim = layout == "simmim"
        full = _encoder_part(state_dict) if simmim else dict(state_dict)
        spec = infer_spec(full)
        converted = strip_derived_buffers(state_dict)
    elif source == "timm":
        converted = timm_to_official(state_dict)
        simmim = False
        spec = infer_spec(converted)
    else:
        converted = hf_to_official(state_dict)
        simmim = any(k.startswith("decoder.") for k in converted)
        if simmim:
            converted = {(k if k.startswith("decoder.") else "encoder." + k): v for k, v in converted.items()}
        backbone_part = backbone_from_simmim(converted) if simmim else converted
        spec = spec_from_hf_config(hf_cfg or {}, num_classes=infer_spec(backbone_part).num_classes)
        origin = "config.json"
    _settle_spec(
        spec,
        img_size=img_size,
        window_size=window_size,
        pretrained=pretrained_window_sizes,
        buffers=full,
        origin=origin,
        where=str(path),
    )
    check_weights(converted, spec, f"{path}: imported weights do not fit our SwinV2", simmim=simmim)
    if spec.img_size is None or spec.window_size is None:
        _log(f"note: {path} does not record img_size/window_size; pass --img-size/--window-size to store them")
    meta = {"kind": "simmim" if simmim else "backbone", "model": spec.to_dict(), "source": f"{source}:{path}"}
    with write_atomically(output, force=force) as tmp:
        save_weights_file(tmp, converted, meta, dtype=dtype)
    _log(f"imported {source} {path} ({len(converted)} tensors) -> {output}")
    return meta


def export(
    target: str,
    path: str | Path,
    output: str | Path,
    *,
    img_size: int | None = None,
    window_size: Sequence[int] | None = None,
    pretrained_window_sizes: Sequence[int] | None = None,
    dtype: str | None = None,
    force: bool = False,
) -> Path:
    """Ours -> timm weights file, HF model directory (config.json + model.safetensors) or official .pth.

    Args:
        target: timm, hf or official.
        path: our weights file (backbone/classifier or SimMIM).
        output: file (timm, official) or directory (hf).
        img_size: override the recorded image size (HF config, official buffers).
        window_size: override the recorded window; a stage whose window changes keeps its position-bias
            normalisation (its old window becomes its pretrained window when none is recorded).
        pretrained_window_sizes: override the recorded pretrained windows, one or per stage.
        dtype: fp32/bf16 (default: keep).
        force: replace an existing output.
    """
    if target not in EXPORT_TARGETS:
        raise ConversionError(f"--to {target!r}; accepted: {', '.join(EXPORT_TARGETS)}")
    path, output = Path(path), Path(output)
    _check_output(output, force, weights_file=target != "hf")
    state_dict, meta, layout = _load_ours(path, trust_pickle=False, what="export")
    simmim = layout == "simmim"
    # Before dropping the buffers: an official-layout input shows its sizes and pretrained windows in them.
    full = _encoder_part(state_dict) if simmim else state_dict
    spec, origin = _recorded_spec(full, meta)
    _settle_spec(
        spec,
        img_size=img_size,
        window_size=window_size,
        pretrained=pretrained_window_sizes,
        buffers=full,
        origin=origin,
        where=str(path),
    )
    state_dict = strip_derived_buffers(state_dict)
    backbone = backbone_from_simmim(state_dict) if simmim else state_dict
    check_weights(state_dict, spec, f"{path}: weights do not match their recorded model", simmim=simmim)
    if target == "timm":
        if simmim:
            _log("note: timm's SwinTransformerV2 has no SimMIM parts; exporting the encoder only")
        problems = []
        if spec.ape:
            problems.append("ape=True (timm's V2 has no absolute position embedding)")
        if spec.extra_norm_every:
            problems.append(f"extra_norm_every={spec.extra_norm_every}")
        if problems:
            raise ConversionError(f"cannot express this model in timm's SwinTransformerV2: {', '.join(problems)}")
        out_meta = {"kind": "timm", "model": spec.to_dict(), "source": str(path)}
        with write_atomically(output, force=force) as tmp:
            save_weights_file(tmp, official_to_timm(backbone), out_meta, dtype=dtype, pth_wrapper=None)
    elif target == "hf":
        if simmim:
            arch = "Swinv2ForMaskedImageModeling"
        elif spec.num_classes:
            arch = "Swinv2ForImageClassification"
        else:
            arch = "Swinv2Model"
        config = hf_config(spec, arch)
        source = dict(backbone)
        if simmim:
            source["mask_token"] = state_dict["encoder.mask_token"]
            source.update({k: v for k, v in state_dict.items() if k.startswith("decoder.")})
        hf_state = official_to_hf(source, prefixed=arch != "Swinv2Model")
        if dtype is not None:
            stored = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        else:
            kinds = {v.dtype for v in hf_state.values() if v.is_floating_point()}
            stored = str(kinds.pop()).replace("torch.", "") if len(kinds) == 1 else None
        if stored is not None:
            # transformers >= 4.56 reads "dtype", older versions (this project accepts >= 4.45) "torch_dtype".
            config["dtype"] = config["torch_dtype"] = stored
        with write_atomically(output, force=force, directory=True) as tmp:
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            save_weights_file(tmp / "model.safetensors", hf_state, None, dtype=dtype)
    else:
        if spec.extra_norm_every:
            raise ConversionError(f"extra_norm_every={spec.extra_norm_every} has no counterpart in the official code")
        spec.require_sizes("export to the official layout (its state dict holds the derived buffers)")
        # Weights stay on the meta device (no memory); only the small derived buffers are built for real.
        model = spec.build("meta")
        model.reset_derived_buffers(device="cpu")
        prefix = "encoder." if simmim else ""
        full = dict(state_dict)
        # The official model keeps the derived buffers persistent: include them so its load_state_dict(strict=True)
        # accepts the file.
        full.update({prefix + k: v for k, v in official_buffers(model).items()})
        out_meta = {"kind": "official-simmim" if simmim else "official", "model": spec.to_dict(), "source": str(path)}
        with write_atomically(output, force=force) as tmp:
            save_weights_file(tmp, full, out_meta, dtype=dtype, pth_wrapper="model")
    _log(f"exported {path} -> {target} {output}")
    return output


# ------------------------------------------------------------------------------------------------------- inspect
def _describe_directory(path: Path) -> str:
    if (path / "config.json").is_file():
        return "this is an HF model directory: use `import --from hf`"
    if (
        _is_tag_dir(path)
        or (path / "checkpoints").is_dir()
        or any(p.is_dir() and _is_tag_dir(p) for p in path.iterdir())
    ):
        return "this is a DeepSpeed checkpoint directory: use `consolidate` (or `universal`)"
    return "this directory holds no checkpoint this tool knows"


def _tensor_summary(shapes: Mapping[str, tuple[tuple[int, ...], str]]) -> list[str]:
    total = sum(math.prod(s) for s, _ in shapes.values())
    dtypes: dict[str, int] = {}
    for _, dt in shapes.values():
        dtypes[dt] = dtypes.get(dt, 0) + 1
    groups: dict[str, int] = {}
    for key in shapes:
        head = key.split(".")[0] if not key.startswith(("encoder.", "swinv2.")) else ".".join(key.split(".")[:2])
        groups[head] = groups.get(head, 0) + 1
    layout = detect_layout(list(shapes))
    return [
        f"layout: {layout} ({layout_hint(layout)})",
        f"tensors: {len(shapes)}  elements: {total:,}  dtypes: {dtypes}",
        "key groups: " + ", ".join(f"{k} ({n})" for k, n in sorted(groups.items())),
    ]


def inspect_path(path: str | Path, *, trust_pickle: bool = False) -> list[str]:
    """Describe a checkpoint file or directory (headers only for safetensors; mmap for pickles).

    Args:
        path: weights file, HF model directory, or DeepSpeed tag/checkpoints/run directory.
        trust_pickle: allow Python objects in a pickled file (official training checkpoints).

    Returns:
        The lines printed by ``inspect``.
    """
    path = Path(path)
    lines = [f"path: {path}"]
    if path.is_dir():
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
            lines.append(
                f"format: HF model directory, {config.get('architectures')} model_type={config.get('model_type')}"
            )
            for key in ("image_size", "window_size", "pretrained_window_sizes", "embed_dim", "depths", "num_heads"):
                lines.append(f"  {key}: {config.get(key)}")
            weights = path / "model.safetensors"
            if weights.is_file():
                lines += ["  " + line for line in inspect_path(weights)[1:]]
            return lines
        from pretrain.checkpoint import is_complete

        if _is_tag_dir(path):
            tag_dirs = [path]
        else:
            ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
            tag_dirs = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and _is_tag_dir(p)), key=_tag_order)
        if not tag_dirs:
            raise ConversionError(f"{path}: {_describe_directory(path)}")
        lines.append("format: DeepSpeed checkpoint directory")
        for tag_dir in tag_dirs:
            files = sorted(p.name for p in tag_dir.iterdir())
            size = sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file())
            state = read_client_state(tag_dir)
            complete = "complete" if is_complete(tag_dir) else "INCOMPLETE (no COMPLETE marker)"
            universal = " universal" if (tag_dir / "UNIVERSAL").exists() else ""
            lines.append(
                f"  {tag_dir.name}: {complete}{universal}; step={state.get('step')} "
                f"world_size={state.get('world_size')} zero_stage={state.get('zero_stage')} "
                f"size={size / 2**20:.1f} MiB files={len(files)}"
            )
        return lines
    if not path.is_file():
        raise ConversionError(f"{path}: no such file or directory")
    lines.append(f"size: {path.stat().st_size / 2**20:.2f} MiB")
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            names = list(handle.keys())  # safe_open has keys() but no __iter__
            shapes = {k: (tuple(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype()) for k in names}
        meta = json.loads(header[META_KEY]) if META_KEY in header else {}
        lines.append("format: safetensors (header read only)")
    else:
        state_dict, meta, extra = load_weights_file(path, trust_pickle=trust_pickle)
        shapes = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state_dict.items()}
        lines.append("format: torch pickle (memory-mapped)" + (f"; other entries: {sorted(extra)}" if extra else ""))
    lines += _tensor_summary(shapes)
    if meta:
        model = meta.get("model", {})
        lines.append(f"kind: {meta.get('kind')}  step: {meta.get('step')}  dtype: {meta.get('dtype')}")
        lines.append(
            "model: "
            + " ".join(
                f"{k}={model.get(k)}"
                for k in ("embed_dim", "depths", "num_heads", "img_size", "window_size", "pretrained_window_sizes")
            )
        )
        if meta.get("source"):
            lines.append(f"source: {meta['source']}")
    else:
        lines.append("metadata: none (not written by this tool)")
    return lines


def _tag_order(path: Path) -> tuple[int, str]:
    digits = "".join(ch for ch in path.name.split("-")[-1] if ch.isdigit())
    return (int(digits) if digits else -1, path.name)


# ----------------------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swinv2-convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def out_args(p: argparse.ArgumentParser, dtype_default: str | None) -> None:
        p.add_argument("-o", "--output", required=True, help="output path (.safetensors default; .pth on request)")
        p.add_argument("--force", action="store_true", help="replace an existing output")
        p.add_argument("--dtype", choices=DTYPES, default=dtype_default, help="floating-point dtype of the output")

    def size_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--img-size", type=int, help="image size (when the input does not record it, or a new one)")
        p.add_argument("--window-size", type=int, nargs="+", help="window size, one or one per stage")
        p.add_argument(
            "--pretrained-window-sizes",
            type=int,
            nargs="+",
            help="windows the position-bias MLP was trained with, one or one per stage (0 = the stage's own window); "
            "checked against relative_coords_table buffers the input stores",
        )

    p = sub.add_parser("consolidate", help="DeepSpeed checkpoint (any ZeRO stage/world size) -> one weights file")
    p.add_argument("checkpoint", help="step-<N> directory, checkpoints directory or run directory")
    p.add_argument("--tag", help="checkpoint tag (default: newest complete)")
    out_args(p, "fp32")

    p = sub.add_parser("backbone", help="SimMIM checkpoint -> backbone weights for fine-tuning")
    p.add_argument("input", help="our consolidated SimMIM file or an official SimMIM .pth")
    out_args(p, None)
    size_args(p)
    p.add_argument("--pretrain-img-size", type=int, help="pretraining image size if the input does not record it")
    p.add_argument("--pretrain-window-size", type=int, nargs="+", help="pretraining window if not recorded")
    p.add_argument("--trust-pickle", action="store_true", help="allow Python objects in a .pth (trusted files only)")

    p = sub.add_parser("import", help="official / timm / HF weights -> ours")
    p.add_argument("--from", dest="source", required=True, choices=IMPORT_SOURCES)
    p.add_argument("input", help="weights file (official, timm) or HF model directory (hf)")
    out_args(p, None)
    size_args(p)
    p.add_argument("--trust-pickle", action="store_true", help="allow Python objects in a .pth (trusted files only)")

    p = sub.add_parser("export", help="ours -> timm / HF / official")
    p.add_argument("--to", dest="target", required=True, choices=EXPORT_TARGETS)
    p.add_argument("input", help="our weights file (backbone or SimMIM)")
    out_args(p, None)
    size_args(p)

    p = sub.add_parser("universal", help="DeepSpeed checkpoint -> universal checkpoint (resume at another world size)")
    p.add_argument("checkpoint", help="step-<N> directory, checkpoints directory or run directory")
    p.add_argument("--tag", help="checkpoint tag (default: newest complete)")
    p.add_argument("-o", "--output", help="output tag directory (default: <tag>_universal next to it)")
    p.add_argument("--force", action="store_true", help="replace an existing output")

    p = sub.add_parser("inspect", help="show what a checkpoint file or directory holds")
    p.add_argument("path")
    p.add_argument("--trust-pickle", action="store_true", help="allow Python objects in a .pth (trusted files only)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pretrain.convert`` / ``swinv2-convert``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "consolidate":
            consolidate(args.checkpoint, args.output, tag=args.tag, dtype=args.dtype, force=args.force)
        elif args.command == "backbone":
            make_backbone(
                args.input,
                args.output,
                img_size=args.img_size,
                window_size=args.window_size,
                pretrain_img_size=args.pretrain_img_size,
                pretrain_window_size=args.pretrain_window_size,
                pretrained_window_sizes=args.pretrained_window_sizes,
                dtype=args.dtype,
                force=args.force,
                trust_pickle=args.trust_pickle,
            )
        elif args.command == "import":
            import_weights(
                args.source,
                args.input,
                args.output,
                img_size=args.img_size,
                window_size=args.window_size,
                pretrained_window_sizes=args.pretrained_window_sizes,
                dtype=args.dtype,
                force=args.force,
                trust_pickle=args.trust_pickle,
            )
        elif args.command == "export":
            export(
                args.target,
                args.input,
                args.output,
                img_size=args.img_size,
                window_size=args.window_size,
                pretrained_window_sizes=args.pretrained_window_sizes,
                dtype=args.dtype,
                force=args.force,
            )
        elif args.command == "universal":
            to_universal(args.checkpoint, args.output, tag=args.tag, force=args.force)
        else:
            print("\n".join(inspect_path(args.path, trust_pickle=args.trust_pickle)))
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
