"""The command-line options of `minimind-v bench decode` and `bench train` (standard library only, so the CLI builds
its parser without importing torch); `bench train`'s training options are `train`'s own (training/args.py)."""

from __future__ import annotations

import argparse

from ..training.args import add_train_arguments


def add_decode_bench_arguments(decode: argparse.ArgumentParser) -> None:
    decode.add_argument("--prompt-tokens", type=int, default=100, help="text tokens of each prompt")
    decode.add_argument("--new-tokens", type=int, default=256, help="tokens generated per prompt")
    decode.add_argument("--batch", type=int, default=8, help="prompts decoded together (batch 1 is always timed too)")
    decode.add_argument("--images", type=int, default=1, help="images per prompt (0 for text only)")
    decode.add_argument("--runs", type=int, default=3, help="timed runs (the median is reported) after one warm-up")
    decode.add_argument("--no-graphs", action="store_true", help="decode step by step, without CUDA graphs")
    decode.add_argument("--chain", type=int, metavar="N",
                        help="greedy steps per CUDA graph replay (default: 16 on a GPU, 1 on a CPU)")
    decode.add_argument("--profile", metavar="TRACE.json", help="also write a torch profiler Chrome trace")
    decode.add_argument("--compare-generate", action="store_true",
                        help="also time transformers' model.generate on the same prompts")
    decode.add_argument("--json", action="store_true", help="print the whole report as JSON instead of a table")


def add_train_bench_arguments(train: argparse.ArgumentParser) -> None:
    train.add_argument("--work-dir", default="minimind-v-bench", help="tower, data and run folder")
    train.add_argument("--data", help="a parquet to train on instead of generating the reference data")
    train.add_argument("--generator", help="make_vlm_parquet.py (default: $MINIMIND_V_BENCH_GENERATOR)")
    train.add_argument("--rows", type=int, default=2400, help="rows of the generated data")
    train.add_argument("--tokenizer", help="the original tokenizer folder (default: $MINIMIND_V_BENCH_TOKENIZER, "
                                           "else the shipped one)")
    train.add_argument("--steps", type=int, default=40, help="timed optimizer steps")
    train.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    add_train_arguments(train, ["batch_size", "max_seq_len", "freeze", "num_workers", "compile", "packing",
                                "chunked_loss", "feature_cache", "device", "dtype", "parallel", "grad_checkpointing",
                                "share_prefix"],
                        max_seq_len=768, freeze=0)
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config fields")
    train.add_argument("--json", action="store_true", help="print the whole report (each step's loss too) as JSON")
