"""The `minimind-v` console script: one entry point, one subcommand per task.

    train.py     diagnose, convert, presets, train, eval, world, tokenizer, demo
    serving.py   chat, serve, web
    bench.py     bench decode, bench train, bench serve
    options.py   what their options share: help with defaults, MODEL or --model

Building the parser imports no torch: `minimind-v --help` answers at once; each command imports what it needs.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from .bench import add_bench_parsers
from .options import Parser, resolve_model
from .serving import add_serving_parsers
from .train import add_model_parsers, add_other_parsers, add_train_parser, with_config_file


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="minimind-v", description="Tiny vision-language models: MiniMind-V.")
    parser.add_argument("--version", action="version", version=f"minimind-v {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_model_parsers(sub)
    add_train_parser(sub)
    add_other_parsers(sub)
    add_serving_parsers(sub)
    add_bench_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None):
            args = with_config_file(parser, args, argv)
        resolve_model(args)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"minimind-v {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C; training says where it stopped and how to go on
        print(f"\nminimind-v {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return 130
