"""The database's side: one search per distinct held-out context, every grid setting scored from its results.

Queries are made from the held-out images' own tokens exactly as decoding makes them (:func:`patch_keys` over
``backend.code_vectors``), so each is the query decoding would issue had it generated the true image so far.
Positions whose contexts are identical share one query (a codebook key is a function of its neighbour tokens);
the distinct queries are searched ``batch`` at a time in a seeded order, so the first batch is a fair sample:
it places the τ grid (label-free: distances only) and the nearest-distance buckets of the frequency control (on
its validation positions).

Shapes: N images, P eligible positions per image, M = N·P held-out positions, U distinct queries, K = max k,
V codebook size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import numpy as np
import torch

from arrag.backends.base import Backend
from arrag.evaluation.calibration.controls import bucket_edges, bucket_token_counts
from arrag.evaluation.calibration.grid import GridScores, place_temperatures, score_grid
from arrag.retrieval.database import PatchDatabase
from arrag.retrieval.keys import patch_keys
from arrag.retrieval.neighbours import Neighbours


@dataclass(frozen=True)
class RetrievalMeasurements:
    """Per held-out position (row i·P + j: image i, eligible position ``positions[j]``) what retrieval made of it."""

    positions: np.ndarray  # (P,) the eligible raster positions
    temperatures: tuple[float, ...]
    ks: tuple[int, ...]
    scores: GridScores  # every field over the M held-out positions
    bucket_edges: np.ndarray  # (buckets - 1,) nearest-distance bucket edges, from validation positions
    bucket_counts: np.ndarray  # (buckets, V) next tokens of the neighbours of validation positions, per bucket
    unique_queries: int
    searches: int
    search_seconds: float  # waiting for search results (each search but the first overlaps the scoring before it)
    grid_seconds: float


@dataclass(frozen=True)
class TemperatureGrid:
    """The τ grid: ``values``, or ``points`` τ placed on the first batch's distance gaps (see
    :func:`place_temperatures`); ``required`` τ are added either way."""

    values: tuple[float, ...] | None = None
    points: int = 8
    quantiles: tuple[float, float] = (0.05, 0.95)
    required: tuple[float, ...] = ()

    def place(self, found: Neighbours) -> tuple[float, ...]:
        placed = self.values or place_temperatures(found.distances, found.valid, self.points, self.quantiles)
        return tuple(sorted({*placed, *self.required}))


def heldout_queries(backend: Backend, database: PatchDatabase, tokens: torch.Tensor) -> torch.Tensor:
    """(N, T) held-out tokens -> (M, D) the decoding-time query of every eligible position."""
    spec = database.spec
    cells = backend.code_vectors(tokens).float().cpu()  # (N, T, d)
    return patch_keys(cells, database.positions, spec.grid, spec.neighbourhood).flatten(0, 1)  # (M, D)


def measure_retrieval(
    backend: Backend,
    database: PatchDatabase,
    tokens: torch.Tensor,
    validation: torch.Tensor,
    ks: Sequence[int],
    temperatures: TemperatureGrid,
    buckets: int,
    batch: int,
    seed: int,
) -> RetrievalMeasurements:
    """Search every distinct held-out context once with the largest k and score the grid.

    Args:
        tokens: (N, T) held-out token grids.
        validation: (N,) bool, the validation images (the buckets are fixed on them).
        ks: ascending neighbour counts, each at most the database's size.
        temperatures: the τ grid, or how to place it on the first batch.
        buckets: how many nearest-distance buckets the frequency control gets.
        batch: distinct queries per search, at least (the batches are made equal: a FAISS flat search of a few
            thousand queries costs per query several times what one of 4096 does).
    """
    positions = database.positions
    queries = heldout_queries(backend, database, tokens)  # (M, D)
    targets = tokens[:, positions].flatten()  # (M,)
    on_validation = validation[:, None].expand(-1, len(positions)).flatten()  # (M,)
    unique, inverse = torch.unique(queries, dim=0, return_inverse=True)  # (U, D), (M,)
    searched = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))  # (U,) query at each rank
    rank = torch.empty_like(searched)
    rank[searched] = torch.arange(len(unique))
    order = rank[inverse]  # (M,) each position's query in search order
    parts: list[tuple[torch.Tensor, GridScores]] = []
    counts, edges, taus = np.zeros(0), np.zeros(0), ()
    size = -(-len(unique) // max(1, len(unique) // batch))  # equal batches of at least ``batch``
    batches = [searched[start : start + size] for start in range(0, len(unique), size)]  # queries of each search
    search_seconds = grid_seconds = 0.0
    # the next batch is searched (FAISS releases the GIL, on its own threads) while this one is scored
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(database.search, unique[batches[0]], ks[-1])
        for i in range(len(batches)):
            clock = time.perf_counter()
            found = pending.result()  # (b, K)
            search_seconds += time.perf_counter() - clock
            if i + 1 < len(batches):
                pending = pool.submit(database.search, unique[batches[i + 1]], ks[-1])
            clock = time.perf_counter()
            members = torch.nonzero(order // size == i)[:, 0]  # (B,) the positions whose query is in this batch
            rows = order[members] - i * size  # (B,) each one's query in the batch
            if i == 0:
                taus = temperatures.place(found)
                pilot = found.distances[rows[on_validation[members]], 0].double().numpy()
                edges = bucket_edges(pilot[np.isfinite(pilot)], buckets)
                counts = np.zeros((len(edges) + 1, backend.codebook_size + 1))
            scores = score_grid(
                found.distances, found.tokens, found.valid, rows, targets[members], backend.codebook_size, taus, ks
            )
            validating = on_validation[members]
            counts += bucket_token_counts(
                found, rows[validating], scores.nearest[validating], edges, backend.codebook_size
            )
            parts.append((members, scores))
            grid_seconds += time.perf_counter() - clock
    return RetrievalMeasurements(
        positions=positions,
        temperatures=taus,
        ks=tuple(ks),
        scores=_gather(parts, len(queries)),
        bucket_edges=edges,
        bucket_counts=counts[:, :-1],
        unique_queries=len(unique),
        searches=len(batches),
        search_seconds=search_seconds,
        grid_seconds=grid_seconds,
    )


def _gather(parts: list[tuple[torch.Tensor, GridScores]], total: int) -> GridScores:
    """Per-batch scores -> scores of all ``total`` positions, in position order."""
    where = torch.cat([members for members, _ in parts])  # (M,)
    place = torch.empty_like(where)
    place[where] = torch.arange(total)
    return GridScores(**{f.name: torch.cat([getattr(s, f.name) for _, s in parts])[place] for f in fields(GridScores)})
