"""Shared tiny components: a random tiny backend, small image folders, a small exact database."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings
from PIL import Image

from arrag.backends.builtin import BuiltinBackend, tiny_backend
from arrag.retrieval.database import DatabaseSpec, PatchDatabase
from arrag.retrieval.grid import Neighbourhood

# Timing is not behaviour: a loaded CI machine must not fail a property test.
settings.register_profile("arrag", deadline=None)
settings.load_profile("arrag")


def blob_images(count: int, size: int = 40, seed: int = 0) -> list[Image.Image]:
    """Smooth images of a few coloured discs on a dark background: structure for the tokenizer to see."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = []
    for _ in range(count):
        canvas = np.zeros((size, size, 3), dtype=np.float32)
        for _ in range(rng.integers(1, 4)):
            cy, cx, radius = [*rng.uniform(0, size, 2).tolist(), rng.uniform(4, size / 3)]
            disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < radius**2
            canvas[disc] = rng.uniform(0.2, 1.0, 3) * 255
        images.append(Image.fromarray(canvas.astype(np.uint8)))
    return images


@pytest.fixture(scope="session")
def backend() -> BuiltinBackend:
    return tiny_backend(seed=0)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i, image in enumerate(blob_images(24)):
        image.save(folder / f"blob{i:02d}.png")
    return folder


def database_from_images(backend: BuiltinBackend, images: list[Image.Image], neighbourhood: Neighbourhood):
    """A database built in memory, plus the token grids it was built from."""
    pixels = torch.stack([backend.preprocess(image) for image in images])  # (N, 3, H, W)
    tokens = backend.encode(pixels)  # (N, R·C)
    database = PatchDatabase(DatabaseSpec.for_backend(backend, neighbourhood))
    database.add(tokens, backend.code_vectors(tokens), [f"image{i}" for i in range(len(images))])
    return database, tokens


@pytest.fixture(scope="session")
def database(backend: BuiltinBackend) -> PatchDatabase:
    return database_from_images(backend, blob_images(32, seed=1), Neighbourhood())[0]
