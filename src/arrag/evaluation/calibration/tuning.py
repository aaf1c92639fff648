"""Choosing how to mix by validation likelihood: the fixed (rule, τ, k, λ) grid, a gate on the nearest distance, a
fitted logistic λ, and the content-free controls, all from the same per-position evidence.

An objective is the summed change in negative log-likelihood (nats) over the positions of a set of images: 0 is the
model alone, below 0 is better. Every grid and gate setting's change is summed per image once (:class:`GridTable`),
so tuning on any set of images (validation, or a fold of it) is a sum. Shapes: N images, M held-out positions,
R rules, S temperatures, Q neighbour counts, L weights, J gate thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from arrag.config import Duplicates, RetrievalConfig
from arrag.decoding.weights import AdaptiveWeight
from arrag.evaluation.calibration.grid import DUPLICATES, GridScores, mixed_log_likelihood

RIDGE = 1e-4  # on the logistic rule's standardised slopes, per unit of mean NLL


@dataclass(frozen=True)
class DaidSetting:
    """One way to run DAiD: the retrieved distribution (rule, τ, k) and the rule for λ."""

    duplicates: Duplicates
    temperature: float
    k: int
    weight: AdaptiveWeight

    def retrieval_config(self) -> RetrievalConfig:
        """The decoding loop's config for this setting (λ: the rule's weight, λ_max for a logistic rule)."""
        rule = None if self.weight.kind == "fixed" else self.weight
        return RetrievalConfig(self.weight.weight, self.temperature, self.k, self.duplicates, rule)

    def describe(self) -> str:
        return f"DAiD {self.duplicates}, τ {self.temperature:.3g}, k {self.k}, {self.weight.describe()}"

    def to_dict(self) -> dict[str, object]:
        return {
            "duplicates": self.duplicates,
            "temperature": self.temperature,
            "k": self.k,
            "weight": self.weight.to_dict(),
        }


@dataclass(frozen=True)
class ControlSetting:
    """A content-free distribution mixed in like p_ret, with its own fixed λ."""

    control: str
    weight: float

    def describe(self) -> str:
        return f"control {self.control}, λ {self.weight:.3g}"

    def to_dict(self) -> dict[str, object]:
        return {"control": self.control, "weight": self.weight}


Setting = DaidSetting | ControlSetting | None  # None: the model alone


def describe(setting: Setting) -> str:
    return "model alone" if setting is None else setting.describe()


@dataclass(frozen=True)
class Tuned:
    """A setting and its validation objective (summed NLL change, nats; 0 is the model alone)."""

    setting: Setting
    objective: float


@dataclass(frozen=True)
class Evidence:
    """One model distribution's held-out positions: what it and every grid setting and control give the true token."""

    log_model: torch.Tensor  # (M,) float64 log p_model(y)
    model_entropy: torch.Tensor  # (M,) float64 H(p_model)
    retrieval: GridScores  # over the M positions
    temperatures: tuple[float, ...]
    ks: tuple[int, ...]
    controls: dict[str, torch.Tensor]  # name -> (M,) float64 log q(y) of a content-free distribution q
    images: torch.Tensor  # (M,) each position's image
    validation: torch.Tensor  # (N,) bool: the validation images

    @property
    def on_validation(self) -> torch.Tensor:
        """(M,) bool: the positions of validation images."""
        return self.validation[self.images]

    def index(self, setting: DaidSetting) -> tuple[int, int, int]:
        """The grid cell (rule, τ, k) of ``setting``."""
        r = DUPLICATES.index(setting.duplicates)
        return r, self.temperatures.index(setting.temperature), self.ks.index(setting.k)

    def setting(self, cell: Sequence[int], weight: AdaptiveWeight) -> DaidSetting:
        """The setting of grid cell (rule, τ, k) with ``weight``."""
        r, s, q = (int(i) for i in cell)
        return DaidSetting(DUPLICATES[r], self.temperatures[s], self.ks[q], weight)

    def log_mixture(self, setting: Setting) -> torch.Tensor:
        """(M,) log of the mixture's probability of the true token; the model's where nothing is mixed in."""
        if setting is None:
            return self.log_model
        if isinstance(setting, ControlSetting):
            return mixed_log_likelihood(self.log_model, self.controls[setting.control], setting.weight)
        r, s, q = self.index(setting)
        weights = setting.weight.weights(self.retrieval.nearest, self.retrieval.entropy[:, r, s, q], self.model_entropy)
        mixed = mixed_log_likelihood(self.log_model, self.retrieval.log_target[:, r, s, q], weights)  # (M,)
        return torch.where(self.retrieval.found[:, q], mixed, self.log_model)

    def nll_change(self, setting: Setting) -> torch.Tensor:
        """(M,) change in each position's negative log-likelihood; 0 where nothing is mixed in."""
        return self.log_model - self.log_mixture(setting)

    def per_image(self, values: torch.Tensor) -> torch.Tensor:
        """(M, ...) per-position values -> (N, ...) their sums over each image's positions."""
        return values.new_zeros(len(self.validation), *values.shape[1:]).index_add_(0, self.images, values)


