"""What several commands share: the subcommand parser, library defaults, and the generation and engine options.

Every default an option shows comes from the library (:func:`default`), so ``--help`` and the Python API
never disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import shlex
from dataclasses import replace
from pathlib import Path
from typing import get_args

from arrag.backends import Backend, BackendRef, load_backend
from arrag.build import BuildConfig
from arrag.build.engines import ENGINES
from arrag.build.sources import SourceConfig
from arrag.config import METHODS, Duplicates, FilterOrder, GenerationConfig, RetrievalConfig
from arrag.faid.blender import FaidAdapter
from arrag.faid.files import load_adapter, shipped_adapter
from arrag.retrieval.database import PatchDatabase, read_manifest

Commands = argparse._SubParsersAction  # what add_subparsers returns
BUILTIN_BACKEND = "builtin"
DTYPES = ("float32", "bfloat16", "float16")  # arrag.backends.janus.DTYPES, named without importing transformers


def default(owner: object, name: str) -> object:
    """The library's default for ``name``: a config dataclass's field or a function's parameter."""
    if dataclasses.is_dataclass(owner):
        field = next(field for field in dataclasses.fields(owner) if field.name == name)
        return field.default_factory() if field.default is dataclasses.MISSING else field.default
    return inspect.signature(owner).parameters[name].default


def shown(value: object) -> str:
    """A default as the command line writes it: sequences space-separated."""
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help; an option without one says in its help what happens."""

    def _get_help_string(self, action: argparse.Action) -> str:
        value, text = action.default, action.help or ""
        if value is None or value is False or value is argparse.SUPPRESS or value == "" or not action.option_strings:
            return text
        return f"{text} (default: {shown(value).replace('%', '%%')})"


def global_options() -> argparse.ArgumentParser:
    """Options accepted before and after any subcommand: ``arrag -v generate ...`` = ``arrag generate -v ...``.

    A fresh parser each call: argparse shares a parent's actions with its children, and the top parser sets
    its own default. In a subcommand the default is SUPPRESS, so it never overwrites what the top parser read.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log the library's progress; with an error, show its traceback",
    )
    return parser


def command(commands: Commands, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand's parser, with the global options and every default in its ``--help``."""
    return commands.add_parser(
        name, help=help, description=help, parents=[global_options()], formatter_class=HelpFormatter
    )


def command_line(args: argparse.Namespace) -> str:
    """The command as given to :func:`arrag.cli.main`, to record beside what it made."""
    return shlex.join(["arrag", *args.argv])


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=default(BackendRef, "device"), help="torch device of the model")
    parser.add_argument("--dtype", choices=DTYPES, default=default(BackendRef, "dtype"), help="Janus weights")


def add_retrieval_options(parser: argparse._ActionsContainer, defaults: RetrievalConfig) -> None:
    """DAiD's λ, τ, k and duplicates rule (:class:`arrag.config.RetrievalConfig`), defaulting to ``defaults``."""
    parser.add_argument(
        "--weight", "--lambda", dest="weight", type=float, default=defaults.weight, help="retrieval weight λ in [0, 1]"
    )
    parser.add_argument("--tau", type=float, default=defaults.temperature, help="retrieval temperature τ > 0")
    parser.add_argument("--k", type=int, default=defaults.k, help="neighbours retrieved per position")
    parser.add_argument(
        "--duplicates",
        choices=get_args(Duplicates),
        default=defaults.duplicates,
        help="weigh each retrieved token by its nearest occurrence (paper) or by all (kNN-LM)",
    )


def retrieval_config(args: argparse.Namespace) -> RetrievalConfig:
    return RetrievalConfig(weight=args.weight, temperature=args.tau, k=args.k, duplicates=args.duplicates)


