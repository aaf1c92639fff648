"""Command line: ``arrag generate``, ``arrag db build``, ``arrag db info``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from arrag import __version__
from arrag.config import METHODS

if TYPE_CHECKING:
    from arrag.backends.base import Backend
    from arrag.config import GenerationConfig
    from arrag.faid.blender import FaidAdapter
    from arrag.retrieval.database import PatchDatabase


def _method(args: argparse.Namespace) -> str:
    return args.method or ("daid" if args.db else "none")


def _generation_config(args: argparse.Namespace, backend: Backend) -> GenerationConfig:
    """The request the options describe; sampling options left out take the backend's own values."""
    from dataclasses import replace

    from arrag.config import GenerationConfig, RetrievalConfig

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
        method=_method(args),
        sampling=replace(backend.sampling, **changes),
        retrieval=RetrievalConfig(weight=args.lam, temperature=args.tau, k=args.k, duplicates=args.duplicates),
        num_images_per_prompt=args.num_images,
        seed=args.seed,
    )


def _backend_and_database(
    args: argparse.Namespace, method: str
) -> tuple[Backend, PatchDatabase | None, FaidAdapter | None]:
    """The backend (default: the database's, else builtin), for retrieval the database checked against it, and
    for FAiD the adapter (--faid, else the one shipped for the backend)."""
    from arrag.backends import load_backend
    from arrag.retrieval.database import PatchDatabase, read_manifest

    backend_name = args.backend or (read_manifest(args.db)["spec"]["backend"] if args.db else "builtin")
    backend = load_backend(backend_name, args.device, args.dtype)
    database = None
    if args.db and method != "none":
        database = PatchDatabase.load(args.db)
        database.check_backend(backend)
    adapter = None
    if "faid" in method:
        from arrag.faid.files import load_adapter, shipped_adapter

        adapter = load_adapter(args.faid, backend) if args.faid else shipped_adapter(backend)
        if adapter is None:
            raise ValueError(f"--method {method} needs --faid DIR (no FAiD adapter is shipped for {backend.name})")
    return backend, database, adapter


def _generate(args: argparse.Namespace) -> int:
    from arrag.decoding.loop import generate
    from arrag.images import save_image

    backend, database, adapter = _backend_and_database(args, _method(args))
    config = _generation_config(args, backend)
    output = generate(backend, args.prompts, config, database, faid=adapter)
    args.out.mkdir(parents=True, exist_ok=True)
    n = config.num_images_per_prompt
    for row, (prompt, seed) in enumerate(zip(output.prompts, output.seeds, strict=True)):
        records = output.records
        image_ids = records.image_ids[row].tolist()
        metadata = {
            "prompt": prompt,
            "seed": seed,
            "backend": backend.name,
            "database": str(args.db) if database is not None else None,
            "faid": (str(args.faid) if args.faid else "shipped") if adapter is not None else None,
            "arrag_version": __version__,
            "config": config.to_dict(),
            "tokens": output.tokens[row].tolist(),
            "provenance": {  # per position: the database patch whose next token was the sampled one
                "image_ids": image_ids,
                "positions": records.positions[row].tolist(),
                "sources": {i: database.sources[i] for i in sorted(set(image_ids) - {-1})}
                if database is not None
                else {},
            },
        }
        path = args.out / f"prompt{row // n:03d}-image{row % n:02d}.png"
        save_image(output.images[row], path, metadata)
        print(f"{path}  seed={seed}  {prompt!r}")
    return 0


def _build_config(args: argparse.Namespace, **fields: object):
    from arrag.build import BuildConfig
    from arrag.build.sources import SourceConfig

    sources = SourceConfig(shard_size=args.shard_size, image_column=args.image_column)
    return BuildConfig(sources=sources, batch_size=args.batch_size, engine=args.engine, address=args.address, **fields)


def _print_report(verb: str, directory: Path, report) -> None:
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


def _db_build(args: argparse.Namespace) -> int:
    from arrag.backends import BackendRef
    from arrag.build import build_database
    from arrag.retrieval.grid import Neighbourhood
    from arrag.retrieval.indexes import IndexConfig

    index = IndexConfig(args.index, args.on_disk, args.search_params, args.train_size)
    config = _build_config(
        args, neighbourhood=Neighbourhood(args.hops, args.missing), key_source=args.key_source, index=index
    )
    backend = BackendRef(args.backend, args.device, args.dtype)
    with _resumable():
        report = build_database(backend, args.images, args.out, config, overwrite=args.overwrite, resume=args.resume)
    _print_report("built", args.out, report)
    return 0


