"""The command line: one table of subcommands, each with its arguments and the function it runs.

Every option's destination is the name of the function's parameter it fills, so the parsed options are passed to
the function as they are.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..checkpoint import CheckpointError, to_universal
from ..formats import ConversionError
from .backbone import make_backbone
from .common import DTYPES
from .consolidate import consolidate
from .export import EXPORT_TARGETS, export
from .imports import IMPORT_SOURCES, import_weights
from .inspect import inspect_path

__all__ = ["COMMANDS", "DESCRIPTION", "main"]

DESCRIPTION = (
    "Checkpoint conversion: ``python -m pretrain.convert SUBCOMMAND ...`` (console script ``swinv2-convert``)."
)


def _output(p: argparse.ArgumentParser, dtype_default: str | None) -> None:
    p.add_argument("-o", "--output", required=True, help="output path (.safetensors default; .pth on request)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--dtype", choices=DTYPES, default=dtype_default, help="floating-point dtype of the output")


def _sizes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--img-size", type=int, help="image size (when the input does not record it, or a new one)")
    p.add_argument("--window-size", type=int, nargs="+", help="window size, one or one per stage")
    p.add_argument(
        "--pretrained-window-sizes",
        type=int,
        nargs="+",
        help="windows the position-bias MLP was trained with, one or one per stage (0 = the stage's own window); "
        "checked against relative_coords_table buffers the input stores",
    )


def _trust(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-pickle", action="store_true", help="allow Python objects in a .pth (trusted files only)")


def _checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="checkpoint", help="step-<N> directory, checkpoints directory or run directory")
    p.add_argument("--tag", help="checkpoint tag (default: newest complete)")


def _consolidate_args(p: argparse.ArgumentParser) -> None:
    _checkpoint(p)
    _output(p, "fp32")


def _backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="input", help="our consolidated SimMIM file or an official SimMIM .pth")
    _output(p, None)
    _sizes(p)
    p.add_argument("--pretrain-img-size", type=int, help="pretraining image size if the input does not record it")
    p.add_argument("--pretrain-window-size", type=int, nargs="+", help="pretraining window if not recorded")
    _trust(p)


def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, choices=IMPORT_SOURCES)
    p.add_argument("path", metavar="input", help="weights file (official, timm) or HF model directory (hf)")
    _output(p, None)
    _sizes(p)
    _trust(p)


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", dest="target", required=True, choices=EXPORT_TARGETS)
    p.add_argument("path", metavar="input", help="our weights file (backbone or SimMIM)")
    _output(p, None)
    _sizes(p)


def _universal_args(p: argparse.ArgumentParser) -> None:
    _checkpoint(p)
    p.add_argument("-o", "--output", help="output tag directory (default: <tag>_universal next to it)")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path")
    _trust(p)


def _print_inspection(path: str, trust_pickle: bool) -> None:
    print("\n".join(inspect_path(path, trust_pickle=trust_pickle)))


@dataclass(frozen=True)
class Subcommand:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[..., Any]  # called with the parsed options as keyword arguments


COMMANDS: dict[str, Subcommand] = {
    "consolidate": Subcommand(
        "DeepSpeed checkpoint (any ZeRO stage/world size) -> one weights file", _consolidate_args, consolidate
    ),
    "backbone": Subcommand("SimMIM checkpoint -> backbone weights for fine-tuning", _backbone_args, make_backbone),
    "import": Subcommand("official / timm / HF weights -> ours", _import_args, import_weights),
    "export": Subcommand("ours -> timm / HF / official", _export_args, export),
    "universal": Subcommand(
        "DeepSpeed checkpoint -> universal checkpoint (resume at another world size)", _universal_args, to_universal
    ),
    "inspect": Subcommand("show what a checkpoint file or directory holds", _inspect_args, _print_inspection),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swinv2-convert", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.arguments(sub.add_parser(name, help=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pretrain.convert`` / ``swinv2-convert``; returns the exit code (2: bad input,
    with one line ``error: ...`` on stderr)."""
    options = vars(_parser().parse_args(argv))
    command = COMMANDS[options.pop("command")]
    try:
        command.run(**options)
    except (ConversionError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
