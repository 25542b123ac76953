"""`peftkit serve`: one base model in memory, many LoRA adapters chosen per request, over OpenAI's HTTP API.

    peftkit serve --model smollm2 --adapter-dir adapters/ --port 8000
    # then, with the official client:  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
from pathlib import Path

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_adapters(items: list[str] | None) -> dict[str, str]:
    """NAME=PATH pairs from --adapter; the registry checks the names and the directories."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {item!r} is not NAME=PATH (for example --adapter support=runs/support/adapter)")
        if name in out:
            raise ValueError(f"--adapter {name!r} is given twice; use one name per adapter")
        out[name] = path
    return out


def check_sources(args: argparse.Namespace) -> dict[str, str]:
    """The --adapter NAME=PATH pairs, after checking every path and --adapter-dir on disk, so that a typo stops
    `peftkit serve` at once (exit 2, naming the path) instead of after the seconds of loading the model."""
    from ..files import CONFIG_NAME, WEIGHTS_NAME

    adapters = parse_adapters(args.adapter)
    if args.adapter_dir is not None and not Path(args.adapter_dir).is_dir():
        raise FileNotFoundError(f"--adapter-dir {args.adapter_dir!r} is not a directory; create it or fix the path")
    for name, path in adapters.items():
        where = f"--adapter {name}={path}"
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{where}: {'not a directory' if folder.exists() else 'no such directory'}; "
                                    f"give the folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
        if not (folder / CONFIG_NAME).is_file():
            run_dir = (folder / "adapter" / CONFIG_NAME).is_file()
            hint = f" (a training run? try {folder / 'adapter'})" if run_dir else ""
            raise FileNotFoundError(f"{where}: no {CONFIG_NAME} in it{hint}")
        try:
            config = json.loads((folder / CONFIG_NAME).read_bytes())
        except (OSError, ValueError) as err:
            raise ValueError(f"{where}: {folder / CONFIG_NAME} is not readable JSON ({err})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{where}: {folder / CONFIG_NAME} holds a JSON {type(config).__name__}, not an object")
        if not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{where}: no {WEIGHTS_NAME} in it (the server loads safetensors weights only)")
    return adapters


