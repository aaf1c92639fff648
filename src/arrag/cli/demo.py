"""``arrag demo``: the built-in model with and without retrieval, judged by the world's checker."""

from __future__ import annotations

import argparse
from pathlib import Path

from arrag.cli.options import Commands, add_retrieval_options, command, default, on_interrupt, retrieval_config
from arrag.demo import RUNS, DemoConfig, run_demo


def register(commands: Commands) -> None:
    parser = command(commands, "demo", "the built-in model with and without DAiD, judged by the world's checker")
    parser.add_argument("--out", type=Path, help=f"grid and summary folder (default: a new run-NNNN in {RUNS})")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo's grid and summary in --out")
    parser.add_argument(
        "--cache", type=Path, default=default(DemoConfig, "cache"), help="where the world's patch database is cached"
    )
    parser.add_argument("--prompts", type=int, default=default(DemoConfig, "prompts"), help="prompts of the world")
    parser.add_argument(
        "--num-images", type=int, default=default(DemoConfig, "images_per_prompt"), help="images per prompt"
    )
    parser.add_argument("--seed", type=int, default=default(DemoConfig, "seed"), help="image i is seeded seed + i")
    chosen = parser.add_argument_group("DAiD", "defaults: the setting arrag eval chose (docs/results.md)")
    add_retrieval_options(chosen, default(DemoConfig, "retrieval"))
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = DemoConfig(
        out=args.out,
        overwrite=args.overwrite,
        cache=args.cache,
        prompts=args.prompts,
        images_per_prompt=args.num_images,
        seed=args.seed,
        retrieval=retrieval_config(args),
    )
    with on_interrupt(lambda: "nothing was written: the demo writes its grid and summary when it is done"):
        summary = run_demo(config)
    out = Path(summary["out"])
    columns = ", ".join(summary["fraction_correct"])
    print(f"grid:    {out / 'grid.png'}   (columns: {columns}; same seeds)")
    print(f"summary: {out / 'summary.json'}")
    for method, score in summary["fraction_correct"].items():
        print(f"  {method:5s} judged correct by the world's checker: {score:.0%}")
    seconds = summary["seconds"]
    print(
        f"database: {summary['database_entries']} entries ({seconds['database']:.0f} s); total {seconds['total']:.0f} s"
    )
    return 0
