"""The built-in world as a build source: ``world:N`` reads the world's first N database scenes.

Registered under the scheme ``world`` in the ``arrag.sources`` entry-point group (see
:mod:`arrag.build.sources`). Scenes are drawn in batches of ``SCENE_BATCH``, each seeded by its first
scene's number, so a batch is one shard and any shard can be drawn alone, in any process.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image

from arrag.build.sources import Item, ShardSpec, SourceKind
from arrag.world.digits import load_pool
from arrag.world.prompts import Prompt, sample_prompts
from arrag.world.scenes import render_scenes

DATABASE_SEED = 1
SCENE_BATCH = 100  # scenes are drawn in batches seeded by their first index: the world's database shards


def world_scenes(start: int, count: int) -> tuple[list[Prompt], np.ndarray]:
    """The database scenes of the batch that begins at ``start`` -> (prompts, (N, S, S, 3) uint8)."""
    rng = np.random.default_rng([DATABASE_SEED, start])
    prompts = sample_prompts(count, int(rng.integers(2**32)))
    return prompts, render_scenes(prompts, load_pool("database"), rng)


def world_scene_name(index: int, prompt: Prompt) -> str:
    return f"world-database-scene-{index}: {prompt.text}"


def _plan(argument: str, first_index: int) -> list[ShardSpec]:
    """``world:N`` -> a shard per batch of scenes."""
    if not argument.isdigit():
        raise ValueError(f"world:{argument}: the world source takes a number of scenes, e.g. world:2000")
    scenes = int(argument)
    starts = range(0, scenes, SCENE_BATCH)
    return [
        ShardSpec(first_index + i, "world", start=start, count=min(SCENE_BATCH, scenes - start))
        for i, start in enumerate(starts)
    ]


def _read(shard: ShardSpec) -> Iterator[Item]:
    prompts, images = world_scenes(shard.start, shard.count)
    for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        yield Item(world_scene_name(shard.start + i, prompt), Image.fromarray(image))


WORLD = SourceKind(plan=_plan, read=_read)
