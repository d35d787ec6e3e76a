"""The command-line options of `minimind-v serve` and the server settings they make (standard library only, so
the CLI builds its parser without importing the server)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--model-name", help="the id clients ask for (default: the folder's name)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set MINIMIND_V_API_KEY)")
    parser.add_argument("--allow-local-images", metavar="DIR", help="accept image paths under DIR")
    parser.add_argument("--fetch-remote-images", action="store_true", help="download http(s) image URLs")
    parser.add_argument("--max-images", type=int, default=4, help="images one request may carry")
    parser.add_argument("--max-image-bytes", type=int, default=10 * 2**20, help="largest encoded image")
    parser.add_argument("--max-body-bytes", type=int,
                        help="largest request body (default: room for --max-images base64 images, + 1 MiB)")
    parser.add_argument("--max-batch", type=int, default=64,
                        help="requests decoding together (continuous batching: requests join and leave the running "
                             "batch at every step; each holds one slot of KV memory)")
    parser.add_argument("--max-len", type=int, default=2048, metavar="TOKENS",
                        help="prompt + answer tokens per request, at most (capped at the model's context); the KV "
                             "memory is max-batch x max-len positions, allocated once")
    parser.add_argument("--max-queue", type=int, default=128,
                        help="requests waiting for a slot; more are answered 429 server_busy with Retry-After")
    parser.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                        help="a request still waiting or generating after this long ends with 504 request_timeout "
                             "(0: no time-out)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch's threads for the decode step (default on a CPU: one fewer than the cores, so "
                             "the HTTP side keeps one; on a GPU: torch's own)")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=False,
                        help="decode in a process of its own (the model loaded there, and a copy here for prompts "
                             "and images): the HTTP side and the decode steps run on two cores instead of taking "
                             "turns under one interpreter lock")
    parser.add_argument("--no-access-log", action="store_true",
                        help="do not log a line per request (client, path, status, time, tokens) to stderr")
    parser.add_argument("--drain-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="on SIGTERM/SIGINT, how long in-flight requests may finish before they are cancelled")


def settings_fields(args: argparse.Namespace, environ: Mapping[str, str]) -> dict:
    """ServerSettings fields from the parsed options (and MINIMIND_V_API_KEY in `environ`)."""
    return dict(model_name=args.model_name or args.model.rstrip("/").split("/")[-1],
                api_key=args.api_key or environ.get("MINIMIND_V_API_KEY"),
                local_image_root=args.allow_local_images, fetch_remote_images=args.fetch_remote_images,
                max_images=args.max_images, max_image_bytes=args.max_image_bytes, max_queue=args.max_queue,
                max_batch=args.max_batch, max_len=args.max_len, request_timeout=args.request_timeout or None,
                max_body_bytes=args.max_body_bytes)


def configure_access_log(args: argparse.Namespace) -> None:
    """One line per request on stderr (logger `minimind_v.access`), unless --no-access-log."""
    log = logging.getLogger("minimind_v.access")
    if args.no_access_log:
        log.disabled = True
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
