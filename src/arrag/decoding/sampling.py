"""Guidance, temperature, top-k / top-p filtering and per-row sampling, as pure functions.

Every function returns a new tensor and leaves its inputs untouched. Shapes: B rows, V codebook size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: ``uncond + scale·(cond − uncond)`` (Janus, LlamaGen)."""
    if uncond is None or scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)  # (B, V)


def to_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-scaled softmax in float32."""
    return torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)


def top_k_filter(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k most probable tokens of each row and renormalise."""
    if k >= probs.shape[-1]:
        return probs
    threshold = probs.topk(k, dim=-1).values[..., -1:]  # (B, 1)
    kept = probs.masked_fill(probs < threshold, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def top_p_filter(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most probable tokens whose mass reaches p (nucleus sampling), renormalised."""
    if p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V) each
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly more probable tokens
    drop_sorted = mass_before >= p  # the top token always stays: its mass_before is 0
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    kept = probs.masked_fill(drop, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def filter_probabilities(probs: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Top-k, then top-p; None disables either."""
    if top_k is not None:
        probs = top_k_filter(probs, top_k)
    if top_p is not None:
        probs = top_p_filter(probs, top_p)
    return probs


def sample(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Draw one token per row, row i from ``generators[i]``, so a row's draw never depends on its batch."""
    if len(generators) != probs.shape[0]:
        raise ValueError(f"{probs.shape[0]} rows need as many generators, got {len(generators)}")
    draws = [torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators, strict=True)]
    return torch.cat(draws)  # (B,)
