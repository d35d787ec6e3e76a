"""`minimind-v` commands that build, train, evaluate and make data: diagnose, convert, presets, train, eval, world,
tokenizer, demo."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import PRESETS, MiniMindVConfig, parse_overrides


def load_model(args: argparse.Namespace):
    """A saved model folder (--model), or a randomly initialised preset (--preset, --set, --vision)."""
    from ..build import preset_model
    from ..device import pick_device
    from ..models import load_vlm

    if args.model:  # the model alone: a folder need not hold a tokenizer to be diagnosed
        model = load_vlm(args.model, **({"vision_model_path": args.vision} if args.vision else {}))
    else:
        model = preset_model(args.preset, args.vision, parse_overrides(args.set))
    return model.to(pick_device(args.device))


def cmd_diagnose(args: argparse.Namespace) -> int:
    from ..diagnose import diagnose

    report = diagnose(load_model(args))
    ok = report["forward_ok"] and report["finite"]
    return 0 if ok else 1


def cmd_convert(args: argparse.Namespace) -> int:
    from ..interop.export import convert

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


def add_model_parsers(sub) -> None:
    """diagnose, convert, presets."""
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


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from ..training.trainer import TrainArgs, Trainer

    fields = {f.name for f in dataclasses.fields(TrainArgs)} - {"overrides", "loggers", "evaluate"}
    train_args = TrainArgs(**{name: getattr(args, name) for name in fields},
                           overrides=parse_overrides(args.set), loggers=args.log)
    if args.eval_data:
        train_args.evaluate = _evaluator(args.eval_data, args.image_root, args.eval_limit, train_args)
    summary = Trainer(train_args).run()
    print(json.dumps({k: v for k, v in summary.items() if k != "skipped"}))
    print(summary["skipped"])
    return 0


def _evaluator(path: str, image_root: str | None, limit: int | None, train_args):
    from ..build import training_tokenizer
    from ..evaluate import evaluate, load_qa_jsonl

    items = load_qa_jsonl(path, image_root)[:limit]
    tokenizer = training_tokenizer(train_args)  # the one the trainer uses

    def run(model) -> dict:
        return {"eval_accuracy": evaluate(model, tokenizer, items)["accuracy"]}

    return run


def cmd_eval(args: argparse.Namespace) -> int:
    from ..build import load_model as load_saved
    from ..data.skips import SkipStats
    from ..evaluate import evaluate, evaluate_with_baselines, load_qa_jsonl, report_table

    stats = SkipStats()
    items = load_qa_jsonl(args.data, args.image_root, stats)[:args.limit]
    model, tokenizer = load_saved(args.model, args.tokenizer)
    run = evaluate_with_baselines if args.baselines else evaluate
    report = run(model.eval(), tokenizer, items, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                 stats=stats)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    print(report_table(report) + "\n" + report["skipped"], file=sys.stderr)
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    from ..data.world import write_world

    counts = write_world(args.out, args.train_scenes, args.test_scenes, args.seed)
    print(f"wrote {args.out}/train.parquet, test.jsonl, images/: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from ..data.tokenizer import train_from_files

    print(train_from_files(args.data, args.vocab_size, args.out))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    report = run_demo(args.out, args.size)
    return 0 if report["total"] else 1


def add_train_parser(sub) -> None:
    import dataclasses

    from ..training.trainer import STAGES, TrainArgs

    train = sub.add_parser("train", help="one training loop for every stage: " + ", ".join(STAGES))
    train.add_argument("stage", choices=list(STAGES))
    for f in dataclasses.fields(TrainArgs):
        if f.name in ("stage", "overrides", "loggers", "evaluate"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            train.add_argument(flag, action="store_true", default=f.default)
        else:
            kind = {"int": int, "float": float, "int | None": int}.get(f.type, str)
            default = None if f.default is dataclasses.MISSING else f.default
            train.add_argument(flag, type=kind, default=default, required=f.name in ("data", "out_dir"))
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config field of a new model")
    train.add_argument("--log", action="append", default=[], choices=["wandb", "swanlab", "tensorboard"])
    train.add_argument("--eval-data", help="question/answer JSONL evaluated every --eval-every steps")
    train.add_argument("--eval-limit", type=int, default=200)
    train.set_defaults(func=cmd_train)


def add_other_parsers(sub) -> None:
    ev = sub.add_parser("eval", help="exact-match accuracy of generated answers on a question/answer JSONL")
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", required=True, help='JSONL of {"question", "answer", "image", "type"}')
    ev.add_argument("--image-root", help="folder the image paths are relative to (default: the data file's)")
    ev.add_argument("--tokenizer")
    ev.add_argument("--limit", type=int)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--max-new-tokens", type=int, default=16)
    ev.add_argument("--baselines", action="store_true",
                    help="also score the questions blind (a blank image) and shuffled (another item's image)")
    ev.set_defaults(func=cmd_eval)
    world = sub.add_parser("world", help="write a procedural visual world: scenes with questions per skill "
                                         "(count, relation, binding, existence, reading, caption)")
    world.add_argument("out", help="folder for train.parquet, test.jsonl and images/")
    for flag, default in (("--train-scenes", 4000), ("--test-scenes", 500), ("--seed", 0)):
        world.add_argument(flag, type=int, default=default)
    world.set_defaults(func=cmd_world)
    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = tok.add_subparsers(dest="action", required=True)
    tok_train = tok_sub.add_parser("train", help="train a byte-level BPE with ChatML and image placeholder tokens")
    tok_train.add_argument("--data", nargs="+", required=True,
                           help=".txt, .json, .jsonl or .parquet files (or folders of them)")
    tok_train.add_argument("--vocab-size", type=int, default=6400)
    tok_train.add_argument("--out", required=True)
    tok_train.set_defaults(func=cmd_tokenizer)
    demo = sub.add_parser("demo", help="train a VLM end to end on the CPU from packaged data (easy-vqa)")
    demo.add_argument("--out", default="minimind-v-demo")
    demo.add_argument("--size", default="default", choices=["default", "world", "quick"])  # demo.SIZES
    demo.set_defaults(func=cmd_demo)
