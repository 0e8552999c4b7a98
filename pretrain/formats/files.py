"""Weights files: safe, memory-mapped reading with one-line errors for damaged files, and atomic writing."""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_output
from .common import META_KEY, SAFETENSORS_SUFFIXES, ConversionError, short_list
from .layouts import layout_hint

__all__ = ["cast_fn", "load_weights_file", "save_weights_file", "torch_file_kind", "write_atomically"]

# What torch's legacy (pre-1.6) serialization writes first: a pickled magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def torch_file_kind(path: str | Path) -> str | None:
    """ "zip" (torch >= 1.6 format, checked to end with its zip directory), "legacy" (a pre-1.6 pickle), or None for
    a file that is neither: empty, cut short, or something else.

    Cheap: a zip archive is recognised by its central directory at the end of the file, which a truncated file has
    lost; only the last kilobytes are read.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            return "zip"
        with open(path, "rb") as handle:
            head = handle.read(len(_LEGACY_MAGIC))
    except OSError:
        return None
    return "legacy" if head == _LEGACY_MAGIC else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            names = list(handle.keys())  # safe_open has keys() but no __iter__
            tensors = {k: handle.get_tensor(k) for k in names}
        meta = json.loads(header[META_KEY]) if META_KEY in header else {}
    except Exception as err:  # SafetensorError for a bad header or a file shorter than its header says
        raise ConversionError(
            f"{path}: not a readable safetensors file ({_first_line(err)}); it is damaged or was cut short "
            f"({path.stat().st_size} bytes)"
        ) from None
    return tensors, meta


def load_weights_file(
    path: str | Path, *, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a weights file without copying it into memory where the format allows it.

    safetensors are memory-mapped; pickled files go through ``torch.load(mmap=True, weights_only=True)``.

    Args:
        path: a .safetensors file or a torch pickle (.pth/.pt/.bin/.ckpt).
        trust_pickle: allow arbitrary Python objects in a pickle (official training checkpoints store a yacs
            config object); only for files you trust.

    Returns:
        (state_dict, our metadata or {}, other top-level entries of a pickle container such as ``config``).

    Raises:
        ConversionError: a missing, empty, damaged or truncated file, named, or one that holds no weights.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.name.endswith(("model_states.pt", "optim_states.pt")):
        raise ConversionError(f"{path}: {layout_hint('deepspeed-model-states')}")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path}: the file is empty (0 bytes); it was cut short or never written")
    if path.suffix in SAFETENSORS_SUFFIXES:
        tensors, meta = _read_safetensors(path)
        return tensors, meta, {}
    obj = _torch_load(path, trust_pickle=trust_pickle)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors or a checkpoint dict")
    meta = dict(obj.get(META_KEY) or {})
    for container in ("model", "state_dict", "module"):
        inner = obj.get(container)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            if container == "module" and ("buffer_names" in obj or "ds_version" in obj):
                raise ConversionError(f"{path}: {layout_hint('deepspeed-model-states')}")
            extra = {k: v for k, v in obj.items() if k not in (container, META_KEY)}
            return dict(inner), meta, extra
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConversionError(f"{path}: no tensors found (top-level keys: {short_list(sorted(map(str, obj)))})")
    return tensors, meta, {}


def _torch_load(path: Path, *, trust_pickle: bool) -> Any:
    kind = torch_file_kind(path)
    if kind is None:
        raise ConversionError(
            f"{path}: not a torch checkpoint: neither a zip archive (the format of torch >= 1.6, whose directory "
            f"sits at the end of the file) nor a legacy torch pickle ({path.stat().st_size} bytes); the file is "
            f"damaged, was cut short, or is in another format"
        )
    try:
        # The legacy (pre-1.6) format cannot be memory-mapped.
        return torch.load(path, map_location="cpu", mmap=kind == "zip", weights_only=not trust_pickle)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError depending on the content
        found = _UNSUPPORTED_GLOBAL.search(str(err))
        # torch's own classes are always allowed: naming one means the pickle stream broke off inside its name.
        if not trust_pickle and found and not found.group(1).startswith("torch."):
            raise ConversionError(
                f"{path}: the pickle holds Python objects besides tensors ({found.group(1)}; official training "
                f"checkpoints keep a config object); rerun with --trust-pickle if you trust where the file comes from"
            ) from err
        raise ConversionError(
            f"{path}: cannot be read as a torch checkpoint ({_first_line(err)}); the file is damaged or was cut short"
        ) from err


@contextmanager
def write_atomically(output: Path, *, force: bool, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``output``; rename it onto ``output`` only when the body succeeds
    (:func:`pretrain.atomic.atomic_output`).

    Args:
        output: final file or directory.
        force: replace an existing output; without it an existing output raises before any work.
        directory: the temporary path is a fresh directory (HF exports, universal checkpoints).
    """
    output = Path(output)
    if output.exists() and not force:
        raise ConversionError(f"{output} exists; pass --force to replace it")
    with atomic_output(output, replace=True, directory=directory) as tmp:
        yield tmp


def _saveable(state_dict: Mapping[str, torch.Tensor], cast: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """Contiguous tensors that own their storage (safetensors refuses shared memory), cast as asked."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in state_dict.items():
        value = cast(value.detach()).contiguous()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        if ident in seen or value.untyped_storage().nbytes() != value.numel() * value.element_size():
            value = value.clone()
        seen.add(ident)
        out[key] = value
    return out


def cast_fn(dtype: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Cast floating tensors to fp32/bf16/fp16 (None: keep); integer tensors are never cast."""
    if dtype is None:
        return lambda t: t
    target = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return lambda t: t.to(target) if t.is_floating_point() else t


def save_weights_file(
    path: Path,
    state_dict: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any] | None,
    *,
    dtype: str | None = None,
    pth_wrapper: str | None = "model",
) -> None:
    """Write weights to ``path`` (format from the suffix: .safetensors, or a torch pickle).

    Args:
        path: destination (write through :func:`write_atomically`).
        state_dict: tensors to save.
        meta: our metadata (JSON-able), stored in the safetensors header or next to the weights in the pickle.
        dtype: fp32/bf16/fp16 for floating tensors; None keeps them.
        pth_wrapper: pickles store ``{pth_wrapper: state_dict, META_KEY: meta}`` (official style ``model``), or the
            bare state dict when None.
    """
    tensors = _saveable(state_dict, cast_fn(dtype))
    if Path(path).suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import save_file

        header = {"format": "pt"}
        if meta is not None:
            header[META_KEY] = json.dumps(meta, default=str)
        save_file(tensors, str(path), metadata=header)
    else:
        if pth_wrapper is None:
            torch.save(tensors, path)
        else:
            obj: dict[str, Any] = {pth_wrapper: tensors}
            if meta is not None:
                obj[META_KEY] = json.loads(json.dumps(meta, default=str))
            torch.save(obj, path)
