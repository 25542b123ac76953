"""`peftkit ui`: the web console over a folder of runs and sweeps (pip install peftkit[ui])."""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_PORT = 7860


def check_args(args: argparse.Namespace) -> None:
    """Refuse contradictory or unsafe flags before anything loads (the command exits 2 naming the flag)."""
    from ..serve.cli import is_loopback
    from .auth import check_token

    if not is_loopback(args.host) and not args.allow_remote:
        raise ValueError(f"--host {args.host} is not a loopback address; the console shows your files and runs "
                         "prompts, so pass --allow-remote as well to listen there (requests then need an access "
                         "token), or keep 127.0.0.1")
    token = args.token if args.token is not None else os.environ.get("PEFTKIT_UI_TOKEN") or None
    if token is not None:
        check_token(token)  # before a playground model loads
    if args.serve_url and args.model:
        raise ValueError("--serve-url and --model both choose the playground's backend; give one of them")
    if (args.adapter or args.adapter_dir) and not args.model:
        raise ValueError("--adapter and --adapter-dir load adapters in this process, which needs --model (with "
                         "--serve-url, the running server's own adapters are offered)")
    if not 1 <= args.max_tokens <= 4096:
        raise ValueError(f"--max-tokens must be between 1 and 4096, got {args.max_tokens}")


def build(args: argparse.Namespace, port: int = DEFAULT_PORT):
    """The console's app from the parsed flags."""
    try:
        from .api_play import Playground, check_serve_url, local_playground
        from .app import LOOPBACK_HOSTS, create_app
        from .folder import Folder
    except ImportError as err:
        raise RuntimeError(f"the console needs FastAPI and uvicorn ({err}); install them with "
                           "pip install 'peftkit[ui]'") from None
    from ..serve.cli import parse_adapters

    folder = Folder(args.folder)
    play = Playground(max_tokens=args.max_tokens)
    if args.serve_url:
        play = Playground(mode="proxy", url=check_serve_url(args.serve_url), max_tokens=args.max_tokens,
                          api_key=args.serve_api_key)
    elif args.model:
        print(f"peftkit ui: loading {args.model} for the playground ...", flush=True)
        play = local_playground(folder, args.model, parse_adapters(args.adapter), args.adapter_dir, args.dtype,
                                args.device, args.max_tokens)
        print(f"peftkit ui: playground: {play.base} and {len(play.adapters)} adapter(s)"
              + (f" ({', '.join(play.adapters[:8])}{', ...' if len(play.adapters) > 8 else ''})"
                 if play.adapters else ""), flush=True)
    hosts = None if args.allow_remote else LOOPBACK_HOSTS
    return create_app(folder.root, play, allowed_hosts=hosts, token=access_token(args),
                      token_cookie=f"peftkit_ui_token_{port}")


def access_token(args: argparse.Namespace) -> str | None:
    """--token, else $PEFTKIT_UI_TOKEN, else (with --allow-remote) a new random one; None on loopback without one."""
    from .auth import check_token, new_token

    given = args.token if args.token is not None else os.environ.get("PEFTKIT_UI_TOKEN") or None
    if given is not None:
        return check_token(given)
    return new_token() if args.allow_remote else None


def _cmd_ui(args: argparse.Namespace) -> int:
    from ..serve.cli import bind

    check_args(args)
    try:
        import uvicorn
    except ImportError as err:
        raise RuntimeError(f"the console needs uvicorn ({err}); install it with pip install 'peftkit[ui]'") from None
    sock = bind(args.host, args.port)  # a busy port fails now, before a model loads
    host, port = sock.getsockname()[:2]
    try:
        app = build(args, port)
    except BaseException:
        sock.close()
        raise
    token = app.state.token
    if args.allow_remote:
        print(f"peftkit ui: WARNING: listening on {host}, reachable from other machines; every request needs the "
              "access token in the address below (keep it private)", file=sys.stderr)
    query = f"?token={token}" if token else ""
    print(f"peftkit ui: {app.state.folder.root} at http://{'[' + host + ']' if ':' in host else host}:{port}/"
          f"{query} (Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=3))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


def add_ui_command(sub) -> None:
    """Register `peftkit ui` on the top-level parser's subcommands."""
    from ..cli_format import DefaultsHelpFormatter

    p = sub.add_parser(
        "ui", help="a web console: runs and live loss curves, the planner, sweeps, a playground",
        description="Serve a web console over FOLDER in the browser: every training run under it (options, live "
        "loss curves, summaries side by side, a diff of two runs' options), `peftkit plan` as a form with the "
        "memory chart and GPU table, each sweep's quality against cost with its recommendation, and a playground "
        "that sends one prompt to the base and to several adapters side by side, streaming. It reads only under "
        "FOLDER and listens on loopback unless --allow-remote is given. The playground needs --model (load the "
        "base here, with the adapters of the runs trained on it) or --serve-url (a running peftkit serve).",
        formatter_class=DefaultsHelpFormatter)
    p.add_argument("folder", nargs="?", default=".", help="folder holding runs (peftkit train --output-dir) and "
                   "sweeps (peftkit sweep --output-dir), at any depth up to 4")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; non-loopback needs --allow-remote")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0: any free port, printed at start)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host; every request then "
                   "needs an access token (--token, or one made and printed in the console's address)")
    p.add_argument("--token", default=None, help="access token the browser (cookie, set by opening the printed "
                   "address) or a script (header `Authorization: Bearer TOKEN`) must present; 16 to 256 letters, "
                   "digits, - _ . ~ (default: $PEFTKIT_UI_TOKEN; with --allow-remote, a new random one)")
    p.add_argument("--serve-url", default=None, metavar="URL",
                   help="playground: relay prompts to this running `peftkit serve` (loopback only)")
    p.add_argument("--serve-api-key", default=os.environ.get("PEFTKIT_API_KEY") or None, metavar="KEY",
                   help="playground with --serve-url: the server's --api-key, sent as a Bearer token (default: "
                   "$PEFTKIT_API_KEY, which keeps it out of the process list)")
    p.add_argument("--model", default=None, help="playground: load this base here ('smollm2', a transformers "
                   "dir or a .gguf file) with the adapters of the runs trained on it")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="playground with --model: also offer "
                   "the adapter at PATH as NAME (repeatable)")
    p.add_argument("--adapter-dir", default=None, help="playground with --model: offer each subfolder as an adapter")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="playground with --model: dtype of the base's weights (default auto: bfloat16 where the "
                   "device runs it fast, else float32)")
    p.add_argument("--device", default="cpu", help="playground with --model: torch device, e.g. cuda")
    p.add_argument("--max-tokens", type=int, default=256, help="the most tokens one playground answer may ask for")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p.set_defaults(func=_cmd_ui)
