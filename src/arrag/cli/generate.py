"""``arrag generate``: prompts -> PNG images with their metadata, with DAiD or FAiD when given a database."""

from __future__ import annotations

import argparse
from pathlib import Path

from arrag.cli.options import (
    Commands,
    add_generation_options,
    command,
    default,
    generation_config,
    load_resources,
)
from arrag.config import GenerationConfig
from arrag.decoding.loop import generate
from arrag.images import save_image
from arrag.metadata import Settings, image_metadata


def register(commands: Commands) -> None:
    parser = command(commands, "generate", "prompts -> PNG images, with DAiD when given a patch database")
    parser.add_argument("prompts", nargs="+", metavar="PROMPT")
    images = default(GenerationConfig, "num_images_per_prompt")
    add_generation_options(parser, images=images, seeds="image i of the request is seeded seed + i")
    parser.add_argument("--out", type=Path, default=Path("samples"), help="folder of the PNGs and their JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    resources = load_resources(args)
    config = generation_config(args, resources.backend)
    output = generate(resources.backend, args.prompts, config, resources.database, faid=resources.faid)
    settings = Settings(resources.backend.name, config, resources.database_name, resources.faid_name)
    args.out.mkdir(parents=True, exist_ok=True)
    n = config.num_images_per_prompt
    for row, (prompt, seed) in enumerate(zip(output.prompts, output.seeds, strict=True)):
        path = args.out / f"prompt{row // n:03d}-image{row % n:02d}.png"
        save_image(output.images[row], path, image_metadata(output, row, settings, resources.database))
        print(f"{path}  seed={seed}  {prompt!r}")
    return 0
