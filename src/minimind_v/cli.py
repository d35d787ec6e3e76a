"""The `minimind-v` console script: one entry point, one subcommand per task."""

from __future__ import annotations

import argparse
import json
import sys

from .config import PRESETS, MiniMindVConfig


def parse_overrides(items: list[str]) -> dict[str, object]:
    """['hidden_size=64', 'use_moe=true'] -> {'hidden_size': 64, 'use_moe': True} (JSON values, else strings)."""
    overrides: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


def load_model(args: argparse.Namespace):
    """A saved model folder (--model), or a randomly initialised preset (--preset, --set, --vision)."""
    import torch

    from .device import pick_device
    from .models.vlm import MiniMindVLM

    if args.model:
        vision = {"vision_model_path": args.vision} if args.vision else {}
        model = MiniMindVLM.from_pretrained(args.model, **vision)
    else:
        torch.manual_seed(0)
        config = MiniMindVConfig.from_name(args.preset, **parse_overrides(args.set))
        model = MiniMindVLM(config, vision_model_path=args.vision)
    return model.to(pick_device(args.device))


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .diagnose import diagnose

    report = diagnose(load_model(args))
    ok = report["forward_ok"] and report["finite"]
    return 0 if ok else 1


def cmd_convert(args: argparse.Namespace) -> int:
    from .export import convert

    print(convert(args.source, args.target, vision=args.vision, tokenizer=args.tokenizer,
                  remote_code=args.remote_code, **parse_overrides(args.set)))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for name in PRESETS:
        config = MiniMindVConfig.from_name(name)
        print(f"{name:18s} hidden {config.hidden_size:5d} x {config.num_hidden_layers:2d} layers, heads "
              f"{config.num_attention_heads}/{config.num_key_value_heads}, vocab {config.vocab_size:6d}, "
              f"{'MoE ' + str(config.n_routed_experts) + ' experts, ' if config.use_moe else ''}"
              f"{config.image_token_len} image tokens, {config.projector_type} projector")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minimind-v", description="Tiny vision-language models: MiniMind-V.")
    sub = parser.add_subparsers(dest="command", required=True)
    diag = sub.add_parser("diagnose", help="config, device, parameters, a forward pass with a NaN/Inf check, memory")
    diag.add_argument("--model", help="a model folder saved by this project (save_pretrained)")
    diag.add_argument("--preset", default="minimind2-v", choices=sorted(PRESETS),
                      help="build a random model from this preset when --model is not given")
    diag.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    diag.add_argument("--vision", help="local CLIP/SigLIP folder for the vision tower")
    diag.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    diag.set_defaults(func=cmd_diagnose)
    conv = sub.add_parser("convert", help="original .pth <-> Hugging Face folder (or a self-contained export)",
                          description="SOURCE.pth -> TARGET folder, or SOURCE folder -> TARGET.pth (original layout).")
    conv.add_argument("source", help="an original MiniMind-V .pth, or a folder written by this project")
    conv.add_argument("target", help="the folder to write, or the .pth to write")
    conv.add_argument("--vision", help="local CLIP/SigLIP folder of the vision tower (for .pth sources)")
    conv.add_argument("--tokenizer", help="the original tokenizer folder, copied into the target folder")
    conv.add_argument("--remote-code", action="store_true",
                      help="write a self-contained folder (tower weights and modeling code included) that "
                           "AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) loads anywhere")
    conv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config fields the weights cannot tell (e.g. num_attention_heads for MiniMind2-V)")
    conv.set_defaults(func=cmd_convert)
    presets = sub.add_parser("presets", help="list the named model presets")
    presets.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    args = build_parser().parse_args(argv)
    hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"minimind-v {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
