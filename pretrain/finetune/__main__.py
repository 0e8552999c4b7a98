"""Entry point: ``python -m pretrain.finetune --config CONFIG [section.key=value ...]`` (fine-tuning, linear probe
with ``finetune.mode=linear``), or ``--eval-only PATH`` to evaluate a checkpoint or exported classifier.

Works unchanged without a launcher, under torchrun, the deepspeed launcher and srun, like ``python -m pretrain``.
Exit codes and messages: :mod:`pretrain.entry`.
"""

from __future__ import annotations

import argparse
import json
from typing import NoReturn

from ..distributed import LaunchEnv, leave_process_group
from ..entry import add_common_arguments, end_process, run_entry
from .config import FinetuneConfig, load_finetune_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.finetune", description="Fine-tune or linear-probe a SwinV2 classifier on DeepSpeed"
    )
    parser.add_argument(
        "--eval-only",
        metavar="PATH",
        help="evaluate this classifier on data.val_path and exit: a DeepSpeed checkpoint (tag, checkpoints or run "
        "folder), a weights file (ours, timm) or an HF model directory",
    )
    add_common_arguments(parser, "finetune.mode=linear")
    return parser


def _eval_only(cfg: FinetuneConfig, launch: LaunchEnv, path: str) -> int:
    from ..distributed import init_process_group
    from ..engine import backend_for, resolve_device
    from .eval_only import evaluate_path

    if launch.world_size > 1:
        init_process_group(backend_for(cfg, resolve_device(cfg, launch.local_rank)), cfg.distributed.timeout_minutes)
    metrics = evaluate_path(cfg, path, launch)
    if launch.rank == 0:
        print(json.dumps(metrics), flush=True)
    if launch.world_size > 1:
        leave_process_group()
    return 0


def _finetune(cfg: FinetuneConfig, launch: LaunchEnv, args: argparse.Namespace) -> int:
    if args.eval_only:
        return _eval_only(cfg, launch, args.eval_only)
    from ..trainer import run
    from .task import FinetuneTask

    return run(cfg, launch, FinetuneTask(cfg))


def main(argv: list[str] | None = None) -> int:
    return run_entry(_parser(), argv, load_finetune_config, _finetune)


def cli() -> NoReturn:
    """``python -m pretrain.finetune`` and the ``swinv2-finetune`` console script: ``main()``, then the process ends
    through ``finish_process``."""
    end_process(main)


if __name__ == "__main__":
    cli()
