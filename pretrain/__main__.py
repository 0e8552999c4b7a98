"""Entry point: ``python -m pretrain --config CONFIG [section.key=value ...]`` (console script swinv2-pretrain).

Works unchanged without a launcher, under torchrun, the deepspeed launcher (``deepspeed --module pretrain``) and srun.
Exit codes and messages: :mod:`pretrain.entry`.
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from .config import load_config
from .distributed import LaunchEnv
from .entry import add_common_arguments, end_process, run_entry


def _pretrain(cfg: Any, launch: LaunchEnv, args: argparse.Namespace) -> int:
    from .tasks.simmim import SimMIMTask
    from .trainer import run

    return run(cfg, launch, SimMIMTask(cfg))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description="SimMIM pretraining of SwinV2 on DeepSpeed")
    add_common_arguments(parser, "training.max_steps=10")
    return run_entry(parser, argv, load_config, _pretrain)


def cli() -> NoReturn:
    """``python -m pretrain`` and the ``swinv2-pretrain`` console script: ``main()``, then the process ends through
    ``finish_process`` with main's exit code (1 after an unexpected error, whose traceback is printed first)."""
    end_process(main)


if __name__ == "__main__":
    cli()
