"""Choosing how to mix by validation likelihood: the fixed (rule, τ, k, λ) grid, a gate on the nearest distance, a
fitted logistic λ, and the content-free controls, all from the same per-position evidence.

An objective is the summed change in negative log-likelihood (nats) over the validation positions that the
mixture touches: 0 is the model alone, below 0 is better. Shapes: M held-out positions, R rules, S temperatures,
Q neighbour counts, L weights, J gate thresholds.
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


@dataclass(frozen=True)
class DaidSetting:
    """One way to run DAiD: the retrieved distribution (rule, τ, k) and the rule for λ."""

    duplicates: Duplicates
    temperature: float
    k: int
    weight: AdaptiveWeight

    def retrieval_config(self) -> RetrievalConfig:
        """The decoding loop's config for this setting (λ: the rule's weight, λ_max for a logistic rule)."""
        return RetrievalConfig(self.weight.weight, self.temperature, self.k, self.duplicates)

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
    validation: torch.Tensor  # (M,) bool

    def index(self, setting: DaidSetting) -> tuple[int, int, int]:
        """The grid cell (rule, τ, k) of ``setting``."""
        return (
            DUPLICATES.index(setting.duplicates),
            self.temperatures.index(setting.temperature),
            self.ks.index(setting.k),
        )

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


def fixed_objectives(evidence: Evidence, weights: Sequence[float]) -> torch.Tensor:
    """(R, S, Q, L) the validation objective of every fixed-λ grid setting."""
    v = evidence.validation
    log_model = evidence.log_model[v][:, None, None, None]  # (Mv, 1, 1, 1)
    log_target = evidence.retrieval.log_target[v]  # (Mv, R, S, Q)
    found = evidence.retrieval.found[v][:, None, None, :]  # (Mv, 1, 1, Q)
    changes = [
        torch.where(found, log_model - mixed_log_likelihood(log_model, log_target, w), 0.0).sum(0) for w in weights
    ]
    return torch.stack(changes, dim=-1)  # (R, S, Q, L)


def best_fixed(evidence: Evidence, weights: Sequence[float], table: torch.Tensor, rule: int | None = None) -> Tuned:
    """The best fixed-λ setting of the grid (of one rule, given its index)."""
    cells = table if rule is None else table[rule : rule + 1]
    r, s, q, w = np.unravel_index(int(cells.argmin()), tuple(cells.shape))
    setting = DaidSetting(
        DUPLICATES[r if rule is None else rule],
        evidence.temperatures[s],
        evidence.ks[q],
        AdaptiveWeight("fixed", weights[w]),
    )
    return Tuned(setting, float(cells.min()))


def best_gated(evidence: Evidence, weights: Sequence[float], quantiles: Sequence[float]) -> Tuned | None:
    """The best gate ``λ where d_min ≤ θ``, θ at ``quantiles`` of the validation nearest distances, over the grid.

    With the validation positions sorted by distance, every threshold's objective is a prefix sum.
    """
    v = evidence.validation & evidence.retrieval.found[:, 0]
    nearest, order = torch.sort(evidence.retrieval.nearest[v])  # (Mv,)
    if not len(nearest):
        return None
    thresholds = np.unique(np.quantile(nearest.numpy(), quantiles))  # (J,)
    counts = torch.from_numpy(np.searchsorted(nearest.numpy(), thresholds, side="right"))  # (J,) positions inside
    log_model = evidence.log_model[v][order][:, None, None, None]  # (Mv, 1, 1, 1)
    log_target = evidence.retrieval.log_target[v][order]  # (Mv, R, S, Q)
    found = evidence.retrieval.found[v][order][:, None, None, :]
    best: Tuned | None = None
    for w in weights:
        change = torch.where(found, log_model - mixed_log_likelihood(log_model, log_target, w), 0.0)  # (Mv, R, S, Q)
        prefix = torch.cat([change.new_zeros(1, *change.shape[1:]), change.cumsum(0)])[counts]  # (J, R, S, Q)
        j, r, s, q = np.unravel_index(int(prefix.argmin()), tuple(prefix.shape))
        if best is None or float(prefix.min()) < best.objective:
            gate = AdaptiveWeight("gated", w, threshold=float(thresholds[j]))
            best = Tuned(
                DaidSetting(DUPLICATES[r], evidence.temperatures[s], evidence.ks[q], gate), float(prefix.min())
            )
    return best


def fit_logistic(evidence: Evidence, start: DaidSetting, max_weight: float, steps: int) -> Tuned | None:
    """Fit ``λ = λ_max·σ(a + b·d_min + c·H(p_ret) + e·H(p_model))`` for ``start``'s (rule, τ, k) by validation NLL.

    L-BFGS from ``start``'s fixed λ, on standardised features (converted back to raw ones for the rule).
    """
    r, s, q = evidence.index(start)
    v = evidence.validation & evidence.retrieval.found[:, q]
    if not bool(v.any()):
        return None
    features = torch.stack(
        [evidence.retrieval.nearest[v], evidence.retrieval.entropy[v, r, s, q], evidence.model_entropy[v]], dim=-1
    )  # (n, 3)
    mean, scale = features.mean(0), features.std(0, correction=0)
    scale = torch.where(scale > 0, scale, 1.0)
    standard = (features - mean) / scale  # (n, 3)
    log_model, log_target = evidence.log_model[v], evidence.retrieval.log_target[v, r, s, q]
    log_rest = math.log1p(-max_weight) if max_weight < 1 else -math.inf
    initial = min(max(start.weight.weight / max_weight, 1e-4), 1 - 1e-4)
    theta = torch.tensor([math.log(initial / (1 - initial)), 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)

    def loss() -> torch.Tensor:
        z = theta[0] + standard @ theta[1:]  # (n,)
        log_weight = math.log(max_weight) + F.logsigmoid(z)  # log λ
        log_keep = torch.logaddexp(torch.tensor(log_rest, dtype=torch.float64), -z) - F.softplus(-z)  # log(1 − λ)
        return -torch.logaddexp(log_keep + log_model, log_weight + log_target).mean()

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
    return Tuned(setting, float(evidence.nll_change(setting)[evidence.validation].sum()))


def tune_controls(evidence: Evidence, weights: Sequence[float]) -> dict[str, Tuned]:
    """Each control at its best fixed λ on validation (λ 0, the model alone, when nothing helps)."""
    v = evidence.validation
    tuned = {}
    for name, log_other in evidence.controls.items():
        changes = [
            float((evidence.log_model[v] - mixed_log_likelihood(evidence.log_model[v], log_other[v], w)).sum())
            for w in weights
        ]
        best = int(np.argmin(changes))
        tuned[name] = (
            Tuned(ControlSetting(name, weights[best]), changes[best])
            if changes[best] < 0
            else Tuned(ControlSetting(name, 0.0), 0.0)
        )
    return tuned


def tune_fixed(evidence: Evidence, weights: Sequence[float]) -> Tuned:
    """The best fixed-λ setting of the grid on ``evidence``'s validation positions."""
    return best_fixed(evidence, weights, fixed_objectives(evidence, weights))


