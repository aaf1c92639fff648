"""Patch keys: THE function that turns per-cell vectors into retrieval keys.

The database builder and the decoding loop both call :func:`patch_keys`, so a key stored for a database
image and a query made while generating can never be built differently.

Shapes: N images, R·C grid cells, P positions, n neighbours, d vector size per cell.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from arrag.retrieval.grid import Grid, Neighbourhood

KeySource = Literal["codebook", "latents"]
KEY_SOURCES: tuple[KeySource, ...] = ("codebook", "latents")


def patch_keys(
    cell_vectors: torch.Tensor, positions: torch.Tensor | np.ndarray, grid: Grid, neighbourhood: Neighbourhood
) -> torch.Tensor:
    """Concatenate the L2-normalised vectors of each position's causal neighbours.

    Args:
        cell_vectors: (N, R·C, d) one vector per grid cell: codebook vectors of the cells' tokens, or
            continuous encoder latents. Cells after the positions asked for are never read.
        positions: (P,) raster positions to build keys for.
        grid: the token grid.
        neighbourhood: which causal cells make a key; cells off the grid contribute zero vectors.

    Returns:
        (N, P, n·d) float32 keys.
    """
    n_images, n_cells, dim = cell_vectors.shape
    if n_cells != grid.size:
        raise ValueError(
            f"cell_vectors has {n_cells} cells per image, the grid {grid.rows}×{grid.cols} has {grid.size}"
        )
    table = torch.as_tensor(neighbourhood.indices(grid), device=cell_vectors.device)  # (R·C, n)
    neighbours = table[torch.as_tensor(positions, device=cell_vectors.device)]  # (P, n)
    # An appended all-zero cell stands in for every neighbour that is off the grid.
    unit = unit_cells(cell_vectors)  # (N, R·C, d)
    padded = torch.cat([unit, unit.new_zeros(n_images, 1, dim)], dim=1)  # (N, R·C + 1, d)
    neighbours = torch.where(neighbours < 0, n_cells, neighbours)
    return padded[:, neighbours].flatten(2)  # (N, P, n·d)


def unit_cells(cell_vectors: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d) float32 unit vectors: what a key holds for each cell."""
    return F.normalize(cell_vectors.float(), dim=-1)


def code_table(backend: Any) -> np.ndarray:
    """(V, d) ``backend.code_vectors`` of every token (any :class:`arrag.backends.Backend`): indexing it with
    token ids gives exactly what ``code_vectors`` gives, so keys made from it equal decoding-time queries."""
    codes = torch.arange(backend.codebook_size, device=backend.device)
    return backend.code_vectors(codes).float().cpu().numpy()


def unit_codebook(table: np.ndarray) -> np.ndarray:
    """(V, d) code table -> (V, d) each token's cell vector exactly as :func:`patch_keys` puts it in a key:
    the centroids of the codebook PQ."""
    return unit_cells(torch.from_numpy(table)).numpy()


def key_dim(neighbourhood: Neighbourhood, cell_dim: int) -> int:
    """Length of one patch key."""
    return len(neighbourhood.offsets) * cell_dim


def codebook_fingerprint(codebook: torch.Tensor) -> str:
    """A short hash of a codebook's float32 weights; databases record it to refuse other tokenizers."""
    data = np.ascontiguousarray(codebook.detach().float().cpu().numpy())
    digest = hashlib.sha256(str(data.shape).encode() + data.tobytes()).hexdigest()
    return f"sha256:{digest[:16]}"
