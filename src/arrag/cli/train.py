"""``arrag train classifier | tokenizer | generator | faid``: the built-in world's models and FAiD adapters.

Every run resumes from the checkpoint in its --out folder and records its command in the model's config.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

import numpy as np

from arrag.backends import load_backend
from arrag.cli.options import BUILTIN_BACKEND, Commands, add_device_options, command, command_line, default
from arrag.faid.blender import FaidConfig
from arrag.faid.train import FaidSchedule, QuerySource, train_faid, train_world_faid
from arrag.retrieval.database import PatchDatabase
from arrag.world import train as recipes

# A learning rate given for the generator starts a second schedule (docs/world.md): a shorter warm-up.
SECOND_SCHEDULE_WARMUP = 50


def register(commands: Commands) -> None:
    train = command(commands, "train", "train the built-in world's models or a FAiD adapter (resumes from --out)")
    kinds = train.add_subparsers(dest="what", required=True)
    for name, recipe in (("classifier", recipes.train_classifier), ("tokenizer", recipes.train_tokenizer)):
        parser = command(kinds, name, f"train the built-in world's {name}")
        _add_run_options(parser, default(recipe, "steps"), default(recipe, "seed"))
        parser.set_defaults(handler=run_world, recipe=recipe)

    generator = command(kinds, "generator", "train the built-in world's text-to-image transformer")
    _add_run_options(generator, default(recipes.train_generator, "steps"), default(recipes.train_generator, "seed"))
    generator.add_argument("--tokenizer", type=Path, required=True, help="a trained tokenizer's folder")
    generator.add_argument("--init", type=Path, help="start from a trained generator folder's weights")
    rate, warmup = default(recipes.train_generator, "learning_rate"), default(recipes.train_generator, "warmup_steps")
    generator.add_argument(
        "--learning-rate",
        type=float,
        help=f"peak learning rate (default: {rate} after {warmup} warm-up steps; "
        f"a rate given here gets {SECOND_SCHEDULE_WARMUP})",
    )
    generator.set_defaults(handler=run_generator)

    faid = command(kinds, "faid", "train a FAiD adapter with teacher forcing (docs/faid.md)")
    _add_run_options(faid, None, default(FaidSchedule, "seed"))
    faid.add_argument(
        "--backend", default=BUILTIN_BACKEND, help="builtin (the world's data), or a Janus-Pro id / folder"
    )
    faid.add_argument("--data", type=Path, help="npz with 'captions' (N,) and 'tokens' (N, R·C), for other backends")
    faid.add_argument("--db", type=Path, help="patch database (builtin: where the world's one is built / cached)")
    faid.add_argument(
        "--query-source",
        choices=get_args(QuerySource),
        default=default(train_faid, "query_source"),
        help="training queries from the true tokens (paper) or from tokens the model samples",
    )
    faid.add_argument("--k", type=int, default=default(FaidConfig, "k"), help="retrieved candidates per position")
    faid.add_argument(
        "--probes", type=int, default=default(train_faid, "probes"), help="IVF cells searched per query (0: exact)"
    )
    faid.add_argument(
        "--blenders", type=int, default=default(FaidConfig, "blenders"), help="blender layers b, evenly spaced"
    )
    faid.add_argument(
        "--blender-hops",
        type=int,
        nargs="+",
        default=list(default(FaidConfig, "hops")),
        help="the blenders' neighbourhood radii, one branch each",
    )
    faid.add_argument(
        "--lora-rank", type=int, default=default(FaidConfig, "lora_rank"), help="LoRA on the attention (0: none)"
    )
    faid.add_argument("--frozen-head", action="store_true", help="do not fine-tune the image-token head")
    faid.add_argument("--batch-size", type=int, default=default(FaidSchedule, "batch_size"), help="rows per step")
    faid.add_argument(
        "--accumulation", type=int, default=default(FaidSchedule, "accumulation"), help="micro-batches per step"
    )
    faid.add_argument(
        "--learning-rate", type=float, default=default(FaidSchedule, "learning_rate"), help="peak learning rate"
    )
    faid.add_argument(
        "--caption-dropout",
        type=float,
        default=default(train_faid, "caption_dropout"),
        help="share of captions dropped (guidance's unconditional rows)",
    )
    faid.add_argument(
        "--scenes", type=int, default=default(train_world_faid, "scenes"), help="builtin: scenes of the train pool"
    )
    add_device_options(faid)
    faid.set_defaults(handler=run_faid)


def _add_run_options(parser: argparse.ArgumentParser, steps: int | None, seed: int) -> None:
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, weights, config")
    parser.add_argument("--steps", type=int, default=steps, required=steps is None, help="optimiser steps")
    parser.add_argument("--seed", type=int, default=seed, help="of the data, the initial weights and the sampling")


def _run_options(args: argparse.Namespace) -> dict[str, object]:
    return {"out": args.out, "steps": args.steps, "seed": args.seed, "command": command_line(args)}


def run_world(args: argparse.Namespace) -> int:
    args.recipe(**_run_options(args))
    print(f"weights and config written to {args.out}")
    return 0


def run_generator(args: argparse.Namespace) -> int:
    schedule = {}
    if args.learning_rate is not None:
        schedule = {"learning_rate": args.learning_rate, "warmup_steps": SECOND_SCHEDULE_WARMUP}
    recipes.train_generator(tokenizer_dir=args.tokenizer, init=args.init, **schedule, **_run_options(args))
    print(f"weights and config written to {args.out}")
    return 0


def run_faid(args: argparse.Namespace) -> int:
    config = FaidConfig(
        hops=tuple(args.blender_hops),
        blenders=args.blenders,
        k=args.k,
        lora_rank=args.lora_rank,
        train_head=not args.frozen_head,
    )
    schedule = FaidSchedule(args.steps, args.batch_size, args.learning_rate, args.accumulation, args.seed)
    common = {
        "query_source": args.query_source,
        "caption_dropout": args.caption_dropout,
        "probes": args.probes or None,
    }
    if args.backend == BUILTIN_BACKEND:
        train_world_faid(
            args.out, schedule, config, args.scenes, database_dir=args.db, command=command_line(args), **common
        )
    else:
        _train_other_faid(args, schedule, config, common)
    print(f"weights and config written to {args.out}")
    return 0


def _train_other_faid(args: argparse.Namespace, schedule: FaidSchedule, config: FaidConfig, common: dict) -> None:
    if args.data is None or args.db is None:
        raise ValueError("FAiD for a backend other than builtin needs --data NPZ (captions, tokens) and --db DIR")
    backend = load_backend(args.backend, args.device, args.dtype)
    data = np.load(args.data)
    description = {"command": command_line(args), "database": str(args.db), "data": str(args.data)}
    captions = [str(caption) for caption in data["captions"]]
    database = PatchDatabase.load(args.db)
    train_config = schedule.train_config()
    train_faid(
        backend, captions, data["tokens"], database, args.out, config, train_config, **common, description=description
    )
