"""``lmforge serve RUN_OR_HF_FOLDER [options]``: every option is a field of ``ServeSettings``."""

from __future__ import annotations

import argparse
import dataclasses

from lmforge.serve.settings import ServeSettings

HELP = {
    "host": "address to bind (default 127.0.0.1; use 0.0.0.0 in a container)",
    "port": "TCP port (default 8000)",
    "api_keys_file": "file of API keys, one per line ('name:key' or 'key'); else env LMFORGE_API_KEYS",
    "allow_no_auth": "serve without API keys (loopback only)",
    "served_model_name": "model id clients send (default: the folder name)",
    "dtype": "serving precision: auto (default: what training.precision auto picks on this machine; float32 "
             "for a compressed folder), float32, bfloat16, float16",
    "checkpoint": "checkpoint folder of a run to serve (default: the newest complete one)",
    "threads": "torch intra-op threads (default: torch's choice)",
    "max_batch": "most sequences decoded together (default 16)",
    "max_queue": "most sequences waiting; beyond it 503 + Retry-After (default 64)",
    "block_size": "tokens per KV-cache block (default 16)",
    "kv_cache_tokens": "KV-cache pool size in tokens (default max_batch × context length)",
    "prefill_tokens_per_step": "prompt tokens prefilled between two decode steps (default 2048)",
    "batch_invariant": "auto: pad decode steps so outputs never depend on the batch (measured at start); off",
    "max_prompt_tokens": "longest prompt accepted (default context length - 1)",
    "max_tokens_cap": "largest max_tokens accepted (default context length)",
    "max_n": "largest n accepted (default 8)",
    "request_timeout": "seconds before a request is ended with 504 (default 300)",
    "max_body_bytes": "largest request body (default 1 MiB)",
    "rate_limit_rps": "requests per second per API key, token bucket (default 0 = off)",
    "rate_limit_burst": "token-bucket size (default 20)",
    "probe_interval": "seconds between one-token decode probes (default 5)",
    "probe_timeout": "probe age after which /ready says 503 (default 20 + interval)",
    "drain_timeout": "seconds SIGTERM waits for in-flight requests (default 30)",
    "access_log": "JSON access log on stdout (default on)",
}
FLAG_NAMES = {"api_keys_file": "--api-keys"}


def _cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    from lmforge.errors import ConfigError, SetupError

    if extra:
        raise ConfigError(f"serve: unexpected arguments {' '.join(extra)}")
    try:
        from lmforge.serve.server import serve
    except ImportError as e:
        raise SetupError(f"lmforge serve needs the serving packages ({e.name} is missing)",
                         hint="pip install 'lmforge[serve]'") from None
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeSettings)}
    return serve(args.model, ServeSettings(**values))


def add_serve_commands(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a run or HF folder over an OpenAI-compatible HTTP API "
                              "(continuous batching, API keys, metrics, probes, drain)")
    p.add_argument("model", metavar="RUN_OR_HF_FOLDER", help="lmforge run folder or HF model folder")
    for f in dataclasses.fields(ServeSettings):
        flag = FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-"))
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                           help=HELP[f.name])
            continue
        kind = {"int": int, "float": float}.get(str(f.type).replace("Optional[", "").rstrip("]"), str)
        p.add_argument(flag, dest=f.name, type=kind, default=f.default, help=HELP[f.name])
    p.set_defaults(func=_cmd_serve)
