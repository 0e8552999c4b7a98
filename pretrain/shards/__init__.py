"""The shard writer: ``python -m pretrain.shards SRC OUT_DIR`` (see :mod:`pretrain.shards.cli`)."""

from .cli import main
from .writer import STAGING, PackOptions, ShardError, ShardReport, write_shards

__all__ = ["STAGING", "PackOptions", "ShardError", "ShardReport", "main", "write_shards"]
