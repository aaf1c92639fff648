"""``arrag serve``: a web app showing retrieval at work (``pip install "arrag[serve]"``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from arrag.backends import BackendRef
from arrag.cli.options import BUILTIN_BACKEND, Commands, command, default
from arrag.extras import MissingDependencyError
from arrag.world.database import CACHE_DIR


def register(commands: Commands) -> None:
    parser = command(
        commands, "serve", "a web app: generate with and without retrieval, see where each patch came from"
    )
    parser.add_argument(
        "--backend", help=f"the backend preselected (default: the first database's, else {BUILTIN_BACKEND})"
    )
    parser.add_argument("--db", type=Path, nargs="+", metavar="DB", help="patch databases offered beside the world's")
    parser.add_argument("--cache", type=Path, default=CACHE_DIR, help="where the world's databases are cached")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--device", default=default(BackendRef, "device"), help="torch device of the models")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from arrag.cli import cli_message
    from arrag.serve.requests import Library, find_databases

    try:
        from arrag.serve.layout import build_app, launch
    except ImportError as error:
        raise MissingDependencyError(
            f'arrag serve needs {error.name or "gradio"}: pip install "arrag[serve]"'
        ) from None
    databases = find_databases(args.cache, args.db or [])
    backend = args.backend or (databases[0].backend if databases else BUILTIN_BACKEND)
    app = build_app(Library(args.device), databases, backend, cli_message)
    print(f"arrag serve: http://{args.host}:{args.port}  (Ctrl-C stops it)", flush=True)
    launch(app, args.host, args.port)
    return 0
