"""The `minimind-v` console script: one entry point, one subcommand per task."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__
from .config import PRESETS, MiniMindVConfig, parse_overrides


def load_model(args: argparse.Namespace):
    """A saved model folder (--model), or a randomly initialised preset (--preset, --set, --vision)."""
    from .build import preset_model
    from .device import pick_device
    from .models import load_vlm

    if args.model:  # the model alone: a folder need not hold a tokenizer to be diagnosed
        model = load_vlm(args.model, **({"vision_model_path": args.vision} if args.vision else {}))
    else:
        model = preset_model(args.preset, args.vision, parse_overrides(args.set))
    return model.to(pick_device(args.device))


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .diagnose import diagnose

    report = diagnose(load_model(args))
    ok = report["forward_ok"] and report["finite"]
    return 0 if ok else 1


def cmd_convert(args: argparse.Namespace) -> int:
    from .interop.export import convert

    print(convert(args.source, args.target, vision=args.vision, tokenizer=args.tokenizer,
                  remote_code=args.remote_code, **parse_overrides(args.set)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from .training.trainer import TrainArgs, Trainer

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
    from .build import training_tokenizer
    from .evaluate import evaluate, load_qa_jsonl

    items = load_qa_jsonl(path, image_root)[:limit]
    tokenizer = training_tokenizer(train_args)  # the one the trainer uses

    def run(model) -> dict:
        return {"eval_accuracy": evaluate(model, tokenizer, items)["accuracy"]}

    return run


def cmd_eval(args: argparse.Namespace) -> int:
    from .build import load_model as load_saved
    from .data.skips import SkipStats
    from .evaluate import evaluate, evaluate_with_baselines, load_qa_jsonl, report_table

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
    from .data.world import write_world

    counts = write_world(args.out, args.train_scenes, args.test_scenes, args.seed)
    print(f"wrote {args.out}/train.parquet, test.jsonl, images/: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from .data.tokenizer import train_from_files

    print(train_from_files(args.data, args.vocab_size, args.out))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(args.out, args.size)
    return 0 if report["total"] else 1


def add_train_parser(sub) -> None:
    import dataclasses

    from .training.trainer import STAGES, TrainArgs

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


def _engine(args: argparse.Namespace, cuda_graphs: bool = True):
    from .build import describe, load_for_inference
    from .generation import Engine

    if args.model is None:  # bench decode without a model: the reference setting
        from .bench.reference import reference_for_inference

        model, tokenizer = reference_for_inference(args.images > 0, args.device, args.dtype,
                                                   **parse_overrides(args.set))
    else:
        model, tokenizer = load_for_inference(args.model, args.tokenizer, args.vision, args.device, args.dtype,
                                              **parse_overrides(args.set))
    print(f"[minimind-v] {args.model or 'reference model'}: {describe(model)}", file=sys.stderr)
    return Engine(model, tokenizer, cuda_graphs=cuda_graphs, compile=args.compile)


def _sampling(args: argparse.Namespace):
    from .generation import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop,
                          seed=args.seed)


def cmd_chat(args: argparse.Namespace) -> int:
    from .serving.chat import ChatSession, run_chat

    params = _sampling(args)  # bad settings fail before the model loads
    session = ChatSession(_engine(args), params, system=args.system)
    return run_chat(session, prompt=args.prompt, images=args.image, stats=args.stats)


def _require(extra: str, *modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"this command needs {', '.join(missing)}: pip install 'minimind-v[{extra}]'")


def cmd_serve(args: argparse.Namespace) -> int:
    _require("serve", "fastapi", "uvicorn")
    import uvicorn

    from .serving.openai_api import ServerSettings, create_app
    from .serving.options import configure_access_log, settings_fields

    settings = ServerSettings(**settings_fields(args, os.environ))
    configure_access_log(args)
    app = create_app(_engine(args), settings)
    print(f"[minimind-v] serving {settings.model_name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:  # SIGTERM/SIGINT: stop accepting, let requests finish for --drain-timeout s, cancel the rest, exit
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=args.drain_timeout)
    except KeyboardInterrupt:  # uvicorn raises the SIGINT it handled again, once it has shut down
        pass
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    _require("web", "gradio")
    from .serving.web import build_app

    build_app(_engine(args)).launch(server_name=args.host, server_port=args.port)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.decode import bench, table_rows
    from .bench.reference import REFERENCE_DECODE

    engine = _engine(args, cuda_graphs=not args.no_graphs)
    report = bench(engine, args.prompt_tokens, args.new_tokens, args.batch, args.images, args.runs, args.profile,
                   args.compare_generate)
    print_report(report, table_rows, REFERENCE_DECODE if args.model is None and not args.set else None, args.json)
    return 0


def print_report(report: dict, table_rows, reference: str | None, as_json: bool) -> None:
    """The figures as a Markdown table (then the original's figures, in the reference setting only), or the whole
    report as JSON."""
    if as_json:
        print(json.dumps(report, indent=2))
        return
    title, rows = table_rows(report)
    width = max(len(name) for name, _ in rows)
    print(f"{title}\n\n| {'figure':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    print("\n".join(f"| {name:<{width}} | {value} |" for name, value in rows))
    print(f"\n{reference}" if reference else "")


def add_model_arguments(parser: argparse.ArgumentParser, sampling: bool = True, model_required: bool = True) -> None:
    if model_required:
        parser.add_argument("model", help="a model folder of this project, or an original .pth")
    else:
        parser.add_argument("model", nargs="?", help="a model folder of this project, or an original .pth "
                                                     "(default: the reference 768 x 8 model with random weights)")
    parser.add_argument("--tokenizer", help="tokenizer folder (required for an original .pth)")
    parser.add_argument("--vision", help="vision tower folder (an original .pth; or to replace a folder's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs that have it, else fp16; fp32 on CPU)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config fields an original .pth cannot tell (as for convert)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the fixed-shape decode step: on a GPU before capturing it as a CUDA "
                             "graph; on a CPU with the weights frozen in (about 2.5x the tokens/s at batch 1). "
                             "Compiling takes ~15 s on a CPU, once per batch size and length bucket")
    if sampling:
        parser.add_argument("--max-new-tokens", type=int, default=256)
        parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
        parser.add_argument("--top-k", type=int, default=0)
        parser.add_argument("--top-p", type=float, default=1.0)
        parser.add_argument("--repetition-penalty", type=float, default=1.0)
        parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
        parser.add_argument("--seed", type=int)


def add_serving_parsers(sub) -> None:
    chat = sub.add_parser("chat", help="chat with a model in the terminal (streaming, images, history)")
    add_model_arguments(chat)
    chat.add_argument("--image", action="append", default=[], help="attach an image to the first message")
    chat.add_argument("--prompt", help="one message, answered, then exit (for scripts)")
    chat.add_argument("--system", help="a system message")
    chat.add_argument("--stats", action="store_true", help="print prefill time and decode tokens/s after answers")
    chat.set_defaults(func=cmd_chat)
    from .serving.options import add_serve_arguments

    serve = sub.add_parser("serve", help="an OpenAI-compatible API server (/v1/chat/completions)")
    add_model_arguments(serve, sampling=False)
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    web = sub.add_parser("web", help="a Gradio web demo: upload images, chat with streaming, sampling settings")
    add_model_arguments(web, sampling=False)
    web.add_argument("--host", default="127.0.0.1")
    web.add_argument("--port", type=int, default=7860)
    web.set_defaults(func=cmd_web)
    add_bench_parsers(sub)


def add_bench_parsers(sub) -> None:
    from .bench.options import add_decode_bench_arguments, add_train_bench_arguments
    from .bench.serve import add_load_parser

    bench = sub.add_parser("bench", help="performance: decode speed (`bench decode`), training throughput "
                                         "(`bench train`), the server under load (`bench serve`)"
                           ).add_subparsers(dest="what", required=True)
    add_load_parser(bench)
    decode = bench.add_parser("decode", help="prefill latency, decode tokens/s (batch 1 and --batch), peak memory")
    add_model_arguments(decode, sampling=False, model_required=False)
    add_decode_bench_arguments(decode)
    decode.set_defaults(func=cmd_bench)
    train = bench.add_parser("train", help="training throughput of the reference setting (768 x 8 MiniMind, "
                                           "SigLIP B/32-256, the shared generator's data)")
    add_train_bench_arguments(train)
    train.set_defaults(func=cmd_bench_train)


def cmd_bench_train(args: argparse.Namespace) -> int:
    from .bench.reference import REFERENCE_TRAIN
    from .bench.train import bench_train, table_rows

    report = bench_train(args.work_dir, args.data, args.rows, args.steps, args.warmup, args.generator, args.tokenizer,
                         batch_size=args.batch_size, max_seq_len=args.max_seq_len, freeze=args.freeze,
                         num_workers=args.num_workers, compile=args.compile, packing=args.packing,
                         chunked_loss=args.chunked_loss, feature_cache=args.feature_cache,
                         device=args.device, dtype=args.dtype,
                         overrides=parse_overrides(args.set))
    print_report(report, table_rows, REFERENCE_TRAIN if args.data is None and not args.set else None, args.json)
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
    parser.add_argument("--version", action="version", version=f"minimind-v {__version__}")
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
    add_train_parser(sub)
    add_other_parsers(sub)
    add_serving_parsers(sub)
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
    except KeyboardInterrupt as err:  # Ctrl-C; training says where it stopped and how to go on
        print(f"\nminimind-v {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
