"""``arrag db build | add | calibrate | rollback | info``: patch databases and what they tell a model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from arrag.backends import BackendRef, load_backend
from arrag.build import BuildConfig, add_to_database, build_database, rollback
from arrag.cli.options import (
    BUILTIN_BACKEND,
    Commands,
    add_device_options,
    add_engine_options,
    build_config,
    command,
    default,
    on_interrupt,
)
from arrag.retrieval.database import index_bytes, read_manifest
from arrag.retrieval.grid import MissingPolicy, Neighbourhood
from arrag.retrieval.indexes import IndexConfig
from arrag.retrieval.keys import KEY_SOURCES

if TYPE_CHECKING:
    from arrag.build import BuildReport

IMAGES_HELP = "image files, folders (recursive: PNG, JPEG, WebP, ..., WebDataset .tar, .parquet), or world:N"
INDEX_HELP = (
    "Flat, CodebookPQ, IVF<n>,CodebookPQ (exact distances, compressed), IVF<n>,PQ<m>x4fs,Refine(CodebookPQ) "
    "(fast-scan shortlist, exact re-ranking), or a FAISS factory string such as OPQ8,IVF4096,PQ8 or HNSW32"
)


def register(commands: Commands) -> None:
    db = command(commands, "db", "patch databases").add_subparsers(dest="db_command", required=True)

    build = command(db, "build", "images -> patch database through a backend's tokenizer")
    build.add_argument("images", nargs="+", metavar="IMAGES", help=IMAGES_HELP)
    build.add_argument("--out", type=Path, required=True, help="the database's folder")
    build.add_argument("--backend", default=BUILTIN_BACKEND, help="builtin, tiny, a Janus-Pro hub id or folder")
    build.add_argument(
        "--hops",
        type=int,
        default=default(Neighbourhood, "hops"),
        help="causal neighbourhood radius (1: the paper's L)",
    )
    build.add_argument(
        "--missing",
        choices=get_args(MissingPolicy),
        default=default(Neighbourhood, "missing"),
        help="positions with neighbours off the grid: no entry (paper's code) or zero-padded",
    )
    build.add_argument(
        "--key-source", choices=KEY_SOURCES, default=default(BuildConfig, "key_source"), help="what a key is made of"
    )
    build.add_argument("--index", default=default(IndexConfig, "description"), help=INDEX_HELP)
    build.add_argument("--on-disk", action="store_true", help="IVF indexes: inverted lists in a memory-mapped file")
    build.add_argument(
        "--search-params",
        default=default(IndexConfig, "search_params"),
        help="FAISS search parameters, e.g. nprobe=32 or efSearch=128 (default: FAISS's)",
    )
    build.add_argument(
        "--train-size", type=int, default=default(IndexConfig, "train_size"), help="keys sampled to train the index"
    )
    build.add_argument("--overwrite", action="store_true", help="replace an existing database at --out")
    build.add_argument("--resume", action="store_true", help="finish an interrupted build of the same command")
    add_engine_options(build)
    build.set_defaults(handler=run_build)

    add = command(db, "add", "append images to an existing patch database")
    add.add_argument("directory", type=Path, metavar="DB", help="the database's folder")
    add.add_argument("images", nargs="+", metavar="IMAGES", help=IMAGES_HELP)
    add.add_argument("--backend", help="default: the database's backend")
    add.add_argument("--resume", action="store_true", help="finish an interrupted add of the same command")
    add_engine_options(add)
    add.set_defaults(handler=run_add)

    calibrate = command(db, "calibrate", "held-out likelihood with and without DAiD: what the database tells the model")
    calibrate.add_argument("directory", type=Path, metavar="DB", help="the database's folder")
    calibrate.add_argument(
        "heldout", nargs="+", metavar="HELDOUT", help=f"held-out images: {IMAGES_HELP}, world-eval:N"
    )
    calibrate.add_argument("--backend", help="default: the database's backend")
    calibrate.add_argument("--max-images", type=int, default=400, help="held-out images read (half validation)")
    calibrate.add_argument("--out", type=Path, help="where calibration.json goes (default: the database's folder)")
    add_device_options(calibrate)
    calibrate.set_defaults(handler=run_calibrate)

    undo = command(db, "rollback", "abandon an interrupted build or add: an overwritten database comes back")
    undo.add_argument("directory", type=Path, metavar="DB", help="the database's folder")
    undo.set_defaults(handler=run_rollback)

    info = command(db, "info", "print a database's manifest and size")
    info.add_argument("directory", type=Path, metavar="DB", help="the database's folder")
    info.set_defaults(handler=run_info)


def run_build(args: argparse.Namespace) -> int:
    index = IndexConfig(args.index, args.on_disk, args.search_params, args.train_size)
    neighbourhood = Neighbourhood(args.hops, args.missing)
    config = build_config(args, neighbourhood=neighbourhood, key_source=args.key_source, index=index)
    backend = BackendRef(args.backend, args.device, args.dtype)
    with on_interrupt(_how_to_resume):
        report = build_database(backend, args.images, args.out, config, overwrite=args.overwrite, resume=args.resume)
    _print_report("built", args.out, report)
    return 0


def run_add(args: argparse.Namespace) -> int:
    name = args.backend or read_manifest(args.directory)["spec"]["backend"]
    backend = BackendRef(name, args.device, args.dtype)
    with on_interrupt(_how_to_resume):
        report = add_to_database(backend, args.images, args.directory, build_config(args), resume=args.resume)
    _print_report("added to", args.directory, report)
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from arrag.evaluation.calibration import calibrate, write_report
    from arrag.evaluation.calibration.heldout import read_heldout

    backend = load_backend(args.backend or read_manifest(args.directory)["spec"]["backend"], args.device, args.dtype)
    heldout = read_heldout(args.heldout, args.max_images)
    report = calibrate(backend, args.directory, heldout, description=" ".join(args.heldout))
    print(report.render())
    print(f"wrote {write_report(report, args.out)}")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    rollback(args.directory)
    state = "holds its database as before" if read_manifest_or_none(args.directory) else "is empty"
    print(f"rolled back the unfinished build or add in {args.directory}; the folder {state}")
    return 0


def read_manifest_or_none(directory: Path) -> dict | None:
    try:
        return read_manifest(directory)
    except FileNotFoundError:
        return None


def run_info(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.directory)
    shards = manifest.pop("token_shards", [])
    print(json.dumps(manifest, indent=2))
    entries = manifest["counts"]["entries"]
    size = index_bytes(args.directory)
    print(f"entries: {entries}  index + next tokens: {size} bytes  bytes per entry: {size / max(entries, 1):.1f}")
    if shards:
        token_bytes = sum((args.directory / shard["file"]).stat().st_size for shard in shards)
        print(f"token shards: {len(shards)} ({token_bytes} bytes)")
    return 0


def _how_to_resume() -> str:
    """What Ctrl-C during a build or add keeps: its finished shards."""
    return "run the same command with --resume to finish it, or arrag db rollback to abandon it"


def _print_report(verb: str, directory: Path, report: BuildReport) -> None:
    print(
        f"{verb} {directory}: {report.images_added} images, {report.entries} entries in {report.seconds:.1f} s "
        f"({report.engine} engine; {report.index}, {report.bytes_per_entry:.1f} bytes per entry)"
    )
    if report.shards_resumed:
        print(f"  resumed: {report.shards_resumed} of {report.shards} shards were already tokenized")
    for skipped in report.skipped:
        print(f"  skipped {skipped['path']}: {skipped['reason']}")
    if report.ignored:
        print(
            f"  ignored {len(report.ignored)} files that are not images, tar or Parquet files (see build-report.json)"
        )