@dataclass(frozen=True)
class GridTable:
    """Every fixed-λ and gated grid setting's NLL change, summed per image."""

    weights: tuple[float, ...]  # (L,)
    thresholds: tuple[float, ...]  # (J,) gate thresholds on the nearest distance
    fixed: torch.Tensor  # (N, R, S, Q, L)
    gated: torch.Tensor  # (N, J, R, S, Q, L): λ only where d_min ≤ θ_j

    @classmethod
    def build(cls, evidence: Evidence, weights: Sequence[float], gate_quantiles: Sequence[float]) -> GridTable:
        """Thresholds at ``gate_quantiles`` of the validation positions' nearest distances (label-free)."""
        nearest = evidence.retrieval.nearest
        reference = nearest[evidence.on_validation & torch.isfinite(nearest)].numpy()
        thresholds = np.unique(np.quantile(reference, gate_quantiles)) if len(reference) else np.zeros(0)
        # a position is inside gate j (d ≤ θ_j) from its band on: the number of thresholds below its distance
        band = torch.from_numpy(np.searchsorted(thresholds, nearest.numpy(), side="left"))  # (M,) in [0, J]
        slots = evidence.images * (len(thresholds) + 1) + band  # (M,) one per (image, band)
        log_model = evidence.log_model[:, None, None, None]  # (M, 1, 1, 1)
        found = evidence.retrieval.found[:, None, None, :]  # (M, 1, 1, Q)
        fixed, gated = [], []
        for w in weights:
            change = torch.where(
                found, log_model - mixed_log_likelihood(log_model, evidence.retrieval.log_target, w), 0.0
            )
            fixed.append(evidence.per_image(change))  # (N, R, S, Q)
            by_band = change.new_zeros(len(evidence.validation) * (len(thresholds) + 1), *change.shape[1:])
            by_band = by_band.index_add_(0, slots, change).unflatten(0, (len(evidence.validation), -1))
            gated.append(by_band.cumsum(1)[:, : len(thresholds)])  # (N, J, R, S, Q)
        return cls(tuple(weights), tuple(float(t) for t in thresholds), torch.stack(fixed, -1), torch.stack(gated, -1))

    def best_fixed(self, evidence: Evidence, images: torch.Tensor, rule: int | None = None) -> Tuned:
        """The best fixed-λ setting on ``images`` ((N,) bool), of one rule given its index."""
        objectives = self.fixed[images].sum(0)  # (R, S, Q, L)
        if rule is not None:
            objectives = objectives.masked_fill(torch.arange(len(DUPLICATES)).view(-1, 1, 1, 1) != rule, torch.inf)
        *cell, w = np.unravel_index(int(objectives.argmin()), tuple(objectives.shape))
        return Tuned(evidence.setting(cell, AdaptiveWeight("fixed", self.weights[w])), float(objectives.min()))

    def best_gated(self, evidence: Evidence, images: torch.Tensor) -> Tuned | None:
        """The best gate ``λ where d_min ≤ θ`` on ``images`` ((N,) bool), over the grid and the thresholds."""
        if not self.thresholds:
            return None
        objectives = self.gated[images].sum(0)  # (J, R, S, Q, L)
        j, *cell, w = np.unravel_index(int(objectives.argmin()), tuple(objectives.shape))
        gate = AdaptiveWeight("gated", self.weights[w], threshold=self.thresholds[j])
        return Tuned(evidence.setting(cell, gate), float(objectives.min()))


