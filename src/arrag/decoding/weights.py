"""How much of the retrieved distribution a row mixes in: a fixed λ, or λ per row from retrieval's confidence.

A rule is data (JSON round-trippable) so that calibration can choose one and decoding can apply it
(:class:`arrag.config.RetrievalConfig` holds one); the math is :func:`gated_weight` and :func:`logistic_weight`.
This module imports nothing of arrag's, so the config can hold a rule.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

import torch

WeightKind = Literal["fixed", "gated", "logistic"]
WEIGHT_KINDS: tuple[WeightKind, ...] = ("fixed", "gated", "logistic")


def check_weight(weight: float) -> None:
    """Raise ValueError, with what it means, for a retrieval weight λ outside [0, 1]."""
    if not (isinstance(weight, numbers.Real) and 0.0 <= weight <= 1.0):
        raise ValueError(f"retrieval weight λ must be in [0, 1] (0 = model only, 1 = retrieval only), got {weight}")


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
        check_weight(self.weight)
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


def gated_weight(nearest_distance: torch.Tensor, weight: float, threshold: float) -> torch.Tensor:
    """(B,) nearest squared distances -> (B,) λ where the nearest neighbour is within ``threshold``, else 0.

    A threshold of +inf is the fixed λ (rows without neighbours, distance +inf, keep λ: ``mix`` leaves them).
    """
    check_weight(weight)
    if math.isnan(threshold):
        raise ValueError("the gate's distance threshold must be a number, got NaN")
    return (nearest_distance <= threshold).double() * weight  # (B,) float64: λ itself, never rounded to float32


def logistic_weight(
    nearest_distance: torch.Tensor,
    retrieval_entropy: torch.Tensor,
    model_entropy: torch.Tensor,
    coefficients: tuple[float, float, float, float],
    max_weight: float,
) -> torch.Tensor:
    """(B,) features -> (B,) ``λ = λ_max·σ(a + b·d_min + c·H(p_ret) + e·H(p_model))``, in [0, λ_max].

    ``coefficients`` is (a, b, c, e). Rows without neighbours (d_min +inf) get whatever the limit gives; ``mix``
    leaves them unchanged anyway.
    """
    check_weight(max_weight)
    a, b, c, e = coefficients
    features = torch.stack([nearest_distance, retrieval_entropy, model_entropy], dim=-1).double()  # (B, 3)
    slopes = features.new_tensor([b, c, e])  # (3,)
    # A zero coefficient ignores its feature even where it is infinite (0·inf would be NaN).
    terms = torch.where(slopes == 0, 0.0, features * slopes)  # (B, 3)
    return max_weight * torch.sigmoid(a + terms.sum(dim=-1))  # (B,)
