"""`minimind-v` commands that build, train, evaluate and make data: diagnose, convert, presets, train, eval, world,
tokenizer, demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .options import add_model_argument


def load_model(args: argparse.Namespace):
    """A saved model folder (--model), or a randomly initialised preset (--preset, --set, --vision)."""
    from ..build import preset_model
    from ..config import parse_overrides
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
    from ..config import parse_overrides
    from ..interop.export import convert

    print(convert(args.source, args.target, vision=args.vision, tokenizer=args.tokenizer,
                  remote_code=args.remote_code, int8=args.int8, **parse_overrides(args.set)))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from ..config import PRESETS, MiniMindVConfig

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
    add_model_argument(diag, "a model folder saved by this project (default: a random model of --preset)",
                       required=False)
    diag.add_argument("--preset", default="minimind2-v",
                      help="the preset of the random model built when no model is given (`minimind-v presets`)")
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
    conv.add_argument("--int8", action="store_true",
                      help="write the decoder layers' weights as int8 with a scale per row (a quarter of their "
                           "size; the folder then loads as int8 everywhere, as --int8 does at load)")
    conv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config fields the weights cannot tell (e.g. num_attention_heads for MiniMind2-V)")
    conv.set_defaults(func=cmd_convert)
    presets = sub.add_parser("presets", help="list the named model presets")
    presets.set_defaults(func=cmd_presets)


def cmd_train(args: argparse.Namespace) -> int:
    from ..config import parse_overrides
    from ..training.args import NOT_FLAGS, TrainArgs
    from ..training.trainer import Trainer

    missing = [name for name in ("stage", "data", "out_dir") if not getattr(args, name)]
    if missing:
        raise ValueError(f"train needs {', '.join(n.replace('_', '-') for n in missing)} "
                         f"(on the command line or in --config)")
    fields = {f.name for f in dataclasses.fields(TrainArgs)} - set(NOT_FLAGS)
    train_args = TrainArgs(**{name: getattr(args, name) for name in fields}, stage=args.stage,
                           overrides={**args.config_overrides, **parse_overrides(args.set)}, loggers=args.log)
    if args.eval_data:
        train_args.evaluate = _evaluator(args.eval_data, args.image_root, args.eval_limit, train_args)
    summary = Trainer(train_args).run()
    print(json.dumps({k: v for k, v in summary.items() if k != "skipped"}))
    print(summary["skipped"])
    return 0


def with_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace, argv) -> argparse.Namespace:
    """`train --config FILE`: the file's values become the defaults and the command line is read again, so flags
    given there win."""
    from ..training.args import read_config_file

    values = read_config_file(args.config)
    overrides, loggers = values.pop("overrides", {}), values.pop("loggers", [])
    args.train_parser.set_defaults(**values, config_overrides=overrides, log=list(loggers))
    return parser.parse_args(argv)


def _evaluator(path: str, image_root: str | None, limit: int | None, train_args):
    from ..build import training_tokenizer
    from ..evaluate import evaluate, load_eval_items

    items = load_eval_items(path, image_root)[:limit]
    tokenizer = training_tokenizer(train_args)  # the one the trainer uses

    def run(model) -> dict:
        return {"eval_accuracy": evaluate(model, tokenizer, items)["accuracy"]}

    return run


def cmd_eval(args: argparse.Namespace) -> int:
    from ..build import for_inference, load_model as load_saved
    from ..data.skips import SkipStats
    from ..device import compute_dtype, pick_device
    from ..evaluate import evaluate, evaluate_with_baselines, load_eval_items, report_table

    compute_dtype(pick_device(args.device), args.dtype)  # a device or dtype it cannot have fails before any loading
    stats = SkipStats()
    items = load_eval_items(args.data, args.image_root, stats)[:args.limit]
    model, tokenizer = load_saved(args.model, args.tokenizer)
    model = for_inference(model, args.device, args.dtype, args.int8)  # (an int8 folder already is int8)
    settings = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, stats=stats,
                    keep_predictions=bool(args.output))
    report = (evaluate_with_baselines(model, tokenizer, items, progress=True, **settings) if args.baselines
              else evaluate(model, tokenizer, items, progress="answers", **settings))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in report.pop("predictions") if p)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    wrong = [e for e in report["examples"] if not e["correct"]]
    lines = [f"  {e['question']!r}: {e['prediction']!r} (truth {e['answer']!r})" for e in wrong]
    print(report_table(report) + "\n" + report["skipped"] + ("\nwrong answers, for example:\n" + "\n".join(lines)
                                                            if lines else "") +
          (f"\nevery answer: {args.output}" if args.output else ""), file=sys.stderr)
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    from ..data.world import write_world

    counts = write_world(args.out, args.train_scenes, args.test_scenes, args.seed, args.reading)
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
    from ..training.args import STAGES, add_train_arguments

    train = sub.add_parser("train", help="one training loop for every stage: " + ", ".join(STAGES),
                           description=TRAIN_DESCRIPTION)
    train.add_argument("stage", nargs="?", choices=list(STAGES), help="the stage; its defaults: which weights train "
                       "(--freeze) and whether the data is plain text")
    train.add_argument("--config", metavar="FILE", help="a JSON or YAML file of these options (a run's run.json "
                                                        "works as is); options given here win over it")
    add_train_arguments(train)
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a config field of a new model, e.g. --set hidden_size=256 (repeatable)")
    train.add_argument("--log", action="append", default=[], choices=["wandb", "swanlab", "tensorboard"],
                       help="also log to this tracker (repeatable; metrics.jsonl and loss.png always)")
    train.add_argument("--eval-data", help="a file `eval` reads (questions and answers), scored every "
                                           "--eval-every steps")
    train.add_argument("--eval-limit", type=int, default=200, help="questions of --eval-data scored each time")
    train.set_defaults(func=cmd_train, train_parser=train, config_overrides={})


TRAIN_DESCRIPTION = """stages: pretrain-llm (plain text; the language model from scratch), pretrain-vlm (image captions;
the projector only), sft (conversations about images; the projector and the first and last layers). A run folder
--out-dir gets run.json (every argument, resolved), metrics.jsonl, loss.png, checkpoints/ and model/ (the final
model, what --from-weight of the next stage names)."""


def add_other_parsers(sub) -> None:
    ev = sub.add_parser("eval", help="exact-match accuracy of generated answers on a question/answer JSONL")
    add_model_argument(ev, "a model folder of this project")
    ev.add_argument("--data", required=True, help='JSONL of {"question", "answer", "image", "type"}, or any file '
                    "training reads (each conversation's first question and its answer)")
    ev.add_argument("--image-root", help="folder the image paths are relative to (default: the data file's)")
    ev.add_argument("--tokenizer", help="tokenizer folder (default: the model folder's)")
    ev.add_argument("--limit", type=int, help="score only the first N questions")
    ev.add_argument("--batch-size", type=int, default=64, help="questions answered together")
    ev.add_argument("--max-new-tokens", type=int, default=16, help="the longest answer generated")
    ev.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu, cuda, cuda:1, mps")
    ev.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs that have it, else fp16; fp32 on CPU)")
    ev.add_argument("--int8", action="store_true", help="answer with the decoder layers' weights as int8 (as chat, "
                                                        "serve, web and bench decode --int8)")
    ev.add_argument("--output", metavar="FILE.jsonl", help="write every answer (question, answer, prediction, "
                                                              "correct, type) to this file")
    ev.add_argument("--baselines", action="store_true",
                    help="also score the questions blind (a blank image) and shuffled (another item's image)")
    ev.set_defaults(func=cmd_eval)
    world = sub.add_parser("world", help="write a procedural visual world: scenes with questions per skill "
                                         "(count, relation, binding, existence, reading, caption)")
    world.add_argument("out", help="folder for train.parquet, test.jsonl and images/")
    world.add_argument("--train-scenes", type=int, default=4000, help="scenes of the training split")
    world.add_argument("--test-scenes", type=int, default=500, help="scenes of the test split (held-out colour-"
                                                                      "kind pairs and backgrounds)")
    world.add_argument("--seed", type=int, default=0, help="the same seed writes the same dataset")
    world.add_argument("--reading", type=float, default=0.3, help="the share of scenes that are a written word to "
                                                                  "read (the rest: 1-6 objects)")
    world.set_defaults(func=cmd_world)
    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = tok.add_subparsers(dest="action", required=True)
    tok_train = tok_sub.add_parser("train", help="train a byte-level BPE with ChatML and image placeholder tokens")
    tok_train.add_argument("--data", nargs="+", required=True,
                           help=".txt, .json, .jsonl or .parquet files (or folders of them)")
    tok_train.add_argument("--vocab-size", type=int, default=6400, help="at most this many tokens, special and "
                                                                          "byte tokens included")
    tok_train.add_argument("--out", required=True, help="the tokenizer folder to write")
    tok_train.set_defaults(func=cmd_tokenizer)
    demo = sub.add_parser("demo", help="train a VLM end to end on the CPU from packaged data (easy-vqa)")
    demo.add_argument("--out", default="minimind-v-demo", help="folder for its data, runs, report and samples")
    demo.add_argument("--size", default="default", choices=["default", "world", "world-large", "quick"],  # demo.SIZES
                      help="default: easy-vqa's skills (~10 min on a 2-core CPU); world: and the visual world's "
                           "(~28 min); world-large: the world with 64 visual tokens and 40,000 scenes, every skill "
                           "higher (for a GPU); quick: a reduced chain in a few minutes")
    demo.set_defaults(func=cmd_demo)
