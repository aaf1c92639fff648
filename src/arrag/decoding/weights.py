"""How much of the retrieved distribution a row mixes in: a fixed λ, or λ per row from retrieval's confidence.

A rule is data (JSON round-trippable) so that calibration can choose one and decoding can apply it; the math is
:func:`arrag.decoding.merge.gated_weight` and :func:`arrag.decoding.merge.logistic_weight`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from arrag.config import check_retrieval_parameters
from arrag.decoding.merge import gated_weight, logistic_weight

WeightKind = Literal["fixed", "gated", "logistic"]
WEIGHT_KINDS: tuple[WeightKind, ...] = ("fixed", "gated", "logistic")


@dataclass(frozen=True)
class AdaptiveWeight:
    """A rule for λ.

    - ``fixed``: λ = ``weight`` everywhere (DAiD as the paper has it);
    - ``gated``: λ = ``weight`` where the nearest neighbour's squared distance is at most ``threshold``, else 0;
    - ``logistic``: λ = ``weight``·σ(a + b·d_min + c·H(p_ret) + e·H(p_model)), ``coefficients`` = (a, b, c, e).
    """

    kind: WeightKind = "fixed"
    weight: float = 0.3  # λ, the gate's λ, or the logistic's λ_max
    threshold: float | None = None
    coefficients: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in WEIGHT_KINDS:
            raise ValueError(f"the weight rule must be one of {WEIGHT_KINDS}, got {self.kind!r}")
        check_retrieval_parameters(self.weight, 1.0, 1)
        gated, logistic = self.kind == "gated", self.kind == "logistic"
        if gated != (self.threshold is not None) or (gated and not math.isfinite(self.threshold)):
            raise ValueError("a gated weight, and only a gated weight, takes a finite distance threshold")
        if logistic != (self.coefficients is not None):
            raise ValueError("a logistic weight, and only a logistic weight, takes coefficients (a, b, c, e)")
        if logistic and (len(self.coefficients) != 4 or not all(math.isfinite(c) for c in self.coefficients)):
            raise ValueError(f"logistic coefficients are four finite numbers (a, b, c, e), got {self.coefficients}")

    @property
    def needs_entropies(self) -> bool:
        """Whether applying the rule needs H(p_ret) and H(p_model)."""
        return self.kind == "logistic"

    def weights(
        self,
        nearest_distance: torch.Tensor,
        retrieval_entropy: torch.Tensor | None = None,
        model_entropy: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B,) features -> (B,) float64 λ of each row."""
        if self.kind == "fixed":
            return torch.full(nearest_distance.shape, self.weight, dtype=torch.float64)
        if self.kind == "gated":
            return gated_weight(nearest_distance, self.weight, self.threshold)
        if retrieval_entropy is None or model_entropy is None:
            raise ValueError("a logistic weight needs the entropies of p_ret and p_model")
        return logistic_weight(nearest_distance, retrieval_entropy, model_entropy, self.coefficients, self.weight)

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"λ {self.weight:.3g}"
        if self.kind == "gated":
            return f"λ {self.weight:.3g} where d_min ≤ {self.threshold:.3g}, else 0"
        a, b, c, e = self.coefficients
        return f"λ {self.weight:.3g}·σ({a:.3g} {b:+.3g}·d_min {c:+.3g}·H(p_ret) {e:+.3g}·H(p_model))"

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {"kind": self.kind, "weight": self.weight}
        if self.threshold is not None:
            data["threshold"] = self.threshold
        if self.coefficients is not None:
            data["coefficients"] = list(self.coefficients)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> AdaptiveWeight:
        coefficients = data.get("coefficients")
        return cls(
            kind=data["kind"],
            weight=float(data["weight"]),
            threshold=data.get("threshold"),
            coefficients=None if coefficients is None else tuple(float(c) for c in coefficients),
        )
