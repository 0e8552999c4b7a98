"""What the command-line entry points share (``python -m pretrain``, ``python -m pretrain.finetune``): the common
arguments, loading the config, the launch environment, exit codes and messages, and how the process ends.

Exit codes: 0 done; 2 an error the user must fix (config, launch environment, data, checkpoint choice, run lock),
printed as one line; 75 and 130 after a stop signal (see :mod:`pretrain.stopping`); 1 anything else, with its
traceback unless its message says everything (too many non-finite steps, a peer rank's failure).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from .checks import ConfigError
from .config import to_yaml
from .distributed import LaunchEnv, LaunchError, finish_process, resolve_launch_env

__all__ = ["add_common_arguments", "config_from_arguments", "end_process", "run_entry"]


def add_common_arguments(parser: argparse.ArgumentParser, override_example: str) -> None:
    """``--config``, ``--print-config``, the deepspeed launcher's ``--local_rank`` and the overrides."""
    parser.add_argument("--config", help="YAML recipe from configs/ (defaults apply without one)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help=f"section.key=value overrides, e.g. {override_example}")


def config_from_arguments(args: argparse.Namespace, load: Callable[[str | None, list[str]], Any]) -> Any:
    """The config that ``args`` (of :func:`add_common_arguments`) names, loaded with ``load``; instead, an exit code
    when it is refused (2, the error printed as one line) or only printed (``--print-config``: 0)."""
    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr, flush=True)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    return cfg


def run_entry(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    load: Callable[[str | None, list[str]], Any],
    work: Callable[[Any, LaunchEnv, argparse.Namespace], int],
) -> int:
    """Parse ``argv``, load the config with ``load`` (or print it), resolve the launch environment, then
    ``work(cfg, launch, args)``; returns the exit code (module docstring).

    Unexpected errors propagate: :func:`end_process` prints their traceback.
    """
    # Intermixed: overrides may come before and after the options (`python -m pretrain a=1 --config X b=2`); plain
    # parse_args stops collecting the positional list at the first option and rejects the rest.
    args = parser.parse_intermixed_args(argv)
    cfg = config_from_arguments(args, load)
    if isinstance(cfg, int):
        return cfg
    try:
        launch = resolve_launch_env(local_rank_arg=args.local_rank)
    except LaunchError as exc:
        print(f"launch error: {exc}", file=sys.stderr, flush=True)
        return 2
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    from .stopping import EXIT_INTERRUPTED, NonFiniteError, PeerFailure, exit_code_for

    try:
        return work(cfg, launch, args)
    except KeyboardInterrupt:
        print("interrupted (second SIGINT): stopped without saving", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as exc:
        code = exit_code_for(exc)
        if code == 1 and not isinstance(exc, (NonFiniteError, PeerFailure)):
            raise  # unexpected: end_process prints the traceback
        prefix = "config error" if isinstance(exc, ConfigError) else "error"
        print(f"{prefix}: {exc}", file=sys.stderr, flush=True)
        return code


def end_process(main: Callable[[], int]) -> NoReturn:
    """Run ``main()``, then end the process through ``finish_process`` with its exit code (1 after an unexpected
    error, whose traceback is printed first)."""
    try:
        code = main()
    except Exception:
        traceback.print_exc()
        code = 1
    finish_process(code)
