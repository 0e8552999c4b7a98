"""Entry point: ``python -m pretrain --config CONFIG [section.key=value ...]`` (console script swinv2-pretrain).

Works unchanged without a launcher, under torchrun, the deepspeed launcher (``deepspeed --module pretrain``) and srun.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import NoReturn

from .config import ConfigError, load_config, to_yaml
from .distributed import LaunchError, finish_process, resolve_launch_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description="SimMIM pretraining of SwinV2 on DeepSpeed")
    parser.add_argument("--config", help="YAML recipe from configs/ (defaults apply without one)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. training.max_steps=10")
    # Intermixed: overrides may come before and after the options (`python -m pretrain a=1 --config X b=2`); plain
    # parse_args stops collecting the positional list at the first option and rejects the rest.
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr, flush=True)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0

    try:
        launch = resolve_launch_env(local_rank_arg=args.local_rank)
    except LaunchError as exc:
        print(f"launch error: {exc}", file=sys.stderr, flush=True)
        return 2
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    from .stopping import EXIT_INTERRUPTED, exit_code_for
    from .tasks.simmim import SimMIMTask
    from .trainer import run

    try:
        return run(cfg, launch, SimMIMTask(cfg))
    except KeyboardInterrupt:
        print("interrupted (second SIGINT): stopped without saving", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as exc:
        code = exit_code_for(exc)
        if code == 1 and not _expected(exc):
            raise  # unexpected: cli() prints the traceback
        prefix = "config error" if type(exc).__name__ == "ConfigError" else "error"
        print(f"{prefix}: {exc}", file=sys.stderr, flush=True)
        return code


def _expected(exc: BaseException) -> bool:
    """Errors whose message says everything (no traceback needed)."""
    from .stopping import NonFiniteError, PeerFailure

    return isinstance(exc, (NonFiniteError, PeerFailure))


def cli() -> NoReturn:
    """``python -m pretrain`` and the ``swinv2-pretrain`` console script: ``main()``, then the process ends through
    ``finish_process`` with main's exit code (1 after an unexpected error, whose traceback is printed first)."""
    try:
        code = main()
    except Exception:
        traceback.print_exc()
        code = 1
    finish_process(code)


if __name__ == "__main__":
    cli()
