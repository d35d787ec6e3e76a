"""`minimind-v` commands over the generation engine: chat, serve, web (and the engine `bench decode` times)."""

from __future__ import annotations

import argparse
import functools
import os
import sys

from .options import add_model_argument


def engine_for(args: argparse.Namespace, cuda_graphs: bool = True, chain: int | None = None, announce: bool = True):
    from ..build import describe, load_for_inference
    from ..config import parse_overrides
    from ..generation import Engine

    if args.model is None:  # bench decode without a model: the reference setting
        from ..bench.reference import reference_for_inference

        model, tokenizer = reference_for_inference(args.images > 0, args.device, args.dtype, args.int8,
                                                   **parse_overrides(args.set))
    else:
        model, tokenizer = load_for_inference(args.model, args.tokenizer, args.vision, args.device, args.dtype,
                                              args.int8, **parse_overrides(args.set))
    if announce:
        print(f"[minimind-v] {args.model or 'reference model'}: {describe(model)}", file=sys.stderr)
    return Engine(model, tokenizer, cuda_graphs=cuda_graphs, compile=args.compile, chain=chain)


def _sampling(args: argparse.Namespace):
    from ..generation import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop,
                          seed=args.seed)


def cmd_chat(args: argparse.Namespace) -> int:
    from ..serving.chat import ChatSession, run_chat

    params = _sampling(args)  # bad settings fail before the model loads
    session = ChatSession(engine_for(args), params, system=args.system)
    return run_chat(session, prompt=args.prompt, images=args.image, stats=args.stats)


def _require(extra: str, *modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"this command needs {', '.join(missing)}: pip install 'minimind-v[{extra}]'")


def cmd_serve(args: argparse.Namespace) -> int:
    _require("serve", "fastapi", "uvicorn")
    import uvicorn

    from ..device import pick_device, serving_threads
    from ..serving.openai_api import ServerSettings, create_app
    from ..serving.options import configure_access_log, settings_fields

    settings = ServerSettings(**settings_fields(args, os.environ))
    threads = serving_threads(pick_device(args.device), args.threads)  # a bad --threads fails before the model loads
    configure_access_log(args)
    engine, worker = serve_engine(args, settings, threads)
    app = create_app(engine, settings, worker)
    print(f"[minimind-v] serving {settings.model_name!r} on http://{args.host}:{args.port}/v1"
          + (f" ({threads} decode thread{'s' if threads > 1 else ''})" if threads else ""), file=sys.stderr)
    try:  # SIGTERM/SIGINT: stop accepting, let requests finish for --drain-timeout s, cancel the rest, exit
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=args.drain_timeout)
    except KeyboardInterrupt:  # uvicorn raises the SIGINT it handled again, once it has shut down
        pass
    return 0


def serve_engine(args: argparse.Namespace, settings, threads: int | None):
    """The server's engine, and with --engine-process the engine process (the model loaded there, on the device;
    the server's copy on the CPU, for prompts and images); without, None: the app runs a worker thread."""
    import torch

    if not args.engine_process:
        engine = engine_for(args)
        if threads is not None:
            torch.set_num_threads(threads)
        return engine, None
    from ..generation.engine_process import EngineProcess

    front = argparse.Namespace(**{**vars(args), "device": "cpu", "compile": False, "int8": False})
    engine = engine_for(front, announce=False)
    return engine, EngineProcess(engine, functools.partial(engine_for, args), settings.max_queue, settings.max_batch,
                                 settings.max_len, settings.request_timeout, warm_up=True, threads=threads)


def cmd_web(args: argparse.Namespace) -> int:
    _require("web", "gradio")
    import torch

    from ..build import describe
    from ..device import pick_device, serving_threads
    from ..serving.web import build_app

    threads = serving_threads(pick_device(args.device), args.threads)  # a bad --threads fails before the model loads
    engine = engine_for(args)
    if threads is not None:
        torch.set_num_threads(threads)
    build_app(engine, model=f"{args.model} ({describe(engine.model)})").launch(server_name=args.host,
                                                                               server_port=args.port)
    return 0


def add_model_arguments(parser: argparse.ArgumentParser, sampling: bool = True, model_required: bool = True) -> None:
    add_model_argument(parser, "a model folder of this project, or an original .pth" + (
        "" if model_required else " (default: the reference 768 x 8 model with random weights)"), model_required)
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
    parser.add_argument("--int8", action="store_true",
                        help="the decoder layers' weights as int8 (one scale per output channel): a quarter of "
                             "their memory; with --compile on a CPU about 2.5x the tokens/s at batch 1")
    if sampling:
        parser.add_argument("--max-new-tokens", type=int, default=256, help="the longest answer, in tokens")
        parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
        parser.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
        parser.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens whose "
                                                                       "probabilities add up to p (1: all)")
        parser.add_argument("--repetition-penalty", type=float, default=1.0,
                            help="divide the scores of tokens already in the text by this (1: none)")
        parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
        parser.add_argument("--seed", type=int, help="seed of the sampling (temperature > 0): the same answer again")


def add_serving_parsers(sub) -> None:
    chat = sub.add_parser("chat", help="chat with a model in the terminal (streaming, images, history)")
    add_model_arguments(chat)
    chat.add_argument("--image", action="append", default=[], help="attach an image to the first message")
    chat.add_argument("--prompt", help="one message, answered, then exit (for scripts)")
    chat.add_argument("--system", help="a system message")
    chat.add_argument("--stats", action="store_true", help="print prefill time and decode tokens/s after answers")
    chat.set_defaults(func=cmd_chat)
    from ..serving.options import add_serve_arguments

    serve = sub.add_parser("serve", help="an OpenAI-compatible API server (/v1/chat/completions)")
    add_model_arguments(serve, sampling=False)
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    web = sub.add_parser("web", help="a Gradio web demo: upload images, chat with streaming, sampling settings")
    add_model_arguments(web, sampling=False)
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    web.add_argument("--port", type=int, default=7860, help="port to listen on")
    web.add_argument("--threads", type=int, metavar="N",
                     help="torch's threads for the decode step (default on a CPU: one fewer than the cores, so the "
                          "web server keeps one; on a GPU: torch's own)")
    web.set_defaults(func=cmd_web)
