"""DAiD: merging retrieved next tokens into the model's distribution, as pure functions.

``p_ret(v) ∝ exp(−d/τ)`` over the retrieved neighbours whose next token is v, and
``p = (1 − λ)·p_model + λ·p_ret``. Shapes: B rows, K neighbours, V codebook size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arrag.config import Duplicates, RetrievalConfig, check_retrieval_parameters
from arrag.retrieval.neighbours import Neighbours


def retrieval_distribution(
    distances: torch.Tensor,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    vocab_size: int,
    temperature: float,
    duplicates: Duplicates = "nearest",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The retrieved-token distribution of each row.

    Args:
        distances: (B, K) squared-L2 distances of the neighbours.
        tokens: (B, K) the token that followed each neighbour.
        valid: (B, K) False for padding entries, which carry no weight.
        vocab_size: V.
        temperature: τ > 0.
        duplicates: ``"nearest"`` weighs each distinct token by its nearest occurrence (the paper's code);
            ``"sum"`` adds the weights of all occurrences (kNN-LM).

    Returns:
        ((B, V) probabilities, zero rows where nothing was retrieved; (B,) bool, True where something was).
    """
    check_retrieval_parameters(0.0, temperature, 1)
    found = valid.any(dim=-1)  # (B,)
    # Subtract each row's nearest distance before dividing by τ: exact for any τ > 0, never overflows.
    # float64 keeps any τ a Python float can hold (float32 would round τ < 1e-45 to zero).
    distances = distances.double().masked_fill(~valid, float("inf"))  # (B, K)
    nearest = torch.where(found, distances.min(dim=-1).values, 0.0)  # (B,)
    weights = torch.exp(-(distances - nearest[:, None]) / temperature).float()  # (B, K); 1 at the nearest
    per_token = weights.new_zeros(weights.shape[0], vocab_size)  # (B, V)
    if duplicates == "sum":
        per_token = per_token.scatter_add(-1, tokens, weights)
    elif duplicates == "nearest":
        per_token = per_token.scatter_reduce(-1, tokens, weights, reduce="amax")
    else:
        raise ValueError(f"duplicates must be 'nearest' or 'sum', got {duplicates!r}")
    total = per_token.sum(dim=-1, keepdim=True)  # (B, 1); >= 1 where found
    return torch.where(found[:, None], per_token / total.clamp_min(1.0), 0.0), found


def mix(p_model: torch.Tensor, p_retrieved: torch.Tensor, found: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 − λ)·p_model + λ·p_retrieved`` on rows where something was retrieved; other rows unchanged."""
    check_retrieval_parameters(weight, 1.0, 1)
    mixed = torch.lerp(p_model, p_retrieved, weight)  # (B, V); exactly p_model at λ = 0
    return torch.where(found[:, None], mixed, p_model)


@dataclass
class Mixture:
    """One step's distribution to sample from, and how much of it retrieval put there."""

    probs: torch.Tensor  # (B, V) p = (1 − λ)·p_model + λ·p_ret on rows with neighbours, p_model elsewhere
    retrieved: torch.Tensor | None  # (B, V) λ·p_ret, the retrieval part of p; None when nothing was mixed in
    found: torch.Tensor  # (B,) bool: rows that had neighbours

    def share(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) chosen tokens -> (B,) the part of each one's probability that came from retrieval, λ·p_ret(x)/p(x);
        NaN when nothing was mixed in."""
        if self.retrieved is None:
            return torch.full(tokens.shape, float("nan"))
        chosen = tokens[:, None]  # (B, 1)
        return (self.retrieved.gather(-1, chosen) / self.probs.gather(-1, chosen))[:, 0]


def retrieve_and_mix(p_model: torch.Tensor, found: Neighbours | None, retrieval: RetrievalConfig | None) -> Mixture:
    """DAiD's step: mix the distribution of ``found``'s first k next tokens into ``p_model`` (B, V).

    ``retrieval`` None (FAiD alone) or ``found`` None (a position without a search) leave ``p_model`` as it is.
    A retrieval ``rule`` sets λ per row from the nearest distance (and, for a logistic rule, the entropies of
    p_ret and of ``p_model``, the distribution after guidance and temperature, as calibration measured them).
    """
    if found is None:
        return Mixture(p_model, None, torch.zeros(p_model.shape[0], dtype=torch.bool))
    if retrieval is None:
        return Mixture(p_model, None, found.valid.any(dim=-1))
    k = retrieval.k
    p_retrieved, rows = retrieval_distribution(
        found.distances[:, :k],
        found.tokens[:, :k],
        found.valid[:, :k],
        p_model.shape[-1],
        retrieval.temperature,
        retrieval.duplicates,
    )
    p_retrieved, rows = p_retrieved.to(p_model.device), rows.to(p_model.device)  # (B, V), (B,)
    rule = retrieval.rule
    if rule is None or rule.kind == "fixed":
        return Mixture(mix(p_model, p_retrieved, rows, retrieval.weight), retrieval.weight * p_retrieved, rows)
    nearest = found.distances[:, :k].min(dim=-1).values.to(p_model.device)  # (B,); +inf where nothing was found
    entropies = (entropy(p_retrieved), entropy(p_model)) if rule.needs_entropies else (None, None)
    weights = rule.weights(nearest, *entropies).where(rows, 0.0)  # (B,) float64
    weighted = weights.to(p_model.dtype)[:, None] * p_retrieved  # (B, V) λ_row·p_ret
    return Mixture(mix_per_row(p_model, p_retrieved, rows, weights), weighted, rows)


# Adaptive weights: λ per row from how confident retrieval is. Shapes: B rows, V codebook size.


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """(B, V) distributions -> (B,) entropies in nats; ``0·log 0 = 0``, so a zero row has entropy 0."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)  # (B,)


def mix_per_row(
    p_model: torch.Tensor, p_retrieved: torch.Tensor, found: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """:func:`mix` with a λ per row: (B, V), (B, V), (B,) bool, (B,) λ in [0, 1] -> (B, V)."""
    if not bool(((weights >= 0) & (weights <= 1)).all()):
        raise ValueError("every row's retrieval weight λ must be in [0, 1]")
    mixed = torch.lerp(p_model, p_retrieved, weights.to(p_model.dtype)[:, None])  # (B, V); as mix row by row
    return torch.where(found[:, None], mixed, p_model)
