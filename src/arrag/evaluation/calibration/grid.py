"""Every DAiD setting of a (duplicate rule, τ, k) grid scored from one search, as pure functions.

With the neighbours sorted by distance, ``w = exp(−(d − d_min)/τ)`` (float64) is computed once per τ and every k
is a prefix of the same list: per-token masses are accumulated prefix by prefix (a cumulative sum over K), and
``p_ret(y)`` is (mass on y)/(total mass) at each k. The ``nearest`` rule keeps each distinct token's first (nearest)
occurrence only, ``sum`` keeps them all, as :func:`arrag.decoding.merge.retrieval_distribution` does. Tables are
per batch of queries, never per held-out position: nothing of size (positions, V) is made.

Shapes: U queries, K neighbours, B positions, R = 2 duplicate rules (``DUPLICATES``), S temperatures, Q
neighbour counts k, V codebook size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch

from arrag.config import Duplicates

DUPLICATES: tuple[Duplicates, ...] = ("nearest", "sum")


@dataclass(frozen=True)
class GridScores:
    """What every grid setting's retrieved distribution says about each row's true next token."""

    log_target: torch.Tensor  # (B, R, S, Q) float64 log p_ret(y); -inf where p_ret gives y nothing
    entropy: torch.Tensor  # (B, R, S, Q) float64 H(p_ret) in nats; 0 where nothing was found
    top1: torch.Tensor  # (B, R, S, Q) bool: y is p_ret's most probable token (ties: the smallest token id)
    found: torch.Tensor  # (B, Q) bool: some neighbour among the first k
    missing: torch.Tensor  # (B, Q) bool: y is not the next token of any of the first k neighbours
    nearest: torch.Tensor  # (B,) float64 distance of the nearest neighbour; +inf where none
    kth: torch.Tensor  # (B, Q) float64 distance of the k-th neighbour; +inf where there is none


def first_positions(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(U, K) tokens in [0, V] -> (U, V + 1) where each token first occurs in each row; K where it does not."""
    columns = torch.arange(tokens.shape[1]).expand_as(tokens)  # (U, K)
    table = torch.full((len(tokens), vocab_size + 1), tokens.shape[1])  # (U, V + 1)
    return table.scatter_reduce_(-1, tokens, columns, reduce="amin")


def score_grid(
    distances: torch.Tensor,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    temperatures: Sequence[float],
    ks: Sequence[int],
) -> GridScores:
    """Score every (rule, τ, k) of the grid for each held-out position, from its query's neighbours.

    Args:
        distances: (U, K) squared distances of each query's neighbours, ascending (as searches return them).
        tokens: (U, K) next token of each neighbour.
        valid: (U, K) False for padding, which carries no weight.
        rows: (B,) the query of each position (positions with the same context share one query).
        targets: (B,) the true next token y of each position.
        vocab_size: V.
        temperatures: the τ grid (each > 0).
        ks: the k grid, ascending, each at most K.

    The nearest rule's mass on a token is the weight of its first occurrence, so it is computed on a (U, Q, V) table
    of first occurrences; the sum rule's per-token masses are accumulated over the k prefixes in a (U, Q, V + 1)
    table per τ. Memory: a few (U, K) and (U, Q, V + 1) float64 tables: choose U by V.
    """
    ks = list(ks)
    if ks != sorted(set(ks)) or ks[0] < 1 or ks[-1] > distances.shape[1]:
        raise ValueError(f"ks must ascend within [1, {distances.shape[1]}], got {ks}")
    distances = distances.double().masked_fill(~valid, torch.inf)  # (U, K)
    if bool((distances[:, 1:] < distances[:, :-1]).any()):
        raise ValueError("neighbours must be sorted by distance, nearest first")
    found = torch.stack([valid[:, :k].any(-1) for k in ks], dim=-1)  # (U, Q)
    nearest = distances[:, 0]  # (U,)
    gaps = distances - torch.where(valid[:, 0], nearest, 0.0)[:, None]  # (U, K) d − d_min; +inf for padding
    tokens = torch.where(valid, tokens, vocab_size)  # (U, K): padding is token V, never a target
    positions = first_positions(tokens, vocab_size)[:, :vocab_size]  # (U, V) each token's nearest occurrence
    first_target = positions[rows, targets]  # (B,) where each position's y first occurs; K where absent
    present = positions < tokens.shape[1]  # (U, V)
    first_gaps = torch.where(present, gaps.gather(-1, positions.clamp_max(tokens.shape[1] - 1)), torch.inf)  # (U, V)
    log_scale = torch.where(present, first_gaps, 0.0)  # (U, V): −τ·log w of each first occurrence, without 0·inf
    within = positions[:, None, :] < torch.tensor(ks)[:, None]  # (U, Q, V): the tokens the first k neighbours hold
    # The nearest rule's mode: the smallest token among the neighbours tied with the nearest, for every τ.
    tied = torch.where(gaps == 0, tokens, vocab_size)  # (U, K)
    nearest_mode = torch.stack([tied[:, :k].min(-1).values for k in ks], dim=-1)  # (U, Q)
    shape = (len(rows), len(DUPLICATES), len(temperatures), len(ks))
    log_target, entropy = torch.empty(shape, dtype=torch.float64), torch.empty(shape, dtype=torch.float64)
    top1 = torch.empty(shape, dtype=torch.bool)
    for s, tau in enumerate(temperatures):
        # nearest: a token's mass is the weight of its first occurrence, so Σ m·log m = Σ m·(−gap/τ)
        kept = torch.where(within, torch.exp(first_gaps / -tau)[:, None], 0.0)  # (U, Q, V); 0 where absent
        plogp = (kept * log_scale[:, None]).sum(-1) / -tau  # (U, Q)
        log_target[:, 0, s], entropy[:, 0, s] = _target_and_entropy(kept, plogp, rows, targets)
        top1[:, 0, s] = nearest_mode[rows] == targets[:, None]
        # sum: every occurrence; per-token masses accumulated prefix by prefix (a cumulative sum over K)
        weights = torch.exp(gaps / -tau)  # (U, K) float64; 1 at the nearest, 0 for padding
        tables = weights.new_zeros(len(weights), len(ks), vocab_size + 1)  # (U, Q, V + 1)
        for q, (a, b) in enumerate(pairwise([0, *ks])):
            if q:
                tables[:, q] = tables[:, q - 1]
            tables[:, q].scatter_add_(-1, tokens[:, a:b], weights[:, a:b])
        plogp = torch.special.xlogy(tables, tables).sum(-1)  # (U, Q)
        log_target[:, 1, s], entropy[:, 1, s] = _target_and_entropy(tables, plogp, rows, targets)
        top1[:, 1, s] = tables.argmax(-1)[rows] == targets[:, None]  # argmax: the smallest id on ties
    hit = found[rows][:, None, None, :]  # (B, 1, 1, Q)
    return GridScores(
        log_target=torch.where(hit, log_target, -torch.inf),
        entropy=torch.where(hit, entropy, 0.0),
        top1=top1 & hit,
        found=found[rows],
        missing=first_target[:, None] >= torch.tensor(ks),
        nearest=nearest[rows],
        kth=distances[:, [k - 1 for k in ks]][rows],
    )


