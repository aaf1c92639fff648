"""Intervals for likelihoods: percentile bootstrap over images (an image's tokens share its difficulty).

Shapes: n images, m measures, D resamples.
"""

from __future__ import annotations

import numpy as np

from arrag.evaluation.statistics import Score

LEVEL = 0.95


def bootstrap_means(sums: np.ndarray, counts: np.ndarray, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token means of ``m`` measures and their bootstrap draws, images resampled with replacement.

    Args:
        sums: (n, m) each image's total of each measure (e.g. NLL in nats).
        counts: (n,) each image's number of tokens.

    Returns:
        ((m,) Σ sums / Σ counts; (D, m) the same over each resample of the images, the same resamples for every
        measure, so differences between measures are paired).
    """
    sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(sums), size=(resamples, len(sums)))  # (D, n)
    draws = sums[picks].sum(axis=1) / np.maximum(counts[picks].sum(axis=1), 1)[:, None]  # (D, m)
    return sums.sum(axis=0) / max(counts.sum(), 1), draws


def interval(point: float, draws: np.ndarray) -> Score:
    """A point estimate with the percentile interval of its draws."""
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Score(float(point), float(low), float(high))


def relative_change(
    means: np.ndarray, draws: np.ndarray, measure: int, reference: int, base: int | None = None
) -> Score:
    """Measure ``measure`` minus measure ``reference`` in % of measure ``base`` (default: the reference), with its
    paired interval."""
    base = reference if base is None else base
    return interval(
        100 * (means[measure] - means[reference]) / means[base],
        100 * (draws[:, measure] - draws[:, reference]) / draws[:, base],
    )
