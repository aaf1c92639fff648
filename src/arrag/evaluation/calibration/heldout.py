"""Held-out images to score: token grids with their captions (None: scored unconditionally), and how they split.

Shapes: N images, T = R·C tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from arrag.backends.base import Backend
from arrag.world.report import EVAL_SEED, eval_scenes


@dataclass(frozen=True)
class HeldOut:
    """Held-out images as the backend's tokens; ``captions[i]`` None scores image i without a prompt."""

    captions: tuple[str | None, ...]
    tokens: torch.Tensor  # (N, T) int64
    description: str = "held-out images"

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or len(self.captions) != len(self.tokens):
            raise ValueError(
                f"{len(self.captions)} captions need (N, T) tokens of N images, got {tuple(self.tokens.shape)}"
            )
        if len(self.tokens) < 2:
            raise ValueError("calibration needs at least two held-out images: one to tune on, one to test on")
        if any(c is not None and not c.strip() for c in self.captions):
            raise ValueError("a caption is empty; give None to score an image without a prompt")

    def __len__(self) -> int:
        return len(self.tokens)

    def split(self, validation_fraction: float, seed: int) -> torch.Tensor:
        """(N,) bool, True for the validation images: a seeded shuffle's first share, so every kind of image is on
        both sides (the world's prompts cycle through their categories)."""
        count = min(len(self) - 1, max(1, round(validation_fraction * len(self))))
        validation = torch.zeros(len(self), dtype=torch.bool)
        validation[torch.from_numpy(np.random.default_rng(seed).permutation(len(self))[:count])] = True
        return validation


def tokenize(backend: Backend, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
    """PIL images -> (N, T) tokens through the backend's own preprocessing and tokenizer."""
    pixels = [backend.preprocess(image) for image in images]
    return torch.cat(
        [backend.encode(torch.stack(pixels[i : i + batch_size])).cpu() for i in range(0, len(pixels), batch_size)]
    )


def as_heldout(
    backend: Backend,
    items: HeldOut | Sequence[tuple[str | None, torch.Tensor | Image.Image]],
    description: str = "held-out images",
) -> HeldOut:
    """A :class:`HeldOut` from (caption or None, (T,) tokens or a PIL image) pairs; images are tokenized."""
    if isinstance(items, HeldOut):
        return items
    captions = tuple(caption for caption, _ in items)
    contents = [content for _, content in items]
    if all(isinstance(c, Image.Image) for c in contents):
        return HeldOut(captions, tokenize(backend, contents), description)
    if any(isinstance(c, Image.Image) for c in contents):
        raise ValueError("give held-out items either all as images or all as token grids")
    return HeldOut(captions, torch.stack([torch.as_tensor(c, dtype=torch.long) for c in contents]), description)


def world_heldout(count: int, seed: int = EVAL_SEED) -> tuple[list[str], list[Image.Image]]:
    """The built-in world's held-out scenes (evaluation glyph pool) and their captions."""
    prompts, scenes = eval_scenes(count, seed)
    return [p.text for p in prompts], [Image.fromarray(scene) for scene in scenes]


def read_heldout(inputs: Sequence[str], max_images: int) -> list[tuple[str | None, Image.Image]]:
    """The first ``max_images`` readable images of ``inputs`` (anything ``arrag db build`` reads: folders, tars,
    Parquet, ``world-eval:N``) with their captions where the source has them; unreadable items are skipped."""
    from arrag.build.sources import plan_shards, read_shard

    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    items: list[tuple[str | None, Image.Image]] = []
    for shard in plan_shards(inputs).shards:
        for item in read_shard(shard):
            if item.image is not None:
                items.append((item.caption, item.image))
            if len(items) == max_images:
                return items
    if not items:
        raise ValueError(f"no readable image in {', '.join(inputs)}")
    return items
