"""What several commands share: the subcommand parser, library defaults, and the generation and engine options.

Every default an option shows comes from the library (:func:`default`), so ``--help`` and the Python API
never disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import shlex
import sys
from collections.abc import Callable, Iterator
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
from arrag.world.database import CACHE_DIR, default_database, world_database_dir

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


# RetrievalConfig's fields and the options that set them (each option's dest is its name without the dashes)
RETRIEVAL_OPTIONS = {"weight": "--weight", "temperature": "--tau", "k": "--k", "duplicates": "--duplicates"}


def add_retrieval_options(parser: argparse._ActionsContainer, defaults: RetrievalConfig) -> None:
    """DAiD's λ, τ, k and duplicates rule (:class:`arrag.config.RetrievalConfig`), defaulting to ``defaults``.

    An option left out reads None, so that a command can tell which were given (:func:`given_retrieval`).
    """

    def described(text: str, field: str) -> str:
        return f"{text} (default: {getattr(defaults, field)})"

    parser.set_defaults(retrieval_defaults=defaults)
    parser.add_argument(
        "--weight", "--lambda", dest="weight", type=float, help=described("retrieval weight λ in [0, 1]", "weight")
    )
    parser.add_argument("--tau", type=float, help=described("retrieval temperature τ > 0", "temperature"))
    parser.add_argument("--k", type=int, help=described("neighbours retrieved per position", "k"))
    parser.add_argument(
        "--duplicates",
        choices=get_args(Duplicates),
        help=described("weigh each retrieved token by its nearest occurrence (paper) or by all (kNN-LM)", "duplicates"),
    )


def given_retrieval(args: argparse.Namespace) -> dict[str, object]:
    """The retrieval options given on the command line, by RetrievalConfig field."""
    values = {field: getattr(args, option.removeprefix("--")) for field, option in RETRIEVAL_OPTIONS.items()}
    return {field: value for field, value in values.items() if value is not None}


def retrieval_config(args: argparse.Namespace) -> RetrievalConfig:
    given = given_retrieval(args)
    rule = None if "weight" in given else args.retrieval_defaults.rule  # a λ given replaces a calibrated rule
    return replace(args.retrieval_defaults, **given, rule=rule)


def add_generation_options(parser: argparse.ArgumentParser, images: int | None, seeds: str) -> None:
    """Backend, database, FAiD, retrieval, sampling, seed and device options; ``images=None`` leaves out
    --num-images (the benchmark fixes it)."""
    parser.add_argument(
        "--backend",
        help=f"builtin, tiny, a Janus-Pro hub id or folder (default: the database's, else {BUILTIN_BACKEND})",
    )
    parser.add_argument("--db", type=Path, help="patch database directory (arrag db build)")
    parser.add_argument(
        "--method",
        choices=METHODS,
        help="default: daid with --db, else none; without --db, the built-in model retrieves from its world database",
    )
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


def note(message: str) -> None:
    """One line on stderr that says what the command does where it chose for the user."""
    print(f"arrag: {message}", file=sys.stderr)


def calibrated_defaults(folder: Path, defaults: RetrievalConfig) -> tuple[RetrievalConfig, str]:
    """DAiD's defaults for the database in ``folder`` and where they come from: the setting its calibration.json
    chose (λ = 0 where it chose the model alone), else ``defaults`` with a warning. Options given override them."""
    from arrag.evaluation.calibration.report import CALIBRATION_FILE
    from arrag.serve.requests import calibrated_retrieval

    path = folder / CALIBRATION_FILE
    try:
        chosen = json.loads(path.read_text())["chosen"]["setting"] if path.is_file() else False
    except (OSError, ValueError, KeyError, TypeError) as error:
        note(f"warning: ignoring {path} ({error}); DAiD uses arrag's default setting")
        return defaults, "arrag's defaults (calibration.json unreadable)"
    if chosen is False:
        note(
            f"warning: {folder} has no calibration.json, so DAiD uses arrag's default setting, which raised the "
            "world database's held-out NLL by 10-16% (docs/calibration.md); arrag db calibrate DB HELDOUT chooses one"
        )
        return defaults, "arrag's defaults (no calibration.json)"
    if chosen is None:
        note(f"{path}: this database does not inform this model; DAiD runs with λ = 0 (the model alone)")
        return replace(defaults, weight=0.0, rule=None), "calibration.json: the model alone"
    config = calibrated_retrieval(folder)
    note(
        f"DAiD: the setting {path} chose ({config.duplicates}, τ {config.temperature:.3g}, k {config.k}, "
        f"λ {config.weight:.3g}{' by rule' if config.rule is not None else ''}); options given override it"
    )
    return config, "calibration.json"


def generation_config(args: argparse.Namespace, backend: Backend, images: int | None = None) -> GenerationConfig:
    """The request the options describe; sampling options left out take the backend's own values. Retrieval
    options given to a request without DAiD are named in a warning: they have no effect.

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
    config = GenerationConfig(
        method=method(args),
        sampling=replace(backend.sampling, **changes),
        retrieval=retrieval_config(args),
        num_images_per_prompt=args.num_images if images is None else images,
        seed=args.seed,
    )
    unused = [RETRIEVAL_OPTIONS[field] for field in given_retrieval(args)] if not config.uses_daid else []
    if unused:
        why = "" if args.method else ", as no --db is given"
        note(
            f"warning: {', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect without DAiD (the "
            f"method is {config.method}{why}; --method daid or faid+daid uses {'it' if len(unused) == 1 else 'them'})"
        )
    return config


