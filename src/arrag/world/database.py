"""The built-in world's patch database: scenes composed from the database pool's glyphs; the built-in model's
database by default (:func:`default_database`)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from arrag.backends.base import Backend
from arrag.build import BuildConfig, build_database
from arrag.retrieval.database import DatabaseSpec, PatchDatabase
from arrag.retrieval.grid import Neighbourhood
from arrag.retrieval.indexes import IndexConfig
from arrag.retrieval.layout import DatabaseLayout
from arrag.world.prompts import Prompt
from arrag.world.scenes import to_backend_input
from arrag.world.source import SCENE_BATCH, world_scenes

logger = logging.getLogger(__name__)

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "arrag"
BUILTIN_NAME = "builtin"  # the backend name of the shipped model (not of other builtin: folders)


def world_database_dir(
    cache: Path, backend: Backend, neighbourhood: Neighbourhood | None = None, index: IndexConfig | None = None
) -> Path:
    """Where the world database for ``backend``'s tokenizer, ``neighbourhood`` and index is cached in ``cache``."""
    name = f"world-db-{backend.codebook_fingerprint.removeprefix('sha256:')}"
    if neighbourhood is not None and neighbourhood != Neighbourhood():
        name += f"-{neighbourhood.name}"
    if index is not None and index != IndexConfig():
        name += "-" + re.sub(r"[^A-Za-z0-9]+", "_", f"{index.description} {index.search_params}").strip("_")
    return cache / name


def world_database(
    backend: Backend,
    directory: Path,
    scenes: int = 2000,
    neighbourhood: Neighbourhood | None = None,
    index: IndexConfig | None = None,
) -> PatchDatabase:
    """Load the world database from ``directory``, or build it there first (a build of ``world:scenes``).

    A cached database made for another backend, neighbourhood, index or size is rebuilt, never reused.
    """
    spec = DatabaseSpec.for_backend(backend, neighbourhood)
    index = index or IndexConfig()
    if DatabaseLayout(directory).manifest.exists():
        try:
            database = PatchDatabase.load(directory, expect=spec)
            if database.spec == spec and database.num_images == scenes and database.index_config == index:
                return database
        except ValueError as error:
            logger.warning("rebuilding the cached world database: %s", error)
    # a tokenizer batch per shard of scenes, as the world's own scenes were always tokenized
    config = BuildConfig(neighbourhood=spec.neighbourhood, index=index, batch_size=SCENE_BATCH)
    build_database(backend, [f"world:{scenes}"], directory, config, overwrite=True)
    return PatchDatabase.load(directory, expect=spec)


def world_database_scenes(
    backend: Backend, scenes: int, batch_size: int = SCENE_BATCH
) -> Iterator[tuple[list[Prompt], torch.Tensor]]:
    """The database pool's captioned scenes, in batches of (prompts, (N, 3, H, W) backend input)."""
    for start in range(0, scenes, batch_size):
        prompts, images = world_scenes(start, min(batch_size, scenes - start))
        yield prompts, to_backend_input(images, backend.preprocess)


def default_database(backend: Backend, cache: Path = CACHE_DIR) -> PatchDatabase | None:
    """The database a backend retrieves from when none is given: for the shipped built-in model, the world
    database ``arrag demo`` uses (built in ``cache`` on first use, then loaded); None for any other backend."""
    if backend.name != BUILTIN_NAME:
        return None
    directory = world_database_dir(cache, backend)
    database = world_database(backend, directory)
    logger.info("retrieving from the built-in world's database in %s", directory)
    return database
