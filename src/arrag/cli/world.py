"""``arrag world report``: the built-in world's checker, tokenizer and generator measured on held-out data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from arrag.backends import load_backend
from arrag.cli.options import BUILTIN_BACKEND, Commands, command, default
from arrag.config import SamplingConfig
from arrag.world import report

PARTS = ("checker", "tokenizer", "generator", "all", "sampling")
CANDIDATES = ("5", "3", "3:20")


def register(commands: Commands) -> None:
    world = command(commands, "world", "the built-in world")
    parts = world.add_subparsers(dest="world_command", required=True)
    parser = command(parts, "report", "measure the checker, tokenizer and generator on held-out data")
    parser.add_argument(
        "--part",
        choices=PARTS,
        default="all",
        help="sampling: choose the generator's own sampling on validation prompts (not part of all)",
    )
    parser.add_argument("--backend", default=BUILTIN_BACKEND, help="the generator and tokenizer measured")
    generator, sampling = report.generator_report, report.sampling_report
    parser.add_argument(
        "--prompts",
        type=int,
        help=f"held-out (sampling: validation) prompts (default: {default(generator, 'prompts')}; "
        f"sampling: {default(sampling, 'prompts')})",
    )
    parser.add_argument(
        "--num-images",
        type=int,
        help=f"images per prompt (default: {default(generator, 'images_per_prompt')}; "
        f"sampling: {default(sampling, 'images_per_prompt')})",
    )
    parser.add_argument(
        "--candidates", nargs="+", default=list(CANDIDATES), help="sampling candidates GUIDANCE[:TOP_K]"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.set_defaults(handler=run)


def sampling_candidate(text: str) -> SamplingConfig:
    """``G`` or ``G:K`` -> sampling with guidance G and top-k K (none without it)."""
    guidance, _, top_k = text.partition(":")
    try:
        return SamplingConfig(guidance_scale=float(guidance), top_k=int(top_k) if top_k else None)
    except ValueError as error:
        raise ValueError(f"a sampling candidate is GUIDANCE or GUIDANCE:TOP_K, like 3 or 3:20; got {text!r}") from error


def run(args: argparse.Namespace) -> int:
    sizes = {"prompts": args.prompts, "images_per_prompt": args.num_images}
    sizes = {name: value for name, value in sizes.items() if value is not None}
    checker = report.load_checker()
    results: dict[str, object] = {}
    if args.part in ("checker", "all"):
        results["checker"] = report.checker_report(checker)
    if args.part in ("tokenizer", "all"):
        results["tokenizer"] = report.tokenizer_report(load_backend(args.backend), checker)
    if args.part in ("generator", "all"):
        results["generator"] = report.generator_report(load_backend(args.backend), checker, **sizes)
    if args.part == "sampling":
        candidates = [sampling_candidate(text) for text in args.candidates]
        results["sampling"] = report.sampling_report(load_backend(args.backend), checker, candidates, **sizes)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0