@dataclasses.dataclass(frozen=True)
class Resources:
    """What the generation options load: the backend, the database and the FAiD adapter, and their names."""

    backend: Backend
    database: PatchDatabase | None = None
    database_name: str | None = None  # the database's folder
    faid: FaidAdapter | None = None
    faid_name: str | None = None  # the adapter's folder, or "shipped"
    retrieval_from: str | None = None  # where DAiD's setting comes from (the database's calibration, defaults)

    def __post_init__(self) -> None:
        if (self.database is None) != (self.database_name is None) or (self.faid is None) != (self.faid_name is None):
            raise ValueError("a database or an adapter is named exactly when it is given")


METHOD_NAMES = {"daid": "DAiD", "faid": "FAiD", "faid+daid": "FAiD and DAiD"}


def load_resources(args: argparse.Namespace) -> Resources:
    """The backend (default: the database's, else builtin), for retrieval the database checked against it
    (default: the backend's own, :func:`arrag.world.database.default_database`), and for FAiD the adapter
    (--faid, else the one shipped for the backend)."""
    chosen = method(args)
    name = args.backend or BUILTIN_BACKEND
    if args.db and not args.backend:
        name = read_manifest(args.db)["spec"]["backend"]
        if name != BUILTIN_BACKEND:
            note(f"backend {name}: the one {args.db} was built with (--backend chooses another)")
    backend = load_backend(name, args.device, args.dtype)
    resources = Resources(backend)
    if chosen != "none":
        database, database_name = _database(args.db, backend, chosen)
        resources = replace(resources, database=database, database_name=database_name)
        if chosen in ("daid", "faid+daid"):  # DAiD's defaults: the database's calibrated setting, if any
            args.retrieval_defaults, retrieval_from = calibrated_defaults(Path(database_name), args.retrieval_defaults)
            resources = replace(resources, retrieval_from=retrieval_from)
    if "faid" in chosen:  # faid, faid+daid
        adapter = load_adapter(args.faid, backend) if args.faid else shipped_adapter(backend)
        if adapter is None:
            raise ValueError(f"--method {chosen} needs --faid DIR (no FAiD adapter is shipped for {backend.name})")
        resources = replace(resources, faid=adapter, faid_name=str(args.faid) if args.faid else "shipped")
    return resources


def _database(given: Path | None, backend: Backend, chosen: str) -> tuple[PatchDatabase, str]:
    """The database to retrieve from and its name: ``given`` (--db), else the backend's own."""
    if given is not None:
        database = PatchDatabase.load(given)
        database.check_backend(backend)
        return database, str(given)
    directory = world_database_dir(CACHE_DIR, backend)
    first_use = not directory.exists()
    database = default_database(backend)
    if database is None:
        raise ValueError(
            f"--method {chosen} needs a patch database for {backend.name}: build one with arrag db build IMAGES "
            f"--backend {backend.name} --out DB, then pass --db DB"
        )
    shown = f"~/{directory.relative_to(Path.home())}" if directory.is_relative_to(Path.home()) else str(directory)
    built = "built now, on first use" if first_use else "built on first use"
    note(f"{METHOD_NAMES[chosen]} over the built-in world database at {shown} ({built})")
    return database, str(directory)


@contextlib.contextmanager
def on_interrupt(kept: Callable[[], str]) -> Iterator[None]:
    """Ctrl-C in the block becomes a KeyboardInterrupt whose message says what was kept (``kept()``), which
    :func:`arrag.cli.main` prints as one line."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(kept()) from None


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
