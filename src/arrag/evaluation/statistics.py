"""GenEval-style scores with bootstrap confidence intervals.

The unit of resampling is the prompt, not the image: the images of one prompt share its difficulty, so
resampling images would understate the uncertainty. Prompts are resampled within their category, and the
overall score is the mean of the category scores, as GenEval reports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Score:
    """A mean and its 95% bootstrap interval."""

    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def category_scores(
    categories: Sequence[str],
    correct: np.ndarray,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Score]:
    """Per-category and overall accuracy with stratified percentile-bootstrap intervals.

    Args:
        categories: the category of each prompt (P,).
        correct: (P, I) the checker's verdict on each of the prompt's I images (over all seeds).

    Returns:
        {category: Score, ..., "overall": Score}, categories in first-seen order.
    """
    correct = np.asarray(correct, dtype=np.float64)
    if correct.ndim != 2 or correct.shape[0] != len(categories):
        raise ValueError(f"correct must be (prompts, images) for {len(categories)} prompts, got {correct.shape}")
    per_prompt = correct.mean(axis=1)  # (P,)
    names = list(dict.fromkeys(categories))
    labels = np.asarray(categories)
    rng = np.random.default_rng(seed)
    means, draws = {}, {}
    for name in names:
        values = per_prompt[labels == name]  # (Pc,)
        means[name] = float(values.mean())
        picks = rng.integers(0, len(values), size=(resamples, len(values)))  # (R, Pc)
        draws[name] = values[picks].mean(axis=1)  # (R,)
    draws["overall"] = np.mean([draws[name] for name in names], axis=0)  # (R,)
    means["overall"] = float(np.mean([means[name] for name in names]))
    tail = (1 - level) / 2 * 100
    return {
        name: Score(means[name], *(float(q) for q in np.percentile(draws[name], [tail, 100 - tail])))
        for name in [*names, "overall"]
    }
