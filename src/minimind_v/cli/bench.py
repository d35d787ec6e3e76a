"""`minimind-v bench`: decode speed, training throughput, the server under load."""

from __future__ import annotations

import argparse
import json

from .options import add_model_argument
from .serving import add_model_arguments, engine_for


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench.decode import bench, table_rows
    from ..bench.reference import REFERENCE_DECODE

    if args.chain is not None and args.chain < 1:
        raise SystemExit("error: --chain must be at least 1")
    engine = engine_for(args, cuda_graphs=not args.no_graphs, chain=args.chain)
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


def add_bench_parsers(sub) -> None:
    from ..bench.options import add_decode_bench_arguments, add_train_bench_arguments
    from ..bench.serve import add_load_parser

    bench = sub.add_parser("bench", help="performance: decode speed (`bench decode`), training throughput "
                                         "(`bench train`), the server under load (`bench serve`)"
                           ).add_subparsers(dest="what", required=True)
    load = add_load_parser(bench)
    add_model_argument(load, "a model folder to serve on a free loopback port (or --url)", required=False)
    decode = bench.add_parser("decode", help="prefill latency, decode tokens/s (batch 1 and --batch), peak memory")
    add_model_arguments(decode, sampling=False, model_required=False)
    add_decode_bench_arguments(decode)
    decode.set_defaults(func=cmd_bench)
    train = bench.add_parser("train", help="training throughput of the reference setting (768 x 8 MiniMind, "
                                           "SigLIP B/32-256, the shared generator's data)")
    add_train_bench_arguments(train)
    train.set_defaults(func=cmd_bench_train)


def cmd_bench_train(args: argparse.Namespace) -> int:
    from ..bench.reference import REFERENCE_TRAIN
    from ..bench.train import bench_train, table_rows
    from ..config import parse_overrides

    report = bench_train(args.work_dir, args.data, args.rows, args.steps, args.warmup, args.generator, args.tokenizer,
                         batch_size=args.batch_size, max_seq_len=args.max_seq_len, freeze=args.freeze,
                         num_workers=args.num_workers, compile=args.compile, packing=args.packing,
                         chunked_loss=args.chunked_loss, feature_cache=args.feature_cache,
                         device=args.device, dtype=args.dtype, parallel=args.parallel,
                         grad_checkpointing=args.grad_checkpointing, share_prefix=args.share_prefix,
                         overrides=parse_overrides(args.set))
    if report["rank"] == 0:  # under torchrun: once
        print_report(report, table_rows, REFERENCE_TRAIN if args.data is None and not args.set else None, args.json)
    return 0
