"""The built-in world as build sources: ``world:N``, the first N database scenes, and ``world-eval:N``, the
first N held-out scenes (eval-pool glyphs: those :func:`arrag.world.report.eval_scenes` draws).

Registered under the schemes ``world`` and ``world-eval`` in the ``arrag.sources`` entry-point group (see
:mod:`arrag.build.sources`); each item is captioned with its scene's prompt. Database scenes are drawn in
batches of ``SCENE_BATCH``, each seeded by its first scene's number, so a batch is one shard and any shard
can be drawn alone, in any process. Held-out scenes are one stream (``world-eval:N`` is the first N of any
longer one), so they are one shard.

The local-texture domain (:mod:`arrag.world.texture`) adds the same scenes with photo-textured strokes:
``world-texture:N`` / ``world-texture-eval:N`` (database and held-out photos disjoint) and
``world-texture-library:N`` / ``world-texture-library-eval:N`` (the same photos, disjoint regions of them).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import numpy as np
from PIL import Image

from arrag.build.sources import Item, ShardSpec, SourceKind
from arrag.world.digits import load_pool
from arrag.world.prompts import Prompt, sample_prompts
from arrag.world.report import eval_scenes
from arrag.world.scenes import render_scenes
from arrag.world.texture import Split, texture_database_scenes, texture_eval_scenes

DATABASE_SEED = 1
SCENE_BATCH = 100  # scenes are drawn in batches seeded by their first index: the world's database shards


def world_scenes(start: int, count: int) -> tuple[list[Prompt], np.ndarray]:
    """The database scenes of the batch that begins at ``start`` -> (prompts, (N, S, S, 3) uint8)."""
    rng = np.random.default_rng([DATABASE_SEED, start])
    prompts = sample_prompts(count, int(rng.integers(2**32)))
    return prompts, render_scenes(prompts, load_pool("database"), rng)


def world_scene_name(index: int, prompt: Prompt) -> str:
    return f"world-database-scene-{index}: {prompt.text}"


def eval_scene_name(index: int, prompt: Prompt) -> str:
    return f"world-eval-scene-{index}: {prompt.text}"


def _scenes(scheme: str, argument: str) -> int:
    if not argument.isdigit():
        raise ValueError(f"{scheme}:{argument}: the {scheme} source takes a number of scenes, e.g. {scheme}:2000")
    return int(argument)


def _plan(argument: str, first_index: int) -> list[ShardSpec]:
    """``world:N`` -> a shard per batch of scenes."""
    scenes = _scenes("world", argument)
    starts = range(0, scenes, SCENE_BATCH)
    return [
        ShardSpec(first_index + i, "world", start=start, count=min(SCENE_BATCH, scenes - start))
        for i, start in enumerate(starts)
    ]


def _read(shard: ShardSpec) -> Iterator[Item]:
    prompts, images = world_scenes(shard.start, shard.count)
    for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        yield Item(world_scene_name(shard.start + i, prompt), Image.fromarray(image), caption=prompt.text)


def _plan_eval(argument: str, first_index: int) -> list[ShardSpec]:
    """``world-eval:N`` -> one shard of N held-out scenes (none for N = 0)."""
    scenes = _scenes("world-eval", argument)
    return [ShardSpec(first_index, "world-eval", count=scenes)] if scenes else []


def _read_eval(shard: ShardSpec) -> Iterator[Item]:
    prompts, images = eval_scenes(shard.start + shard.count)
    for i in range(shard.start, shard.start + shard.count):
        yield Item(eval_scene_name(i, prompts[i]), Image.fromarray(images[i]), caption=prompts[i].text)


WORLD = SourceKind(plan=_plan, read=_read)
WORLD_EVAL = SourceKind(plan=_plan_eval, read=_read_eval)


# The local-texture domain: the same scenes, strokes textured from photos (arrag.world.texture).
TEXTURE_SCHEMES: dict[Split, tuple[str, str]] = {
    "photos": ("world-texture", "world-texture-eval"),
    "library": ("world-texture-library", "world-texture-library-eval"),
}


def _plan_texture(scheme: str, argument: str, first_index: int) -> list[ShardSpec]:
    """``world-texture:N`` and ``world-texture-library:N`` -> a shard per batch, as ``world:N``."""
    scenes = _scenes(scheme, argument)
    starts = range(0, scenes, SCENE_BATCH)
    return [
        ShardSpec(first_index + i, scheme, start=start, count=min(SCENE_BATCH, scenes - start))
        for i, start in enumerate(starts)
    ]


def _read_texture(split: Split, shard: ShardSpec) -> Iterator[Item]:
    scheme = TEXTURE_SCHEMES[split][0]
    for i, scene in enumerate(texture_database_scenes(shard.start, shard.count, DATABASE_SEED, split)):
        name = f"{scheme}-database-scene-{shard.start + i}: {scene.prompt.text}"
        yield Item(name, Image.fromarray(scene.image), caption=scene.prompt.text)


def _plan_texture_eval(scheme: str, argument: str, first_index: int) -> list[ShardSpec]:
    """``world-texture-eval:N`` and ``world-texture-library-eval:N`` -> one shard of N held-out scenes."""
    scenes = _scenes(scheme, argument)
    return [ShardSpec(first_index, scheme, count=scenes)] if scenes else []


def _read_texture_eval(split: Split, shard: ShardSpec) -> Iterator[Item]:
    scheme = TEXTURE_SCHEMES[split][0]
    scenes = texture_eval_scenes(shard.start + shard.count, split)
    for i in range(shard.start, shard.start + shard.count):
        name = f"{scheme}-eval-scene-{i}: {scenes[i].prompt.text}"
        yield Item(name, Image.fromarray(scenes[i].image), caption=scenes[i].prompt.text)


def _texture_kinds(split: Split) -> tuple[SourceKind, SourceKind]:
    """The database and held-out source kinds of one split."""
    database, held_out = TEXTURE_SCHEMES[split]
    return (
        SourceKind(partial(_plan_texture, database), partial(_read_texture, split)),
        SourceKind(partial(_plan_texture_eval, held_out), partial(_read_texture_eval, split)),
    )


WORLD_TEXTURE, WORLD_TEXTURE_EVAL = _texture_kinds("photos")
WORLD_TEXTURE_LIBRARY, WORLD_TEXTURE_LIBRARY_EVAL = _texture_kinds("library")
