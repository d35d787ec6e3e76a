"""The command-line options of `minimind-v bench decode` and `bench train` (standard library only, so the CLI builds
its parser without importing torch)."""

from __future__ import annotations

import argparse


def add_decode_bench_arguments(decode: argparse.ArgumentParser) -> None:
    decode.add_argument("--prompt-tokens", type=int, default=100)
    decode.add_argument("--new-tokens", type=int, default=256)
    decode.add_argument("--batch", type=int, default=8)
    decode.add_argument("--images", type=int, default=1, help="images per prompt (0 for text only)")
    decode.add_argument("--runs", type=int, default=3)
    decode.add_argument("--no-graphs", action="store_true", help="decode step by step, without CUDA graphs")
    decode.add_argument("--profile", metavar="TRACE.json", help="also write a torch profiler Chrome trace")
    decode.add_argument("--compare-generate", action="store_true",
                        help="also time transformers' model.generate on the same prompts")
    decode.add_argument("--json", action="store_true", help="print the whole report as JSON instead of a table")


def add_train_bench_arguments(train: argparse.ArgumentParser) -> None:
    train.add_argument("--work-dir", default="minimind-v-bench", help="tower, data and run folder")
    train.add_argument("--data", help="a parquet to train on instead of generating the reference data")
    train.add_argument("--generator", help="make_vlm_parquet.py (default: $MINIMIND_V_BENCH_GENERATOR)")
    train.add_argument("--rows", type=int, default=2400)
    train.add_argument("--tokenizer", help="the original tokenizer folder (default: $MINIMIND_V_BENCH_TOKENIZER, "
                                           "else the shipped one)")
    train.add_argument("--steps", type=int, default=40, help="timed optimizer steps")
    train.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--max-seq-len", type=int, default=768)
    train.add_argument("--freeze", type=int, default=0, help="0: the whole LLM trains (the reference's setting)")
    train.add_argument("--num-workers", type=int, default=0)
    train.add_argument("--compile", action="store_true")
    train.add_argument("--packing", action="store_true", help="packed samples: no compute on padding")
    train.add_argument("--chunked-loss", action="store_true", help="loss in chunks from the hidden states")
    train.add_argument("--feature-cache", metavar="DIR", help="keep the tower's features (computed once per image)")
    train.add_argument("--device", default="auto")
    train.add_argument("--dtype", default="auto")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config fields")
    train.add_argument("--json", action="store_true", help="print the whole report (each step's loss too) as JSON")
