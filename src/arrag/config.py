"""Typed, validated configuration of a generation request."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Literal

from arrag.decoding.weights import AdaptiveWeight, check_weight

Method = Literal["none", "daid", "faid", "faid+daid"]
METHODS: tuple[Method, ...] = ("none", "daid", "faid", "faid+daid")
Duplicates = Literal["nearest", "sum"]
FilterOrder = Literal["after_merge", "before_merge"]


def check_retrieval_parameters(weight: float, temperature: float, k: int) -> None:
    """Raise ValueError with the fix for a retrieval weight λ, temperature τ or neighbour count k out of range."""
    check_weight(weight)
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"retrieval temperature τ must be a finite number > 0, got {temperature}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"the number of neighbours k must be an integer >= 1, got {k!r}")


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is drawn from the model's logits.

    ``filter_order`` places top-k/top-p relative to the DAiD merge. The paper merges after guidance and
    temperature and filters nothing, so with the defaults the order has no effect.
    """

    guidance_scale: float = 5.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    filter_order: FilterOrder = "after_merge"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be >= 0 (1 disables guidance), got {self.guidance_scale}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0; use top_k=1 for greedy decoding, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")
        if self.filter_order not in ("after_merge", "before_merge"):
            raise ValueError(f"filter_order must be 'after_merge' or 'before_merge', got {self.filter_order!r}")


@dataclass(frozen=True)
class RetrievalConfig:
    """DAiD: ``p = (1 − λ)·p_model + λ·p_ret`` with ``p_ret ∝ exp(−d/τ)`` over the k nearest entries.

    ``k`` and ``temperature`` default to the paper's code (2048, 1). The paper's tuned λ is not public; 0.3
    is a starting point, to be tuned for each model and database.
    """

    weight: float = 0.3
    temperature: float = 1.0
    k: int = 2048
    duplicates: Duplicates = "nearest"
    rule: AdaptiveWeight | None = None  # λ per row (a gated or logistic rule, e.g. calibration's); its weight is λ

    def __post_init__(self) -> None:
        check_retrieval_parameters(self.weight, self.temperature, self.k)
        if self.rule is not None and self.rule.weight != self.weight:
            raise ValueError(f"the rule's λ {self.rule.weight} and weight {self.weight} must be the same number")
        if self.duplicates not in ("nearest", "sum"):
            raise ValueError(
                f"duplicates must be 'nearest' (the paper's code) or 'sum' (kNN-LM), got {self.duplicates!r}"
            )


@dataclass(frozen=True)
class GenerationConfig:
    """One generation request: every prompt gets ``num_images_per_prompt`` rows, row i seeded ``seed + i``.

    ``method``: ``daid`` mixes retrieved tokens into the distribution; ``faid`` feeds them to a FAiD adapter's
    blenders; ``faid+daid`` does both from one search. ``sampling`` None: the backend's own (``Backend.sampling``).
    """

    method: Method = "none"
    sampling: SamplingConfig | None = None
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    num_images_per_prompt: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {self.num_images_per_prompt}")

    @property
    def uses_daid(self) -> bool:
        return self.method in ("daid", "faid+daid")

    @property
    def uses_faid(self) -> bool:
        return self.method in ("faid", "faid+daid")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