@contextlib.contextmanager
def _resumable() -> Iterator[None]:
    """On Ctrl-C, say how to finish the interrupted build or add instead of showing a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print("\narrag: interrupted; run the same command with --resume to finish it", file=sys.stderr)
        raise SystemExit(130) from None


def _db_add(args: argparse.Namespace) -> int:
    from arrag.backends import BackendRef
    from arrag.build import add_to_database
    from arrag.retrieval.database import read_manifest

    name = args.backend or read_manifest(args.directory)["spec"]["backend"]
    backend = BackendRef(name, args.device, args.dtype)
    with _resumable():
        report = add_to_database(backend, args.images, args.directory, _build_config(args), resume=args.resume)
    _print_report("added to", args.directory, report)
    return 0


def _db_info(args: argparse.Namespace) -> int:
    from arrag.retrieval.database import index_bytes, read_manifest

    manifest = read_manifest(args.directory)
    shards = manifest.pop("token_shards", [])
    print(json.dumps(manifest, indent=2))
    entries = manifest["counts"]["entries"]
    size = index_bytes(args.directory)
    per_entry = size / max(entries, 1)
    print(f"entries: {entries}  index + next tokens: {size} bytes  bytes per entry: {per_entry:.1f}")
    if shards:
        token_bytes = sum((args.directory / shard["file"]).stat().st_size for shard in shards)
        print(f"token shards: {len(shards)} ({token_bytes} bytes)")
    return 0


def _train_faid(args: argparse.Namespace, command: str) -> None:
    import numpy as np

    from arrag.faid.blender import FaidConfig
    from arrag.faid.train import train_faid, train_world_faid
    from arrag.training import TrainConfig

    config = FaidConfig(
        hops=tuple(args.hops),
        blenders=args.blenders,
        k=args.k,
        lora_rank=args.lora_rank,
        train_head=not args.frozen_head,
    )
    common = {
        "query_source": args.query_source,
        "caption_dropout": args.caption_dropout,
        "probes": args.probes or None,
    }
    if args.backend == "builtin":
        train_world_faid(
            args.out,
            args.steps,
            config,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            accumulation=args.accumulation,
            scenes=args.scenes,
            database_dir=args.db,
            seed=args.seed,
            command=command,
            **common,
        )
        return
    from arrag.backends import load_backend
    from arrag.retrieval.database import PatchDatabase

    if args.data is None or args.db is None:
        raise ValueError("FAiD for a backend other than builtin needs --data NPZ (captions, tokens) and --db DIR")
    backend = load_backend(args.backend, args.device, args.dtype)
    data = np.load(args.data)
    train_config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=max(1, args.steps // 10),
        accumulation=args.accumulation,
        checkpoint_every=50,
        seed=args.seed,
    )
    description = {"command": command, "database": str(args.db), "data": str(args.data)}
    train_faid(
        backend,
        [str(c) for c in data["captions"]],
        data["tokens"],
        PatchDatabase.load(args.db),
        args.out,
        config,
        train_config,
        description=description,
        **common,
    )


def _train(args: argparse.Namespace) -> int:
    from arrag.world import train

    command = " ".join(["arrag", *sys.argv[1:]])
    if args.what == "faid":
        _train_faid(args, command)
    elif args.what == "generator":
        if args.tokenizer is None:
            raise ValueError("arrag train generator needs --tokenizer DIR (a trained tokenizer's folder)")
        schedule = {} if args.learning_rate is None else {"learning_rate": args.learning_rate, "warmup_steps": 50}
        train.train_generator(
            args.out, args.tokenizer, steps=args.steps, seed=args.seed, command=command, init=args.init, **schedule
        )
    else:
        recipe = {"classifier": train.train_classifier, "tokenizer": train.train_tokenizer}[args.what]
        recipe(args.out, steps=args.steps, seed=args.seed, command=command)
    print(f"weights and config written to {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from arrag.demo import DemoConfig, run_demo

    given = {"weight": args.lam, "temperature": args.tau, "k": args.k, "duplicates": args.duplicates}
    config = DemoConfig(
        out=args.out,
        prompts=args.prompts,
        images_per_prompt=args.num_images,
        seed=args.seed,
        retrieval=replace(DemoConfig().retrieval, **{name: v for name, v in given.items() if v is not None}),
        **({"cache": args.cache} if args.cache else {}),
    )
    summary = run_demo(config)
    columns = ", ".join(summary["fraction_correct"])
    print(f"grid:    {config.out / 'grid.png'}   (columns: {columns}; same seeds)")
    print(f"summary: {config.out / 'summary.json'}")
    for method, score in summary["fraction_correct"].items():
        print(f"  {method:5s} judged correct by the world's checker: {score:.0%}")
    seconds = summary["seconds"]
    print(
        f"database: {summary['database_entries']} entries ({seconds['database']:.0f} s); total {seconds['total']:.0f} s"
    )
    return 0


def _sampling_candidate(text: str):
    """``G`` or ``G:K`` -> sampling with guidance G and top-k K (none without it)."""
    from arrag.config import SamplingConfig

    guidance, _, top_k = text.partition(":")
    try:
        return SamplingConfig(guidance_scale=float(guidance), top_k=int(top_k) if top_k else None)
    except ValueError as error:
        raise ValueError(f"a sampling candidate is GUIDANCE or GUIDANCE:TOP_K, like 3 or 3:20; got {text!r}") from error


def _world_report(args: argparse.Namespace) -> int:
    from arrag.backends import load_backend
    from arrag.world import report

    checker = report.load_checker()
    results: dict[str, object] = {}
    if args.part in ("checker", "all"):
        results["checker"] = report.checker_report(checker)
    if args.part in ("tokenizer", "all"):
        results["tokenizer"] = report.tokenizer_report(load_backend(args.backend), checker)
    if args.part in ("generator", "all"):
        results["generator"] = report.generator_report(
            load_backend(args.backend), checker, prompts=args.prompts, images_per_prompt=args.num_images
        )
    if args.part == "sampling":
        candidates = [_sampling_candidate(text) for text in args.candidates]
        results["sampling"] = report.sampling_report(
            load_backend(args.backend), checker, candidates, args.prompts, args.num_images
        )
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from arrag.evaluation.experiment import EvalConfig, evaluate
    from arrag.evaluation.report import write_report

    config = EvalConfig.quick(args.out) if args.quick else EvalConfig(out=args.out)
    overrides = {"test_prompts": args.test_prompts, "images_per_prompt": args.num_images, "faid": args.faid}
    if args.seeds is not None:
        overrides["seeds"] = tuple(args.seeds)
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    results = evaluate(config)
    report = write_report(results, config.out, "arrag " + " ".join(sys.argv[1:]))
    for entry in results["methods"].values():
        print(f"{entry['name']:42s} overall {entry['scores']['overall']}  near-copies {entry['copy_rate']:.3f}")
    print(f"report: {report}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.bench_command == "fid":
        from arrag.bench.fid import folder_quality, load_features
        from arrag.evaluation.quality import QualityConfig

        config = QualityConfig(args.batch_size, args.kid_subsets, args.kid_subset_size)
        measured = folder_quality(
            args.generated, args.reference, load_features(args.features, args.inception_weights), config, args.glob
        )
        text = json.dumps(measured.report(), indent=2, ensure_ascii=False)
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0
    from arrag.bench.dpg import run_dpg
    from arrag.bench.geneval import run_geneval
    from arrag.bench.runner import BenchConfig

    backend, database, adapter = _backend_and_database(args, _method(args))
    generation = _generation_config(args, backend)
    config = BenchConfig(generation, args.start, args.limit, args.batch_prompts, args.max_prompt_bytes)
    where = args.db if database is not None else None
    if args.bench_command == "geneval":
        summary = run_geneval(args.prompts, args.out, backend, config, database, where, args.grid, adapter)
    else:
        summary = run_dpg(args.prompts, args.out, backend, config, database, where, adapter)
    print(
        f"{args.out}: {len(summary.generated)} prompts generated, {len(summary.skipped)} already finished "
        f"({summary.seconds:.0f} s)"
    )
    return 0


def _add_generation_options(parser: argparse.ArgumentParser, images: int | None, seeds: str) -> None:
    """Backend, database, sampling and retrieval options; ``images=None`` leaves out --num-images."""
    parser.add_argument(
        "--backend", help="builtin, tiny, a Janus-Pro hub id or folder (default: the database's, else builtin)"
    )
    parser.add_argument("--db", type=Path, help="patch database directory (arrag db build)")
    parser.add_argument("--method", choices=list(METHODS), help="default: daid with --db, else none")
    parser.add_argument("--faid", type=Path, help="FAiD adapter folder (default for builtin: the shipped adapter)")
    parser.add_argument("--lambda", dest="lam", type=float, default=0.3, help="retrieval weight λ in [0, 1]")
    parser.add_argument("--tau", type=float, default=1.0, help="retrieval temperature τ > 0")
    parser.add_argument("--k", type=int, default=2048, help="neighbours retrieved per position")
    parser.add_argument(
        "--duplicates",
        choices=["nearest", "sum"],
        default="nearest",
        help="weigh each retrieved token by its nearest occurrence (paper) or by all (kNN-LM)",
    )
    backends_own = "default: the backend's own (builtin: its config.json; Janus-Pro: guidance 5, temperature 1)"
    sampling = parser.add_argument_group("sampling", backends_own)
    sampling.add_argument("--guidance-scale", type=float, help="classifier-free guidance; 1 turns it off")
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--top-k", type=int, help="0 turns top-k off")
    sampling.add_argument("--top-p", type=float, help="0 turns top-p off")
    sampling.add_argument("--filter-order", choices=["after_merge", "before_merge"])
    parser.add_argument("--seed", type=int, default=0, help=seeds)
    if images is None:
        parser.set_defaults(num_images=4)
    else:
        parser.add_argument("--num-images", type=int, default=images, help="images per prompt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="Janus weights")


def _add_engine_options(command: argparse.ArgumentParser) -> None:
    """Options of db build and db add: engine, sharding, tokenizer batch, device."""
    command.add_argument("--engine", choices=["local", "ray"], default="local", help="ray: Ray Data (arrag[scale])")
    command.add_argument("--address", help="ray: the cluster to join (HOST:PORT or auto); default: start Ray here")
    command.add_argument("--shard-size", type=int, default=1000, help="image files per shard")
    command.add_argument("--image-column", help="Parquet column with the image bytes (default: image, jpg, ...)")
    command.add_argument("--batch-size", type=int, default=32, help="images per tokenizer call")
    command.add_argument("--device", default="cpu")
    command.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="Janus weights")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arrag", description="Autoregressive retrieval augmentation (AR-RAG)")
    parser.add_argument("--version", action="version", version=f"arrag {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of the library")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="prompts -> PNG images, with DAiD when given a patch database")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    _add_generation_options(gen, images=1, seeds="image i of the request is seeded seed + i")
    gen.add_argument("--out", type=Path, default=Path("samples"))
    gen.set_defaults(handler=_generate)

    db = sub.add_parser("db", help="patch databases").add_subparsers(dest="db_command", required=True)
    build = db.add_parser("build", help="images -> patch database through a backend's tokenizer")
    build.add_argument(
        "images",
        nargs="+",
        metavar="IMAGES",
        help="image files, folders (recursive: PNG, JPEG, WebP, ..., WebDataset .tar, .parquet), or world:N",
    )
    build.add_argument("--out", type=Path, required=True)
    build.add_argument("--backend", default="builtin", help="builtin, tiny, a Janus-Pro hub id or folder")
    build.add_argument("--hops", type=int, default=1, help="causal neighbourhood radius (1: the paper's L)")
    build.add_argument(
        "--missing",
        choices=["skip", "zero"],
        default="skip",
        help="positions with neighbours off the grid: no entry (paper's code) or zero-padded",
    )
    build.add_argument("--key-source", choices=["codebook", "latents"], default="codebook")
    build.add_argument(
        "--index",
        default="Flat",
        help="Flat, CodebookPQ, IVF<n>,CodebookPQ (exact distances, compressed), IVF<n>,PQ<m>x4fs,Refine(CodebookPQ) "
        "(fast-scan shortlist, exact re-ranking), or a FAISS factory string such as OPQ8,IVF4096,PQ8 or HNSW32",
    )
    build.add_argument("--on-disk", action="store_true", help="IVF indexes: inverted lists in a memory-mapped file")
    build.add_argument("--search-params", default="", help="FAISS search parameters, e.g. nprobe=32 or efSearch=128")
    build.add_argument("--train-size", type=int, default=100_000, help="keys sampled to train the index")
    build.add_argument("--overwrite", action="store_true", help="replace an existing database at --out")
    build.add_argument("--resume", action="store_true", help="finish an interrupted build of the same command")
    _add_engine_options(build)
    add = db.add_parser("add", help="append images to an existing patch database")
    add.add_argument("directory", type=Path, metavar="DB")
    add.add_argument("images", nargs="+", metavar="IMAGES", help="as for db build")
    add.add_argument("--backend", help="default: the database's backend")
    add.add_argument("--resume", action="store_true", help="finish an interrupted add of the same command")
    _add_engine_options(add)
    build.set_defaults(handler=_db_build)
    add.set_defaults(handler=_db_add)

    info = db.add_parser("info", help="print a database's manifest and size")
    info.add_argument("directory", type=Path)
    info.set_defaults(handler=_db_info)
    demo = sub.add_parser("demo", help="the built-in model with and without DAiD, judged by the world's checker")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--cache", type=Path, help="where the world's patch database is cached")
    demo.add_argument("--prompts", type=int, default=6)
    demo.add_argument("--num-images", type=int, default=2, help="images per prompt")
    demo.add_argument("--seed", type=int, default=0)
    chosen = demo.add_argument_group("DAiD", "defaults: the setting arrag eval chose (docs/results.md)")
    chosen.add_argument("--lambda", dest="lam", type=float, help="retrieval weight λ in [0, 1]")
    chosen.add_argument("--tau", type=float, help="retrieval temperature τ > 0")
    chosen.add_argument("--k", type=int, help="neighbours retrieved per position")
    chosen.add_argument("--duplicates", choices=["nearest", "sum"])
    demo.set_defaults(handler=_demo)

    evaluation = sub.add_parser("eval", help="does retrieval help? base model, DAiD and image-level retrieval compared")
    evaluation.add_argument("--quick", action="store_true", help="small prompt sets, one seed: a few minutes")
    evaluation.add_argument("--out", type=Path, default=Path("runs/eval"))
    evaluation.add_argument("--test-prompts", type=int, help="held-out test prompts (default 552; quick 60)")
    evaluation.add_argument("--num-images", type=int, help="images per test prompt and seed (default 1)")
    evaluation.add_argument("--seeds", type=int, nargs="+", help="test seeds (default 0 1 2; quick 0)")
    evaluation.add_argument("--faid", type=Path, help="FAiD adapter folder (default: the shipped one, if any)")
    evaluation.set_defaults(handler=_eval)

    bench = sub.add_parser("bench", help="the paper's benchmarks: GenEval and DPG-Bench images, FID/KID of folders")
    benches = bench.add_subparsers(dest="bench_command", required=True)
    seeds = "image j of the prompt on line i (from 0) is seeded seed + i·n + j, n images per prompt"
    geneval = benches.add_parser("geneval", help="GenEval's prompts -> its official folder layout, to score with it")
    geneval.add_argument("prompts", type=Path, metavar="PROMPTS_JSONL", help="GenEval's evaluation_metadata.jsonl")
    _add_generation_options(geneval, images=4, seeds=seeds)
    geneval.add_argument("--grid", action="store_true", help="also write each prompt's grid.png")
    dpg = benches.add_parser("dpg", help="DPG-Bench's prompts -> one 2×2 grid <id>.png per prompt")
    dpg.add_argument("prompts", type=Path, metavar="PROMPTS_JSONL", help='one {"id", "prompt"} per line')
    _add_generation_options(dpg, images=None, seeds=seeds)
    for runner in (geneval, dpg):
        runner.add_argument("--out", type=Path, required=True, help="output folder; a rerun resumes it")
        runner.add_argument("--start", type=int, default=0, help="first prompt (line index) of this shard")
        runner.add_argument("--limit", type=int, help="at most this many prompts from --start")
        runner.add_argument("--batch-prompts", type=int, default=1, help="prompts decoded together")
        runner.add_argument(
            "--max-prompt-bytes", type=int, help="cut longer prompts to this many UTF-8 bytes (builtin and tiny: 48)"
        )
    fid = benches.add_parser("fid", help="FID and KID of generated images against reference images")
    fid.add_argument("generated", type=Path, metavar="GENERATED", help="folder of generated images (recursive)")
    fid.add_argument("reference", type=Path, metavar="REFERENCE", help="folder of reference images (recursive)")
    fid.add_argument(
        "--features",
        choices=["inception", "efficientnet-lite0"],
        default="inception",
        help="inception: the standard FID (needs torch-fidelity and a weights download); "
        "efficientnet-lite0: offline, a Fréchet distance in other features",
    )
    fid.add_argument("--inception-weights", type=Path, help="FID's Inception weights file, for offline use")
    fid.add_argument("--glob", help="which generated files to read, e.g. '*/samples/*.png' for GenEval's layout")
    fid.add_argument("--batch-size", type=int, default=64)
    fid.add_argument("--kid-subsets", type=int, default=100)
    fid.add_argument("--kid-subset-size", type=int, default=1000, help="capped by the smaller folder")
    fid.add_argument("--out", type=Path, help="also write the JSON here")
    bench.set_defaults(handler=_bench)

    world = sub.add_parser("world", help="the built-in world").add_subparsers(dest="world_command", required=True)
    world_report = world.add_parser("report", help="measure the checker, tokenizer and generator on held-out data")
    world_report.add_argument(
        "--part",
        choices=["checker", "tokenizer", "generator", "all", "sampling"],
        default="all",
        help="sampling: choose the generator's own sampling on validation prompts (not part of all)",
    )
    world_report.add_argument("--backend", default="builtin")
    world_report.add_argument("--prompts", type=int, default=360, help="held-out (or validation) prompts")
    world_report.add_argument("--num-images", type=int, default=4, help="images per prompt")
    world_report.add_argument(
        "--candidates", nargs="+", default=["5", "3", "3:20"], help="sampling candidates GUIDANCE[:TOP_K]"
    )
    world_report.add_argument("--out", type=Path, help="also write the JSON here")
    world_report.set_defaults(handler=_world_report)

    trainer = sub.add_parser("train", help="train the built-in world's models (resumes from --out)")
    trainer.add_argument("what", choices=["classifier", "tokenizer", "generator", "faid"])
    trainer.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, weights, config")
    trainer.add_argument("--steps", type=int, required=True)
    trainer.add_argument("--seed", type=int, default=0)
    trainer.add_argument("--tokenizer", type=Path, help="trained tokenizer folder (for the generator)")
    trainer.add_argument("--init", type=Path, help="start the generator from a trained generator folder's weights")
    trainer.add_argument("--learning-rate", type=float, help="generator peak learning rate (default 1e-3)")
    faid = trainer.add_argument_group("faid", "FAiD adapter training (arrag train faid)")
    faid.add_argument("--backend", default="builtin", help="builtin (the world's data), or a Janus-Pro id / folder")
    faid.add_argument("--data", type=Path, help="npz with 'captions' (N,) and 'tokens' (N, R·C), for other backends")
    faid.add_argument("--db", type=Path, help="patch database (builtin: where the world's one is built / cached)")
    faid.add_argument("--query-source", choices=["ground_truth", "sampled"], default="ground_truth")
    faid.add_argument("--k", type=int, default=10, help="retrieved candidates per position")
    faid.add_argument("--probes", type=int, default=16, help="IVF cells searched per training query (0: exact)")
    faid.add_argument("--blenders", type=int, default=2, help="blender layers b, evenly spaced")
    faid.add_argument("--hops", type=int, nargs="+", default=[1, 2])
    faid.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on the attention projections (0: none)")
    faid.add_argument("--frozen-head", action="store_true", help="do not fine-tune the image-token head")
    faid.add_argument("--batch-size", type=int, default=16)
    faid.add_argument("--accumulation", type=int, default=1)
    faid.add_argument("--lr", type=float, default=1e-3)
    faid.add_argument("--caption-dropout", type=float, default=0.1)
    faid.add_argument("--scenes", type=int, default=5000, help="builtin: training scenes from the train pool")
    faid.add_argument("--device", default="cpu")
    faid.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    trainer.set_defaults(handler=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"arrag: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
