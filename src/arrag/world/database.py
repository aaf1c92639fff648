"""The built-in world's patch database: scenes composed from the database pool's glyphs."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from arrag.backends.base import Backend
from arrag.build import BuildConfig, add_images, build_database
from arrag.retrieval.database import MANIFEST_FILE, DatabaseSpec, PatchDatabase
from arrag.retrieval.grid import Neighbourhood
from arrag.retrieval.indexes import IndexConfig
from arrag.world.digits import load_pool
from arrag.world.prompts import Prompt, sample_prompts
from arrag.world.scenes import render_scenes, to_backend_input

logger = logging.getLogger(__name__)

DATABASE_SEED = 1
SCENE_BATCH = 100  # scenes are drawn in batches seeded by their first index: the world's database shards
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "arrag"


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
    """Load the world database from ``directory``, or build and save it there first.

    A cached database made for another backend, neighbourhood, index or size is rebuilt, never reused. An index
    that needs training (IVF) is built by the sharded pipeline, which trains it on a sample of the keys.
    """
    spec = DatabaseSpec.for_backend(backend, neighbourhood)
    index = index or IndexConfig()
    if (directory / MANIFEST_FILE).exists():
        try:
            database = PatchDatabase.load(directory, expect=spec)
            if database.spec == spec and database.num_images == scenes and database.index_config == index:
                return database
        except ValueError as error:
            logger.warning("rebuilding the cached world database: %s", error)
    if index == IndexConfig():
        database = build_world_database(backend, spec, scenes)
        database.save(directory)
        return database
    config = BuildConfig(neighbourhood=spec.neighbourhood, index=index, batch_size=SCENE_BATCH)
    build_database(backend, [f"world:{scenes}"], directory, config, overwrite=True)
    return PatchDatabase.load(directory, expect=spec)


def world_scenes(start: int, count: int) -> tuple[list[Prompt], np.ndarray]:
    """The database scenes of the batch that begins at ``start`` -> (prompts, (N, S, S, 3) uint8)."""
    rng = np.random.default_rng([DATABASE_SEED, start])
    prompts = sample_prompts(count, int(rng.integers(2**32)))
    return prompts, render_scenes(prompts, load_pool("database"), rng)


def world_scene_name(index: int, prompt: Prompt) -> str:
    return f"world-database-scene-{index}: {prompt.text}"


def world_database_scenes(
    backend: Backend, scenes: int, batch_size: int = SCENE_BATCH
) -> Iterator[tuple[list[Prompt], torch.Tensor]]:
    """The database pool's captioned scenes, in batches of (prompts, (N, 3, H, W) backend input)."""
    for start in range(0, scenes, batch_size):
        prompts, images = world_scenes(start, min(batch_size, scenes - start))
        yield prompts, to_backend_input(images, backend.preprocess)


def build_world_database(
    backend: Backend, spec: DatabaseSpec, scenes: int, batch_size: int = SCENE_BATCH
) -> PatchDatabase:
    """Render ``scenes`` captioned scenes from the database pool and add their patches."""
    database = PatchDatabase(spec)
    batches = world_database_scenes(backend, scenes, batch_size)
    for prompts, pixels in tqdm(batches, total=-(-scenes // batch_size), desc="world database", unit="batch"):
        first = database.num_images
        names = [world_scene_name(first + i, p) for i, p in enumerate(prompts)]
        add_images(database, backend, pixels, names)
    return database
