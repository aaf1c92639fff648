"""The model's side: teacher-forced next-token distributions of held-out images, as generation would sample them.

Guidance and temperature are applied by the decoding loop's own functions; top-k / top-p are not (they would
give held-out tokens probability zero). Two distributions are scored: ``conditional`` (guidance 1: the caption's
distribution) and ``guided`` (the sampling's guidance scale: what DAiD mixes into when generating).

Shapes: N images, T = R·C tokens, V codebook size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arrag.backends.base import Backend
from arrag.config import SamplingConfig
from arrag.decoding.merge import entropy
from arrag.decoding.sampling import apply_guidance, to_probabilities
from arrag.evaluation.calibration.heldout import HeldOut


@dataclass(frozen=True)
class ModelScores:
    """One distribution's view of every held-out token."""

    log_target: torch.Tensor  # (N, T) float64 log p(y) of the true token
    entropy: torch.Tensor  # (N, T) float64 H(p) in nats
    top1: torch.Tensor  # (N, T) bool: the true token is the most probable one


def _scores(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> ModelScores:
    """(B, T, V) logits and (B, T) targets -> the distribution's scores."""
    probs = to_probabilities(logits, temperature)  # (B, T, V), as generation samples
    # log p(y) in log space: the same distribution, without float32 underflow to log 0
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, T, V)
    return ModelScores(
        log_target=log_probs.gather(-1, targets[..., None])[..., 0].double(),
        entropy=entropy(probs.double()),
        top1=probs.argmax(-1) == targets,
    )


@torch.inference_mode()
def score_model(
    backend: Backend, heldout: HeldOut, sampling: SamplingConfig, batch_size: int = 32
) -> dict[str, ModelScores]:
    """Teacher-force every held-out image -> {"conditional": ..., "guided": ...} ("guided" only when its scale
    is not 1). Images without a caption get the unconditional prompt, so their guided distribution is their
    conditional one."""
    guided = sampling.guidance_scale != 1.0
    parts: dict[str, list[ModelScores]] = {"conditional": [], "guided": []}
    for start in range(0, len(heldout), batch_size):
        captions = heldout.captions[start : start + batch_size]
        tokens = heldout.tokens[start : start + batch_size]  # (B, T)
        prompts = [caption or "" for caption in captions]
        unconditional = torch.tensor([caption is None for caption in captions])  # (B,)
        if guided:  # one forward for both halves of guidance
            both = backend.teacher_forced_logits(
                prompts + prompts,
                torch.cat([tokens, tokens]),
                torch.cat([unconditional, torch.ones_like(unconditional)]),
            ).cpu()  # (2B, T, V)
            cond, uncond = both.chunk(2)
        else:
            cond, uncond = backend.teacher_forced_logits(prompts, tokens, unconditional).cpu(), None
        parts["conditional"].append(_scores(cond, tokens, sampling.temperature))
        if guided:
            parts["guided"].append(
                _scores(apply_guidance(cond, uncond, sampling.guidance_scale), tokens, sampling.temperature)
            )
    return {
        name: ModelScores(*(torch.cat([getattr(p, f) for p in scores]) for f in ("log_target", "entropy", "top1")))
        for name, scores in parts.items()
        if scores
    }
