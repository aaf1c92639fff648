"""The ``arrag`` command: one module per command group, assembled here; library errors printed as flags."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import traceback
from collections.abc import Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from arrag import __version__
from arrag.cli import bench, db, demo, evaluate, generate, serve, train, world
from arrag.cli.options import HelpFormatter, global_options
from arrag.extras import MissingDependencyError

GROUPS = (demo, db, generate, train, evaluate, world, bench, serve)

# Library messages name Python arguments; a CLI user reads the flags that set them.
CLI_FLAGS = {
    "overwrite=True": "--overwrite",
    "resume=True": "--resume",
    "rollback()": "arrag db rollback",
    "train_size": "--train-size",
    "search_params": "--search-params",
    "key_source='codebook'": "--key-source codebook",
    "on_disk=False": "no --on-disk",
    "on_disk=True": "--on-disk",
    "address": "--address",
    "dtype": "--dtype",
    "backend=": "--backend ",  # the bare word names the concept too ("unknown backend")
    "init=": "--init ",
    "out=": "--out ",
    "inception_weights=": "--inception-weights ",
    "features='efficientnet-lite0'": "--features efficientnet-lite0",
}


def _argument(name: str) -> str:
    """A pattern for ``name`` as a whole: not inside an identifier, a flag or a path."""
    end = r"(?![\w/])" if re.match(r"[\w']", name[-1]) else ""
    return rf"(?<![\w./-]){re.escape(name)}{end}"


_LIBRARY_NAMES = re.compile("|".join(_argument(name) for name in sorted(CLI_FLAGS, key=len, reverse=True)))


def cli_message(message: str) -> str:
    """A library error as the CLI prints it: the Python arguments it names turned into flags."""
    return _LIBRARY_NAMES.sub(lambda match: CLI_FLAGS[match.group()], message)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arrag",
        description="Autoregressive retrieval augmentation (AR-RAG)",
        parents=[global_options()],
        formatter_class=HelpFormatter,
    )
    parser.set_defaults(verbose=False)
    parser.add_argument("--version", action="version", version=f"arrag {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; 2 with a one-line message (and with -v its traceback) when the library refuses it, 130
    with one line that says what was kept when it is interrupted (Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded beside what the command makes (arrag.cli.options.command_line)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        with logging_redirect_tqdm():  # log lines above the progress bars, not glued onto them
            return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError, MissingDependencyError) as error:
        if args.verbose:
            traceback.print_exc()
        notes = "".join(f"; {note}" for note in getattr(error, "__notes__", ()))  # what the library added
        print(f"arrag: error: {cli_message(str(error) + notes)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # its message, if any, says what was kept (options.on_interrupt)
        if args.verbose:
            traceback.print_exc()
        kept = f": {cli_message(str(interrupt))}" if str(interrupt) else ""
        print(f"arrag: interrupted{kept}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
