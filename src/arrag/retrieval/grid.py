"""Raster geometry on an R×C token grid: positions, causal neighbourhoods, eligible positions.

An image is generated in raster order, so position ``i = r·C + c`` is preceded by every cell of the rows
above and the cells to its left. A causal neighbourhood only names such cells, which is what lets the
same patch key be built from a finished database image and from a half-generated one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

MissingPolicy = Literal["skip", "zero"]


@dataclass(frozen=True)
class Grid:
    """An R×C token grid in raster order."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"a token grid needs at least one row and column, got {self.rows}×{self.cols}")

    @property
    def size(self) -> int:
        return self.rows * self.cols

    def index(self, row: int, col: int) -> int:
        """Raster index of cell (row, col)."""
        return row * self.cols + col

    def cell(self, index: int) -> tuple[int, int]:
        """(row, col) of raster index ``index``."""
        return divmod(index, self.cols)


@dataclass(frozen=True)
class Neighbourhood:
    """The causal context a patch key is built from.

    ``hops=1`` is the paper's four-cell "L" (up-left, up, up-right, left); ``hops=h`` is every cell of the
    (2h+1)×(2h+1) window around the target that precedes it in raster order. ``missing`` says what happens
    where part of the window falls off the grid: ``"skip"`` leaves the position without retrieval (the
    paper's code), ``"zero"`` fills the missing cells with zero vectors (the paper's text).
    """

    hops: int = 1
    missing: MissingPolicy = "skip"

    def __post_init__(self) -> None:
        if self.hops < 1:
            raise ValueError(f"hops must be >= 1, got {self.hops}")
        if self.missing not in ("skip", "zero"):
            raise ValueError(f"missing must be 'skip' or 'zero', got {self.missing!r}")

    @cached_property
    def offsets(self) -> tuple[tuple[int, int], ...]:
        """(row, col) offsets of the causal cells, in raster order."""
        h = self.hops
        return tuple((dr, dc) for dr in range(-h, 1) for dc in range(-h, h + 1) if dr < 0 or (dr == 0 and dc < 0))

    @property
    def name(self) -> str:
        return f"causal-h{self.hops}-{self.missing}"

    def indices(self, grid: Grid) -> np.ndarray:
        """(R·C, n) raster indices of every position's neighbours; -1 where a neighbour is off the grid."""
        rows, cols = np.divmod(np.arange(grid.size), grid.cols)  # (R·C,) each
        offsets = np.asarray(self.offsets)  # (n, 2)
        nr = rows[:, None] + offsets[None, :, 0]  # (R·C, n)
        nc = cols[:, None] + offsets[None, :, 1]  # (R·C, n)
        inside = (nr >= 0) & (nc >= 0) & (nc < grid.cols)
        return np.where(inside, nr * grid.cols + nc, -1)

    def eligible(self, grid: Grid) -> np.ndarray:
        """Sorted raster positions that get a patch key (database entry or decoding-time query)."""
        inside = self.indices(grid) >= 0  # (R·C, n)
        # "zero" keeps every position with some generated context: all but the first.
        keep = inside.all(axis=1) if self.missing == "skip" else inside.any(axis=1)
        return np.flatnonzero(keep)

    def to_dict(self) -> dict[str, object]:
        return {"hops": self.hops, "missing": self.missing}
