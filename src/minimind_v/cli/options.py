"""What every command's options share: help that shows defaults, and the model named either way - `minimind-v chat
MODEL` or `minimind-v chat --model MODEL` (standard library only: building the parser imports no torch)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, except where there is none to show (None, off, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser (and, through `add_subparsers`, every subcommand's) with `HelpFormatter`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_model_argument(parser: argparse.ArgumentParser, help: str, required: bool = True) -> None:
    """MODEL as a positional argument or as --model (the same thing; `resolve_model` checks and merges them)."""
    parser.add_argument("model", nargs="?", help=help)
    parser.add_argument("--model", dest="model_option", metavar="MODEL", help="the same as MODEL, as an option")
    parser.set_defaults(model_required=required)


def resolve_model(args: argparse.Namespace) -> None:
    """args.model from MODEL or --model; an error when they disagree, or when the command needs one and has none."""
    named = vars(args)
    if "model_option" not in named:
        return
    option = named.pop("model_option")
    if args.model and option and args.model != option:
        raise ValueError(f"two models given: {args.model} and --model {option}; give one")
    args.model = args.model or option
    if named.pop("model_required") and not args.model:
        raise ValueError(f"a model is needed: minimind-v {args.command} MODEL (or --model MODEL), a model folder")
