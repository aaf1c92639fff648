"""An exact memo of search results by context: the same neighbour tokens always find the same neighbours.

A decoding-time query is the concatenated codebook vectors of a position's causal neighbour tokens, so it is a
pure function of those tokens: rows of a batch, and later positions, that share a context share its answer.
Generated images repeat contexts often (background most of all), so each distinct context is searched once and
remembered, least recently used first out, within a bound on memory.

Shapes: B queries, n neighbour cells, D key length, K neighbours.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import fields

import torch

from arrag.retrieval.neighbours import Neighbours

BYTES_PER_NEIGHBOUR = 4 + 8 + 8 + 8 + 1  # distance, token, image, position, valid


class NeighbourMemo:
    """Search results remembered by context, in at most ``max_bytes`` of neighbour arrays."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes, self.bytes = max_bytes, 0
        self.answers: OrderedDict[bytes, Neighbours] = OrderedDict()  # context -> its (1, K) neighbours
        self.hits = self.misses = 0

    @property
    def hit_rate(self) -> float:
        """Share of the queries asked so far that no search had to answer (remembered, or asked twice at once)."""
        return self.hits / max(self.hits + self.misses, 1)

    def search(
        self, contexts: torch.Tensor, queries: torch.Tensor, search: Callable[[torch.Tensor], Neighbours]
    ) -> Neighbours:
        """The neighbours of every query, searching with ``search`` only the contexts not remembered.

        Args:
            contexts: (B, n) the neighbour tokens each query is made of (any value standing for an off-grid cell).
            queries: (B, D) the queries themselves: what ``search`` is given for the contexts it must search.
            search: (U, D) queries -> their :class:`Neighbours`, (U, K).
        """
        unique, inverse = torch.unique(contexts, dim=0, return_inverse=True)  # (U, n), (B,)
        first = torch.full((len(unique),), len(contexts), dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(len(contexts)), reduce="amin"
        )  # (U,) a row asking each distinct context
        names = [row.numpy().tobytes() for row in unique]
        missing = [u for u, name in enumerate(names) if name not in self.answers]
        found = search(queries[first[missing]]) if missing else None
        answers = {u: _row(found, j) for j, u in enumerate(missing)} if found is not None else {}
        for u, name in enumerate(names):
            if u not in answers:
                answers[u] = self.answers[name]
                self.answers.move_to_end(name)
        self.hits, self.misses = self.hits + len(contexts) - len(missing), self.misses + len(missing)
        for u in missing:
            self._remember(names[u], answers[u])
        return _stack([answers[u] for u in range(len(unique))], inverse)

    def _remember(self, name: bytes, answer: Neighbours) -> None:
        size = answer.distances.shape[-1] * BYTES_PER_NEIGHBOUR
        if size > self.max_bytes:
            return
        self.answers[name] = answer
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self.answers.popitem(last=False)
            self.bytes -= dropped.distances.shape[-1] * BYTES_PER_NEIGHBOUR


def _row(found: Neighbours, index: int) -> Neighbours:
    """Row ``index`` of a search result, as a (1, K) result of its own (copied: it outlives the batch)."""
    return Neighbours(**{f.name: getattr(found, f.name)[index : index + 1].clone() for f in fields(Neighbours)})


def _stack(rows: list[Neighbours], inverse: torch.Tensor) -> Neighbours:
    """(1, K) results per distinct context -> the (B, K) result of the queries that asked them."""
    return Neighbours(**{f.name: torch.cat([getattr(r, f.name) for r in rows])[inverse] for f in fields(Neighbours)})