def fit_logistic(evidence: Evidence, start: DaidSetting, max_weight: float, steps: int) -> Tuned | None:
    """Fit ``λ = λ_max·σ(a + b·d_min + c·H(p_ret) + e·H(p_model))`` for ``start``'s (rule, τ, k) by validation NLL.

    L-BFGS from ``start``'s fixed λ, on standardised features (converted back to raw ones for the rule), with a
    small ridge on the slopes: a feature that barely varies (or separates a handful of positions) must not drive the
    rule to the σ's saturated ends.
    """
    r, s, q = evidence.index(start)
    v = evidence.on_validation & evidence.retrieval.found[:, q]
    if not bool(v.any()):
        return None
    features = torch.stack(
        [evidence.retrieval.nearest[v], evidence.retrieval.entropy[v, r, s, q], evidence.model_entropy[v]], dim=-1
    )  # (n, 3)
    mean, scale = features.mean(0), features.std(0, correction=0)
    scale = torch.where(scale > 0, scale, 1.0)
    standard = (features - mean) / scale  # (n, 3)
    log_model, log_target = evidence.log_model[v], evidence.retrieval.log_target[v, r, s, q]
    log_rest = torch.tensor(math.log1p(-max_weight) if max_weight < 1 else -math.inf, dtype=torch.float64)
    initial = min(max(start.weight.weight / max_weight, 1e-4), 1 - 1e-4)
    theta = torch.tensor([math.log(initial / (1 - initial)), 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)

    def loss() -> torch.Tensor:
        z = theta[0] + standard @ theta[1:]  # (n,)
        log_weight = math.log(max_weight) + F.logsigmoid(z)  # log λ
        log_keep = torch.logaddexp(log_rest, -z) - F.softplus(-z)  # log(1 − λ), stable as λ → λ_max
        nll = -torch.logaddexp(log_keep + log_model, log_weight + log_target).mean()
        return nll + RIDGE * theta[1:].square().sum()

    optimiser = torch.optim.LBFGS([theta], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = loss()
        value.backward()
        return value

    optimiser.step(closure)
    fitted = theta.detach()
    if not bool(torch.isfinite(fitted).all()):
        return None
    slopes = fitted[1:] / scale  # on raw features
    intercept = fitted[0] - (slopes * mean).sum()
    rule = AdaptiveWeight("logistic", max_weight, coefficients=(float(intercept), *(float(b) for b in slopes)))
    setting = replace(start, weight=rule)
    return Tuned(setting, float(evidence.nll_change(setting)[evidence.on_validation].sum()))


def best_logistic(
    evidence: Evidence, table: GridTable, images: torch.Tensor, candidates: int, max_weight: float, steps: int
) -> Tuned | None:
    """A logistic λ fitted on ``images`` ((N,) bool) for each of the ``candidates`` best (rule, τ, k) cells at fixed
    λ there; the best of them."""
    per_cell = table.fixed[images].sum(0)  # (R, S, Q, L)
    best_weight = per_cell.min(-1)  # (R, S, Q) each cell at its best fixed λ
    inside = replace(evidence, validation=images)
    fits = []
    for flat in best_weight.values.flatten().argsort()[:candidates].tolist():
        cell = np.unravel_index(flat, tuple(best_weight.values.shape))
        start = evidence.setting(cell, AdaptiveWeight("fixed", table.weights[int(best_weight.indices[cell])]))
        fits.append(fit_logistic(inside, start, max_weight, steps))
    fits = [fit for fit in fits if fit is not None]
    return min(fits, key=lambda t: t.objective) if fits else None


def cross_validate(
    tune: Callable[[torch.Tensor], Tuned | None], evidence: Evidence, folds: torch.Tensor
) -> tuple[Tuned | None, torch.Tensor | None]:
    """``tune`` (images (N,) bool -> the setting tuned on them) on all validation images, and each validation
    position's NLL change under the setting tuned without its fold (``folds``: (N,) each image's fold).

    A setting's objective on the data that chose it is optimistic (a grid of hundreds of settings, or four fitted
    coefficients, find structure even in noise); the out-of-fold changes are not, so kinds of rule with different
    freedom can be compared on them.
    """
    held_out = torch.zeros(len(evidence.images), dtype=torch.float64)
    for fold in torch.unique(folds[evidence.validation]).tolist():
        inside = evidence.validation & (folds == fold)
        inner = tune(evidence.validation & ~inside)
        if inner is None:
            return None, None
        positions = inside[evidence.images]
        held_out[positions] = evidence.nll_change(inner.setting)[positions]
    return tune(evidence.validation), held_out


def tune_controls(evidence: Evidence, weights: Sequence[float]) -> dict[str, Tuned]:
    """Each control at its best fixed λ on the validation images (λ 0, the model alone, when nothing helps)."""
    v = evidence.on_validation
    tuned = {}
    for name, log_other in evidence.controls.items():
        changes = [
            float((evidence.log_model[v] - mixed_log_likelihood(evidence.log_model[v], log_other[v], w)).sum())
            for w in weights
        ]
        best = int(np.argmin(changes))
        weight, objective = (weights[best], changes[best]) if changes[best] < 0 else (0.0, 0.0)
        tuned[name] = Tuned(ControlSetting(name, weight), objective)
    return tuned
