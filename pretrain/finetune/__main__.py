"""Entry point: ``python -m pretrain.finetune --config CONFIG [section.key=value ...]`` (fine-tuning, linear probe
with ``finetune.mode=linear``), or ``--eval-only PATH`` to evaluate a checkpoint or exported classifier.

Works unchanged without a launcher, under torchrun, the deepspeed launcher and srun, like ``python -m pretrain``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import NoReturn

from ..checks import ConfigError
from ..distributed import LaunchEnv, LaunchError, finish_process, leave_process_group, resolve_launch_env
from .config import FinetuneConfig, load_finetune_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.finetune", description="Fine-tune or linear-probe a SwinV2 classifier on DeepSpeed"
    )
    parser.add_argument("--config", help="YAML recipe from configs/ (defaults apply without one)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument(
        "--eval-only",
        metavar="PATH",
        help="evaluate this classifier on data.val_path and exit: a DeepSpeed checkpoint (tag, checkpoints or run "
        "folder), a weights file (ours, timm) or an HF model directory",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. finetune.mode=linear")
    return parser


def _train(cfg: FinetuneConfig, launch: LaunchEnv) -> int:
    """``pretrain.trainer.run`` with the task's start-up notes in the run's log."""
    from ..stopping import EXIT_INTERRUPTED, exit_code_for
    from ..trainer import Trainer
    from .task import FinetuneTask

    task = FinetuneTask(cfg)
    trainer = Trainer(cfg, launch, task)
    for note in task.notes:
        trainer.metrics.message(note)
    code = 1
    try:
        code = trainer.train()
    except KeyboardInterrupt as exc:
        trainer.record_error(exc)
        code = EXIT_INTERRUPTED
        raise
    except BaseException as exc:
        trainer.record_error(exc)
        code = exit_code_for(exc)
        raise
    finally:
        trainer.close(code)
    leave_process_group()
    return code


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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        cfg = load_finetune_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr, flush=True)
        return 2
    if args.print_config:
        from ..config import to_yaml

        print(to_yaml(cfg), end="")
        return 0
    try:
        launch = resolve_launch_env(local_rank_arg=args.local_rank)
    except LaunchError as exc:
        print(f"launch error: {exc}", file=sys.stderr, flush=True)
        return 2
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    from ..stopping import EXIT_INTERRUPTED, NonFiniteError, PeerFailure, exit_code_for

    try:
        return _eval_only(cfg, launch, args.eval_only) if args.eval_only else _train(cfg, launch)
    except KeyboardInterrupt:
        print("interrupted (second SIGINT): stopped without saving", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as exc:
        code = exit_code_for(exc)
        if code == 1 and not isinstance(exc, (NonFiniteError, PeerFailure)):
            raise  # unexpected: cli() prints the traceback
        prefix = "config error" if isinstance(exc, ConfigError) else "error"
        print(f"{prefix}: {exc}", file=sys.stderr, flush=True)
        return code


def cli() -> NoReturn:
    """``python -m pretrain.finetune``: ``main()``, then the process ends through ``finish_process``."""
    try:
        code = main()
    except Exception:
        traceback.print_exc()
        code = 1
    finish_process(code)


if __name__ == "__main__":
    cli()
