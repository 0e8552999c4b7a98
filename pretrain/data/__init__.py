"""Pretraining and labelled data: webdataset tar shards (local or remote, single or weighted mixtures) and image
folders, the SimMIM transform, and DataLoaders whose workers leave signals to the main process.

The trainer resolves the data once (:func:`resolve_source`: lists, probes and counts; DataError early), then builds
each epoch's loader from it (:func:`build_pretrain_loader`). Batches are dicts of tensors plus plain-Python
bookkeeping: ``skipped`` (unreadable samples replaced in this batch) and, for mixtures, ``sources``.

Modules: :mod:`.config` (config sections, DataError), :mod:`.images` (decoding, :func:`to_rgb`), :mod:`.urls`
(locations, patterns, remote reads), :mod:`.source` (resolution), :mod:`.folder`, :mod:`.stream` (shard streams),
:mod:`.mixture`, :mod:`.transform`, :mod:`.loader`, :mod:`.labelled`.
"""

from .config import DataConfig, DataError, LabelledDataConfig, SourceConfig
from .images import ALPHA_BACKGROUND, IMAGE_EXTENSIONS, SHARD_IMAGE_KEYS, decode_image, open_image, to_rgb
from .labelled import (
    CLASS_INDEX,
    LabelledSource,
    build_classification_loader,
    build_eval_loader,
    resolve_labelled_source,
)
from .loader import build_pretrain_loader, steps_per_epoch, worker_context
from .source import SIZE_INDEX, DataSource, ShardSet, list_images, list_relative, read_size_index, resolve_source
from .transform import SimMIMTransform
from .urls import expand_shards, filesystem, url_kind

__all__ = [
    "ALPHA_BACKGROUND",
    "CLASS_INDEX",
    "IMAGE_EXTENSIONS",
    "SHARD_IMAGE_KEYS",
    "SIZE_INDEX",
    "DataConfig",
    "DataError",
    "DataSource",
    "LabelledDataConfig",
    "LabelledSource",
    "ShardSet",
    "SimMIMTransform",
    "SourceConfig",
    "build_classification_loader",
    "build_eval_loader",
    "build_pretrain_loader",
    "decode_image",
    "expand_shards",
    "filesystem",
    "list_images",
    "list_relative",
    "open_image",
    "read_size_index",
    "resolve_labelled_source",
    "resolve_source",
    "steps_per_epoch",
    "to_rgb",
    "url_kind",
    "worker_context",
]