def served_name(model: str, given: str | None) -> str:
    """The base's name in the API: --served-name, else 'smollm2' for the default, else the directory's name."""
    if given:
        return given
    from ..models import ALIASES

    return "smollm2" if model in ALIASES else (Path(model).resolve().name or model)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the server starts, so port 0 works and the real port is known."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port") from err
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def server_config(app, *, read_timeout: float = 30.0, keep_alive: float = 5.0, log_level: str = "warning", **kw):
    """uvicorn's Config for `app` with the connection limits of `peftkit serve`: an idle kept-alive connection
    closes after `keep_alive` seconds (uvicorn's own timer), and a request must arrive whole (headers and
    body) within `read_timeout` seconds of its first byte or of the connection's start (limits.ReadDeadline),
    so slow or silent connections (slowloris) cannot pile up. Other keywords go to uvicorn.Config."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from .limits import ReadDeadline

    return uvicorn.Config(app, http=ReadDeadline.factory(H11Protocol, read_timeout), ws="none",
                          timeout_keep_alive=keep_alive, log_level=log_level, **kw)


def build_server(args: argparse.Namespace):
    """(app, engine, registry, base name) from the parsed arguments; the caller starts the engine."""
    from .. import cpu, hf
    from ..models import load_model
    from ..precision import resolve_dtype
    from ..train.infer import stop_ids
    from .app import create_app
    from .engine import Engine
    from .registry import AdapterRegistry

    adapters = check_sources(args)
    choice = resolve_dtype(args.dtype, args.device)
    print(f"peftkit serve: {cpu.describe(cpu.configure_threads(args.threads))}; {choice.describe()}", flush=True)
    model, tokenizer = load_model(args.model, dtype=choice.torch_dtype(), quantize=args.quantize)
    if args.device != "cpu":
        model.to(args.device)
    registry = AdapterRegistry(model, adapter_dir=args.adapter_dir, adapters=adapters, max_loaded=args.max_loaded,
                               max_rank=args.max_rank)
    engine = Engine(model, registry, max_batch=args.max_batch, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk or None)
    name = served_name(args.model, args.served_name)

    app = create_app(engine, registry, tokenizer, model_name=name,
                     context_length=hf.text_context_length(model),
                     stop_token_ids=tuple(stop_ids(model, tokenizer)), max_tokens_limit=args.max_tokens_limit,
                     max_body_bytes=args.max_body_bytes, admin_token=args.admin_token, api_key=args.api_key)
    return app, engine, registry, name


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if not is_loopback(args.host):
        if not args.allow_remote:
            raise ValueError(f"--host {args.host} is not a loopback address; pass --allow-remote as well to listen "
                             "there (and --api-key, or a proxy in front, so that generation needs credentials), or "
                             "keep 127.0.0.1")
        print(f"peftkit serve: WARNING: listening on {args.host}, reachable from other machines; "
              + ("the /v1 endpoints need the --api-key" if args.api_key else
                 "generation needs no credentials (set --api-key or $PEFTKIT_API_KEY)"), file=sys.stderr)
    for flag in ("max_loaded", "max_rank", "max_batch", "max_queue", "max_tokens_limit", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("read_timeout", "keep_alive"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive number of seconds, "
                             f"got {getattr(args, flag)}")
    check_sources(args)  # the adapters' files, before the port and the model
    sock = bind(args.host, args.port)  # fail fast on a busy port, before the model loads
    try:
        app, engine, registry, name = build_server(args)
    except BaseException:
        sock.close()
        raise
    engine.start()
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    names = registry.names()
    print(f"peftkit serve: {name} with {len(names)} adapter(s) available"
          f"{' (' + ', '.join(names[:8]) + (', ...' if len(names) > 8 else '') + ')' if names else ''}; "
          f"admin endpoints {'on' if args.admin_token else 'off'}", flush=True)
    print(f"peftkit serve: listening on {url}  (OpenAI base_url {url}/v1; Ctrl-C stops)", flush=True)
    server = uvicorn.Server(server_config(app, read_timeout=args.read_timeout, keep_alive=args.keep_alive,
                                          log_level=args.log_level, access_log=args.log_level == "debug",
                                          timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after a graceful shutdown
        pass
    finally:
        engine.close()
        sock.close()
    print("peftkit serve: stopped", flush=True)
    return 0


def add_serve_command(sub) -> None:
    from ..cli_format import DefaultsHelpFormatter

    p = sub.add_parser(
        "serve", help="serve a base model with many LoRA adapters over an OpenAI-compatible HTTP API",
        description="Keep one base model in memory and serve it and any number of PEFT-format LoRA adapters over "
        "OpenAI's API (GET /v1/models, POST /v1/completions, POST /v1/chat/completions, streaming included), so "
        "the official clients work unchanged: the request's `model` names the base or an adapter. Concurrent "
        "requests share batched forwards even when they use different adapters. Adapters are the subdirectories "
        "of --adapter-dir (by name) plus each --adapter NAME=PATH; they load on first use (safetensors only), stay "
        "in an LRU cache of --max-loaded and reload when their files change. Also: GET /health, GET /metrics "
        "(Prometheus), and with --admin-token the admin endpoints GET /admin/adapters, POST "
        "/admin/adapters/NAME/load, DELETE /admin/adapters/NAME (header `Authorization: Bearer TOKEN`). "
        "n > 1 is honoured (one engine request per choice, up to 16). It listens on loopback only unless "
        "--allow-remote is given.",
        formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help="base: 'smollm2' (embedded), a transformers dir or a .gguf file")
    p.add_argument("--served-name", default=None,
                   help="the base's name in the API (default: 'smollm2', or the model directory's name)")
    p.add_argument("--adapter-dir", default=None, help="directory whose subdirectories are adapters, named by folder")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="serve the adapter at PATH as NAME "
                   "(repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; non-loopback needs --allow-remote")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host (with --api-key, or a proxy in front, for credentials)")
    p.add_argument("--api-key", default=os.environ.get("PEFTKIT_API_KEY") or None,
                   help="the /v1 endpoints need this as `Authorization: Bearer KEY` (OpenAI clients' api_key; 401 "
                   "otherwise; /health and /metrics stay open) (default: $PEFTKIT_API_KEY, which keeps it out of "
                   "the process list; off when neither is given)")
    p.add_argument("--max-loaded", type=int, default=64, help="adapters kept loaded at once (LRU beyond)")
    p.add_argument("--max-rank", type=int, default=64, help="refuse adapters of a higher LoRA rank (422)")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together in one forward")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond the batch; more get 429")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prefill longer prompts in chunks of this many "
                   "tokens, decoding the running requests between chunks (0: whole prompts at once)")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="the largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request bodies above this get 413")
    p.add_argument("--read-timeout", type=float, default=30.0, help="seconds a client may take to send a whole "
                   "request (headers and body); slower connections are closed (408 when the headers never came)")
    p.add_argument("--keep-alive", type=float, default=5.0, help="seconds an idle kept-alive connection stays open")
    p.add_argument("--admin-token", default=os.environ.get("PEFTKIT_ADMIN_TOKEN") or None,
                   help="enable the admin endpoints, guarded by this Bearer token (default: $PEFTKIT_ADMIN_TOKEN, "
                   "which keeps it out of the process list; off when neither is given)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the base model's weights and KV cache; adapters run in fp32 over a 16-bit base "
                   "(default auto: bfloat16 on a CUDA GPU with bf16 or a CPU with AMX or AVX512-BF16, else float32; "
                   "the choice is printed)")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="load the base's linears in 4-bit NF4")
    p.add_argument("--device", default="cpu", help="torch device for the model, e.g. cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: the cores "
                   "free to the server when it starts)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (debug also logs every request)")
    p.set_defaults(func=_cmd_serve)