def best_logistic(
    evidence: Evidence, weights: Sequence[float], candidates: int, max_weight: float, steps: int
) -> Tuned | None:
    """A logistic λ fitted for each of the ``candidates`` best (rule, τ, k) cells at fixed λ; the best of them."""
    table = fixed_objectives(evidence, weights)  # (R, S, Q, L)
    per_cell = table.min(-1).values  # (R, S, Q): each cell at its best fixed λ
    fits = []
    for flat in per_cell.flatten().argsort()[:candidates].tolist():
        r, s, q = np.unravel_index(flat, tuple(per_cell.shape))
        lam = weights[int(table[r, s, q].argmin())]
        start = DaidSetting(DUPLICATES[r], evidence.temperatures[s], evidence.ks[q], AdaptiveWeight("fixed", lam))
        fits.append(fit_logistic(evidence, start, max_weight, steps))
    fits = [fit for fit in fits if fit is not None]
    return min(fits, key=lambda t: t.objective) if fits else None


def cross_validate(
    tune: Callable[[Evidence], Tuned | None], evidence: Evidence, folds: torch.Tensor
) -> tuple[Tuned | None, torch.Tensor | None]:
    """``tune`` on all validation positions, and each validation position's NLL change under the setting ``tune``
    chooses without its fold (``folds``: (M,) each position's fold, by image).

    A setting's objective on the data that chose it is optimistic (a grid of hundreds of settings, or four fitted
    coefficients, find structure even in noise); the out-of-fold changes are not, so kinds of rule with different
    freedom can be compared on them.
    """
    held_out = torch.zeros(len(folds), dtype=torch.float64)
    for fold in torch.unique(folds[evidence.validation]).tolist():
        inside = evidence.validation & (folds == fold)
        inner = tune(replace(evidence, validation=evidence.validation & ~inside))
        if inner is None:
            return None, None
        held_out[inside] = evidence.nll_change(inner.setting)[inside]
    return tune(evidence), held_out
