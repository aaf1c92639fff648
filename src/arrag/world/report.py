"""Measurements of the built-in world's parts: checker, tokenizer and generator (no retrieval).

Every number is computed on held-out data: eval-pool glyphs and scenes, prompts drawn with their own seed.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch

from arrag.backends.base import Backend
from arrag.config import GenerationConfig, SamplingConfig
from arrag.decoding.loop import Retriever, generate
from arrag.faid.blender import FaidAdapter
from arrag.world.checker import WorldChecker
from arrag.world.digits import load_pool
from arrag.world.prompts import CATEGORIES, Prompt, sample_prompts
from arrag.world.scenes import render_scenes, to_backend_input, to_uint8
from arrag.world.train import classifier_accuracy

logger = logging.getLogger(__name__)

EVAL_SEED = 7  # held-out prompts and scenes; training and the database use other seeds and pools
SAMPLING_SEED = 777  # validation prompts on which the generator's own sampling is chosen
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "world"
CLASSIFIER_WEIGHTS = ASSETS / "classifier.safetensors"


def load_checker(path: Path = CLASSIFIER_WEIGHTS) -> WorldChecker:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; train it with arrag train classifier (arrag.world.train.train_classifier)"
        )
    return WorldChecker.load(path)


def eval_scenes(count: int, seed: int = EVAL_SEED) -> tuple[list[Prompt], np.ndarray]:
    """Held-out prompts (categories in turn) and ground-truth scenes from eval-pool glyphs."""
    prompts = sample_prompts(count, seed)
    return prompts, render_scenes(prompts, load_pool("eval"), np.random.default_rng([seed, 1]))


def per_category(prompts: list[Prompt], correct: list[bool]) -> dict[str, float]:
    """Fraction correct per category, and ``overall`` = the mean over categories (GenEval's)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for prompt, ok in zip(prompts, correct, strict=True):
        groups[prompt.category].append(ok)
    scores = {c: float(np.mean(groups[c])) for c in CATEGORIES if groups[c]}
    scores["overall"] = float(np.mean(list(scores.values())))
    return scores


def checker_report(checker: WorldChecker, scenes: int = 600) -> dict[str, object]:
    """Classifier accuracy on eval-pool glyphs; the share of ground-truth eval scenes judged correct."""
    prompts, images = eval_scenes(scenes)
    verdicts = [checker.judge(p, image) for p, image in zip(prompts, images, strict=True)]
    return {
        "classifier_eval_pool_accuracy": classifier_accuracy(checker.classifier),
        "ground_truth_scenes_judged_correct": per_category(prompts, verdicts),
        "scenes": scenes,
    }


@torch.no_grad()
def tokenizer_report(backend: Backend, checker: WorldChecker, scenes: int = 600) -> dict[str, object]:
    """Reconstruction PSNR, codebook usage, and checker agreement on encode→decode of held-out scenes."""
    prompts, images = eval_scenes(scenes)
    pixels = to_backend_input(images, backend.preprocess)  # (N, 3, H, W)
    tokens = torch.cat([backend.encode(pixels[i : i + 100]) for i in range(0, scenes, 100)])
    recon = to_uint8(torch.cat([backend.decode(tokens[i : i + 100]) for i in range(0, scenes, 100)]))
    mse = ((recon.astype(np.float64) - images.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    psnr = 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))
    counts = torch.bincount(tokens.flatten(), minlength=backend.codebook_size).double()
    probs = counts[counts > 0] / counts.sum()
    agree = [
        checker.judge(p, original) == checker.judge(p, rebuilt)
        for p, original, rebuilt in zip(prompts, images, recon, strict=True)
    ]
    return {
        "psnr_db_mean": float(psnr.mean()),
        "codes_used": int((counts > 0).sum()),
        "codebook_size": backend.codebook_size,
        "code_perplexity": float(torch.exp(-(probs * probs.log()).sum())),
        "checker_verdict_agreement": float(np.mean(agree)),
        "scenes": scenes,
    }


def judge_generated(
    backend: Backend,
    checker: WorldChecker,
    prompts: list[Prompt],
    config: GenerationConfig,
    database=None,
    retriever_for: Callable[[list[str]], Retriever] | None = None,
    batch_rows: int = 120,
    faid: FaidAdapter | None = None,
    progress: Callable[[float], None] | None = None,
) -> tuple[list[bool], np.ndarray]:
    """Generate every prompt's images and judge them -> (verdicts, (N, S, S, 3) uint8 images), prompt-major.

    Row r of the whole run is seeded ``config.seed + r``, whatever the batching. ``retriever_for`` makes the
    neighbour source of a batch from its rows' prompts (see :func:`arrag.decoding.loop.generate`). Batches of
    about ``batch_rows`` rows: on a CPU, 120 rows decode twice as fast per image as 30. ``progress`` is told the
    images generated, position by position (fractions of an image).
    """
    verdicts: list[bool] = []
    batches: list[np.ndarray] = []
    n = config.num_images_per_prompt
    batch_prompts = max(1, batch_rows // n)
    for start in range(0, len(prompts), batch_prompts):
        part = prompts[start : start + batch_prompts]
        texts = [p.text for p in part]
        seeds = [config.seed + (start + i) * n + j for i in range(len(part)) for j in range(n)]
        retriever = retriever_for([t for t in texts for _ in range(n)]) if retriever_for is not None else None
        step = None if progress is None else partial(progress, len(seeds) / backend.grid.size)
        out = generate(backend, texts, config, database, seeds=seeds, faid=faid, retriever=retriever, on_step=step)
        images = to_uint8(out.images)
        verdicts += [checker.judge(part[row // n], image) for row, image in enumerate(images)]
        batches.append(images)
    return verdicts, np.concatenate(batches)


def generator_report(
    backend: Backend,
    checker: WorldChecker,
    prompts: int = 360,
    images_per_prompt: int = 4,
) -> dict[str, object]:
    """Per-category accuracy of the generator alone (no retrieval) on held-out prompts, at its own sampling."""
    held_out = sample_prompts(prompts, EVAL_SEED + 1)
    config = GenerationConfig(num_images_per_prompt=images_per_prompt)
    verdicts, _ = judge_generated(backend, checker, held_out, config)
    expanded = [p for p in held_out for _ in range(images_per_prompt)]
    return {
        "accuracy": per_category(expanded, verdicts),
        "prompts": prompts,
        "images_per_prompt": images_per_prompt,
        "sampling": asdict(backend.sampling),
    }


def sampling_report(
    backend: Backend,
    checker: WorldChecker,
    candidates: list[SamplingConfig],
    prompts: int = 480,
    images_per_prompt: int = 1,
) -> dict[str, object]:
    """Per-category accuracy of the generator alone under each sampling candidate, on validation prompts that
    the held-out report never uses: how the sampling recorded beside the shipped weights was chosen."""
    validation = sample_prompts(prompts, SAMPLING_SEED)
    expanded = [p for p in validation for _ in range(images_per_prompt)]
    rows = []
    for sampling in candidates:
        config = GenerationConfig(sampling=sampling, num_images_per_prompt=images_per_prompt, seed=1000)
        verdicts, _ = judge_generated(backend, checker, validation, config)
        rows.append({"sampling": asdict(sampling), "accuracy": per_category(expanded, verdicts)})
        logger.info("sampling %s: %s", sampling, rows[-1]["accuracy"])
    return {"candidates": rows, "prompts": prompts, "images_per_prompt": images_per_prompt}