def _target_and_entropy(
    masses: torch.Tensor, plogp: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, Q, V') per-token masses m and (U, Q) Σ m·log m -> ((B, Q) log p_ret(y), (B, Q) H(p_ret)) at each row's
    query, with p_ret = m / Σ m and H = log Σ m − Σ m·log m / Σ m."""
    total = masses.sum(-1)  # (U, Q)
    on_target = masses.transpose(1, 2)[rows, targets]  # (B, Q), gathered without copying the tables
    log_target = torch.log(on_target) - torch.log(total[rows])  # (B, Q)
    return log_target, (torch.log(total) - plogp / total)[rows]


def place_temperatures(
    distances: torch.Tensor, valid: torch.Tensor, points: int, quantiles: tuple[float, float]
) -> tuple[float, ...]:
    """A geometric τ grid spanning the measured distance gaps ``d − d_min`` of (B, K) sorted search results.

    τ below a row's smallest positive gap gives its nearest token all the mass; τ above its largest gap spreads the
    mass evenly over its k neighbours. The grid runs from the lower quantile of the rows' smallest positive gaps
    to the upper quantile of their largest gaps; with no positive gap τ cannot matter and the grid is (1.0,).
    """
    distances = distances.double().masked_fill(~valid, torch.inf)
    gaps = torch.where(valid, distances - distances[:, :1], torch.nan)  # (B, K); NaN for padding
    smallest = torch.where(gaps > 0, gaps, torch.inf).min(-1).values  # (B,)
    largest = torch.nan_to_num(gaps, nan=0.0).max(-1).values  # (B,)
    smallest, largest = smallest[torch.isfinite(smallest)].numpy(), largest[largest > 0].numpy()
    if not len(smallest):
        return (1.0,)
    low, high = float(np.quantile(smallest, quantiles[0])), float(np.quantile(largest, quantiles[1]))
    return tuple(float(t) for t in np.unique(np.geomspace(low, max(high, low), points)))


def mixed_log_likelihood(
    log_model: torch.Tensor, log_other: torch.Tensor, weight: float | torch.Tensor
) -> torch.Tensor:
    """``log((1 − λ)·p_model(y) + λ·q(y))`` from the two log-probabilities, in log space (float64): exactly
    ``log_model`` at λ = 0, finite wherever either part is."""
    weight = torch.as_tensor(weight, dtype=torch.float64)
    return torch.logaddexp(torch.log1p(-weight) + log_model, torch.log(weight) + log_other)
