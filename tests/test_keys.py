import numpy as np
import pytest
import torch

from arrag.decoding.loop import PatchRetriever
from arrag.retrieval.grid import Grid, Neighbourhood
from arrag.retrieval.keys import codebook_fingerprint, patch_keys
from conftest import blob_images, database_from_images


def reference_key(vectors: np.ndarray, grid: Grid, position: int, hops: int) -> np.ndarray:
    """The key spelled out by hand: neighbours in raster order of the window, zeros off the grid."""
    row, col = grid.cell(position)
    parts = []
    for dr in range(-hops, 1):
        for dc in range(-hops, hops + 1):
            if dr == 0 and dc >= 0:
                break
            r, c = row + dr, col + dc
            inside = 0 <= r < grid.rows and 0 <= c < grid.cols
            v = vectors[grid.index(r, c)] if inside else np.zeros(vectors.shape[-1])
            parts.append(v / max(np.linalg.norm(v), 1e-12))
    return np.concatenate(parts)


@pytest.mark.parametrize("hops", [1, 2])
def test_patch_keys_match_hand_built_keys(hops):
    grid = Grid(5, 6)
    vectors = torch.randn(3, grid.size, 4, generator=torch.Generator().manual_seed(0))
    positions = np.arange(grid.size)
    keys = patch_keys(vectors, positions, grid, Neighbourhood(hops, "zero"))
    assert keys.shape == (3, grid.size, len(Neighbourhood(hops).offsets) * 4)
    for image in range(3):
        for position in positions:
            expected = reference_key(vectors[image].numpy(), grid, position, hops)
            np.testing.assert_allclose(keys[image, position].numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("neighbourhood", [Neighbourhood(1, "skip"), Neighbourhood(2, "zero")])
def test_decoding_queries_equal_database_keys(backend, neighbourhood):
    """Replaying a database image token by token gives, at each eligible position, exactly its stored key."""
    database, tokens = database_from_images(backend, blob_images(3, seed=5), neighbourhood)
    retriever = PatchRetriever(backend, database, k=len(database), rows=3)
    for t in range(backend.grid.size):
        if t in retriever.eligible:
            found = retriever.search(t)
            for image in range(3):
                own = (found.image_ids[image] == image) & (found.positions[image] == t)
                assert own.sum() == 1, (image, t)
                assert found.distances[image][own].item() == pytest.approx(0.0, abs=1e-5)
                assert found.tokens[image][own].item() == tokens[image, t]
        retriever.observe(t, tokens[:, t])


def test_codebook_fingerprint_tells_codebooks_apart():
    a = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    assert codebook_fingerprint(a) == codebook_fingerprint(a.clone())
    assert codebook_fingerprint(a) != codebook_fingerprint(a + 1e-3)
    assert codebook_fingerprint(a) != codebook_fingerprint(a[:8])