def add_generation_options(parser: argparse.ArgumentParser, images: int | None, seeds: str) -> None:
    """Backend, database, FAiD, retrieval, sampling, seed and device options; ``images=None`` leaves out
    --num-images (the benchmark fixes it)."""
    parser.add_argument(
        "--backend",
        help=f"builtin, tiny, a Janus-Pro hub id or folder (default: the database's, else {BUILTIN_BACKEND})",
    )
    parser.add_argument("--db", type=Path, help="patch database directory (arrag db build)")
    parser.add_argument("--method", choices=METHODS, help="default: daid with --db, else none")
    parser.add_argument("--faid", type=Path, help="FAiD adapter folder (default: the one shipped for the backend)")
    add_retrieval_options(parser, RetrievalConfig())
    sampling = parser.add_argument_group(
        "sampling", "default: the backend's own (builtin: its config.json; Janus-Pro: guidance 5, temperature 1)"
    )
    sampling.add_argument("--guidance-scale", type=float, help="classifier-free guidance; 1 turns it off")
    sampling.add_argument("--temperature", type=float, help="softmax temperature of the model's logits")
    sampling.add_argument("--top-k", type=int, help="keep the k likeliest tokens; 0 turns top-k off")
    sampling.add_argument("--top-p", type=float, help="keep the smallest set of probability p; 0 turns top-p off")
    sampling.add_argument("--filter-order", choices=get_args(FilterOrder), help="top-k / top-p before or after DAiD")
    parser.add_argument("--seed", type=int, default=default(GenerationConfig, "seed"), help=seeds)
    if images is not None:
        parser.add_argument("--num-images", type=int, default=images, help="images per prompt")
    add_device_options(parser)


def method(args: argparse.Namespace) -> str:
    return args.method or ("daid" if args.db else "none")


def generation_config(args: argparse.Namespace, backend: Backend, images: int | None = None) -> GenerationConfig:
    """The request the options describe; sampling options left out take the backend's own values.

    ``images``: images per prompt where the command fixes it (no --num-images).
    """
    given = {
        "guidance_scale": args.guidance_scale,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "filter_order": args.filter_order,
    }
    changes = {name: value for name, value in given.items() if value is not None}
    for name in ("top_k", "top_p"):  # 0 turns off a filter the backend's sampling has
        if changes.get(name) == 0:
            changes[name] = None
    return GenerationConfig(
        method=method(args),
        sampling=replace(backend.sampling, **changes),
        retrieval=retrieval_config(args),
        num_images_per_prompt=args.num_images if images is None else images,
        seed=args.seed,
    )


@dataclasses.dataclass(frozen=True)
class Resources:
    """What the generation options load: the backend, the database and the FAiD adapter, and their names."""

    backend: Backend
    database: PatchDatabase | None = None
    database_name: str | None = None  # the database's folder
    faid: FaidAdapter | None = None
    faid_name: str | None = None  # the adapter's folder, or "shipped"

    def __post_init__(self) -> None:
        if (self.database is None) != (self.database_name is None) or (self.faid is None) != (self.faid_name is None):
            raise ValueError("a database or an adapter is named exactly when it is given")


def load_resources(args: argparse.Namespace) -> Resources:
    """The backend (default: the database's, else builtin), for retrieval the database checked against it,
    and for FAiD the adapter (--faid, else the one shipped for the backend)."""
    chosen = method(args)
    name = args.backend or (read_manifest(args.db)["spec"]["backend"] if args.db else BUILTIN_BACKEND)
    backend = load_backend(name, args.device, args.dtype)
    resources = Resources(backend)
    if args.db and chosen != "none":
        database = PatchDatabase.load(args.db)
        database.check_backend(backend)
        resources = replace(resources, database=database, database_name=str(args.db))
    if "faid" in chosen:  # faid, faid+daid
        adapter = load_adapter(args.faid, backend) if args.faid else shipped_adapter(backend)
        if adapter is None:
            raise ValueError(f"--method {chosen} needs --faid DIR (no FAiD adapter is shipped for {backend.name})")
        resources = replace(resources, faid=adapter, faid_name=str(args.faid) if args.faid else "shipped")
    return resources


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Options of db build and db add: engine, sharding, tokenizer batch, device."""
    parser.add_argument(
        "--engine", choices=ENGINES, default=default(BuildConfig, "engine"), help="ray: Ray Data (arrag[scale])"
    )
    parser.add_argument("--address", help="ray: the cluster to join (HOST:PORT or auto); default: start Ray here")
    parser.add_argument(
        "--shard-size", type=int, default=default(SourceConfig, "shard_size"), help="image files per shard"
    )
    parser.add_argument("--image-column", help="Parquet column with the image bytes (default: image, jpg, ...)")
    parser.add_argument(
        "--batch-size", type=int, default=default(BuildConfig, "batch_size"), help="images per tokenizer call"
    )
    add_device_options(parser)


def build_config(args: argparse.Namespace, **fields: object) -> BuildConfig:
    """The build the engine options describe, with ``fields`` (db build's key and index options)."""
    sources = SourceConfig(shard_size=args.shard_size, image_column=args.image_column)
    return BuildConfig(sources=sources, batch_size=args.batch_size, engine=args.engine, address=args.address, **fields)
