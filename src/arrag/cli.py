"""Command line: ``arrag generate``, ``arrag db build``, ``arrag db info``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from arrag import __version__
from arrag.config import METHODS


def _generate(args: argparse.Namespace) -> int:
    from arrag.backends import load_backend
    from arrag.config import GenerationConfig, RetrievalConfig, SamplingConfig
    from arrag.database import PatchDatabase, read_manifest
    from arrag.decoding.loop import generate
    from arrag.images import save_image

    method = args.method or ("daid" if args.db else "none")
    config = GenerationConfig(
        method=method,
        sampling=SamplingConfig(
            guidance_scale=args.guidance_scale,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            filter_order=args.filter_order,
        ),
        retrieval=RetrievalConfig(weight=args.lam, temperature=args.tau, k=args.k, duplicates=args.duplicates),
        num_images_per_prompt=args.num_images,
        seed=args.seed,
    )
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
    output = generate(backend, args.prompts, config, database, faid=adapter)
    args.out.mkdir(parents=True, exist_ok=True)
    n = config.num_images_per_prompt
    for row, (prompt, seed) in enumerate(zip(output.prompts, output.seeds, strict=True)):
        records = output.records
        image_ids = records.image_ids[row].tolist()
        sorted(set(image_ids) - {-1})
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


def _db_build(args: argparse.Namespace) -> int:
    from arrag.backends import load_backend
    from arrag.build import build_database
    from arrag.grid import Neighbourhood

    backend = load_backend(args.backend, args.device, args.dtype)
    report = build_database(
        backend,
        args.images,
        args.out,
        Neighbourhood(args.hops, args.missing),
        args.key_source,
        args.batch_size,
        args.overwrite,
    )
    print(f"built {args.out}: {report.images_added} images, {report.entries} entries in {report.seconds:.1f} s")
    for skipped in report.skipped:
        print(f"  skipped {skipped['path']}: {skipped['reason']}")
    return 0


def _db_info(args: argparse.Namespace) -> int:
    from arrag.database import INDEX_FILE, read_manifest

    manifest = read_manifest(args.directory)
    entries = manifest["counts"]["entries"]
    index_bytes = (args.directory / INDEX_FILE).stat().st_size
    print(json.dumps(manifest, indent=2))
    print(f"entries: {entries}  index size: {index_bytes} bytes  bytes per entry: {index_bytes / max(entries, 1):.1f}")
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
    from arrag.database import PatchDatabase

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
        train.train_generator(args.out, args.tokenizer, steps=args.steps, seed=args.seed, command=command)
    else:
        recipe = {"classifier": train.train_classifier, "tokenizer": train.train_tokenizer}[args.what]
        recipe(args.out, steps=args.steps, seed=args.seed, command=command)
    print(f"weights and config written to {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from arrag.config import RetrievalConfig
    from arrag.demo import DemoConfig, run_demo

    config = DemoConfig(
        out=args.out,
        prompts=args.prompts,
        images_per_prompt=args.num_images,
        seed=args.seed,
        retrieval=RetrievalConfig(weight=args.lam, temperature=args.tau, k=args.k),
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
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arrag", description="Autoregressive retrieval augmentation (AR-RAG)")
    parser.add_argument("--version", action="version", version=f"arrag {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of the library")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="prompts -> PNG images, with DAiD when given a patch database")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument(
        "--backend", help="builtin, tiny, a Janus-Pro hub id or folder (default: the database's, else builtin)"
    )
    gen.add_argument("--db", type=Path, help="patch database directory (arrag db build)")
    gen.add_argument("--method", choices=list(METHODS), help="default: daid with --db, else none")
    gen.add_argument("--faid", type=Path, help="FAiD adapter folder (default for builtin: the shipped adapter)")
    gen.add_argument("--lambda", dest="lam", type=float, default=0.3, help="retrieval weight λ in [0, 1]")
    gen.add_argument("--tau", type=float, default=1.0, help="retrieval temperature τ > 0")
    gen.add_argument("--k", type=int, default=2048, help="neighbours retrieved per position")
    gen.add_argument(
        "--duplicates",
        choices=["nearest", "sum"],
        default="nearest",
        help="weigh each retrieved token by its nearest occurrence (paper) or by all (kNN-LM)",
    )
    gen.add_argument("--guidance-scale", type=float, default=5.0)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--filter-order", choices=["after_merge", "before_merge"], default="after_merge")
    gen.add_argument("--seed", type=int, default=0, help="image i of the request is seeded seed + i")
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt")
    gen.add_argument("--out", type=Path, default=Path("samples"))
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="Janus weights")
    gen.set_defaults(handler=_generate)

    db = sub.add_parser("db", help="patch databases").add_subparsers(dest="db_command", required=True)
    build = db.add_parser("build", help="images -> patch database through a backend's tokenizer")
    build.add_argument("images", nargs="+", type=Path, metavar="IMAGES", help="image files or folders (recursive)")
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
    build.add_argument("--batch-size", type=int, default=32)
    build.add_argument("--overwrite", action="store_true", help="replace an existing database at --out")
    build.add_argument("--device", default="cpu")
    build.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="Janus weights")
    build.set_defaults(handler=_db_build)

    info = db.add_parser("info", help="print a database's manifest and size")
    info.add_argument("directory", type=Path)
    info.set_defaults(handler=_db_info)
    demo = sub.add_parser("demo", help="the built-in model with and without DAiD, judged by the world's checker")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--cache", type=Path, help="where the world's patch database is cached")
    demo.add_argument("--prompts", type=int, default=6)
    demo.add_argument("--num-images", type=int, default=2, help="images per prompt")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--lambda", dest="lam", type=float, default=0.3)
    demo.add_argument("--tau", type=float, default=1.0)
    demo.add_argument("--k", type=int, default=2048)
    demo.set_defaults(handler=_demo)

    world = sub.add_parser("world", help="the built-in world").add_subparsers(dest="world_command", required=True)
    world_report = world.add_parser("report", help="measure the checker, tokenizer and generator on held-out data")
    world_report.add_argument("--part", choices=["checker", "tokenizer", "generator", "all"], default="all")
    world_report.add_argument("--backend", default="builtin")
    world_report.add_argument("--prompts", type=int, default=360, help="held-out prompts for the generator")
    world_report.add_argument("--num-images", type=int, default=4, help="images per held-out prompt")
    world_report.add_argument("--out", type=Path, help="also write the JSON here")
    world_report.set_defaults(handler=_world_report)

    trainer = sub.add_parser("train", help="train the built-in world's models (resumes from --out)")
    trainer.add_argument("what", choices=["classifier", "tokenizer", "generator", "faid"])
    trainer.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, weights, config")
    trainer.add_argument("--steps", type=int, required=True)
    trainer.add_argument("--seed", type=int, default=0)
    trainer.add_argument("--tokenizer", type=Path, help="trained tokenizer folder (for the generator)")
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
