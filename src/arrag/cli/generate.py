"""``arrag generate``: prompts -> PNG images with their metadata, with DAiD or FAiD when given a database.

Images are written batch by batch as they are finished, into a fresh run folder unless --out names one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from arrag.cli.options import (
    Commands,
    add_generation_options,
    command,
    default,
    generation_config,
    load_resources,
    on_interrupt,
)
from arrag.config import GenerationConfig
from arrag.decoding.loop import generate_in_batches
from arrag.metadata import Settings
from arrag.outputs import SAMPLES, ImageWriter, check_out, holds_images
from arrag.progress import ImageBar
from arrag.serve.provenance import SourceImages, write_provenance


def register(commands: Commands) -> None:
    parser = command(commands, "generate", "prompts -> PNG images, with DAiD when given a patch database")
    parser.add_argument("prompts", nargs="+", metavar="PROMPT")
    images = default(GenerationConfig, "num_images_per_prompt")
    add_generation_options(parser, images=images, seeds="image i of the request is seeded seed + i")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=default(generate_in_batches, "batch_size"),
        help="images decoded at once and written when done; memory grows with it, the images do not change",
    )
    parser.add_argument(
        "--out", type=Path, help=f"folder of the PNGs and their JSON (default: a new run-NNNN in {SAMPLES})"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the images of an earlier run in --out")
    parser.add_argument(
        "--provenance",
        action="store_true",
        help="beside each image, NAME-provenance.png: its retrieval share per patch and top source patches",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.out is not None:  # refused before any work
        check_out(args.out, args.overwrite, holds_images)
    resources = load_resources(args)
    backend, database = resources.backend, resources.database
    config = generation_config(args, backend)
    if args.provenance and database is None:
        raise ValueError("--provenance shows where retrieved tokens came from; use a method with retrieval")
    sources = SourceImages(database, backend, Path(resources.database_name)) if args.provenance else None
    settings = Settings(
        backend.name, config, resources.database_name, resources.faid_name, None, resources.retrieval_from
    )
    rows = len(args.prompts) * config.num_images_per_prompt
    writer = ImageWriter(settings, rows, args.out, database, args.overwrite)

    def kept() -> str:
        if writer.folder is None:
            return f"none of the {rows} images was finished"
        return f"{writer.written} of {rows} images are in {writer.folder}"

    with on_interrupt(kept), ImageBar(rows, "generating") as bar:
        batches = generate_in_batches(
            backend, args.prompts, config, database, resources.faid, args.batch_size, bar.update
        )
        for output in batches:
            paths = writer.write(output)
            if sources is not None:
                write_provenance(output, paths, backend.grid, sources)
            for path, seed, prompt in zip(paths, output.seeds, output.prompts, strict=True):
                tqdm.write(f"{path}  seed={seed}  {prompt!r}")
    print(f"{rows} image{'s' if rows > 1 else ''} in {writer.folder}")
    return 0
