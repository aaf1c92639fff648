"""The evaluation's building blocks against references: bootstrap intervals, nearest images, the baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from arrag.config import GenerationConfig, RetrievalConfig
from arrag.decoding.loop import generate
from arrag.evaluation.copying import CopyThreshold, nearest_database_image
from arrag.evaluation.experiment import EvalConfig, evaluate
from arrag.evaluation.image_retrieval import StaticImageRetriever, rank_by_caption
from arrag.evaluation.report import write_report
from arrag.evaluation.statistics import category_scores
from arrag.retrieval.grid import Neighbourhood
from arrag.retrieval.indexes import IndexConfig


def test_bootstrap_overall_is_the_mean_of_categories_and_intervals_cover_it():
    rng = np.random.default_rng(0)
    categories = ["a"] * 40 + ["b"] * 10
    correct = np.concatenate([rng.random((40, 4)) < 0.8, rng.random((10, 4)) < 0.3])
    scores = category_scores(categories, correct)
    assert list(scores) == ["a", "b", "overall"]
    assert scores["a"].mean == pytest.approx(correct[:40].mean())
    assert scores["overall"].mean == pytest.approx((correct[:40].mean() + correct[40:].mean()) / 2)
    for score in scores.values():
        assert score.low <= score.mean <= score.high
    # The small category is the less certain one.
    assert scores["b"].high - scores["b"].low > scores["a"].high - scores["a"].low


def test_bootstrap_interval_is_a_point_when_every_prompt_scores_the_same():
    scores = category_scores(["a"] * 5, np.ones((5, 3), dtype=bool))
    assert (scores["overall"].low, scores["overall"].high) == (1.0, 1.0)


def test_bootstrap_interval_matches_the_binomial_width():
    # One image per prompt: the interval of a mean of 400 Bernoulli(0.5) draws is about ±1.96·0.025.
    correct = (np.arange(400) % 2 == 0)[:, None]
    score = category_scores(["a"] * 400, correct, resamples=4000)["overall"]
    assert score.high - score.low == pytest.approx(2 * 1.96 * 0.025, rel=0.15)


def test_bootstrap_rejects_misshaped_verdicts():
    with pytest.raises(ValueError, match="prompts, images"):
        category_scores(["a", "b"], np.ones((3, 2)))


def test_nearest_database_image_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    images, database = torch.rand(7, 3, 8, 8, generator=generator), torch.rand(11, 3, 8, 8, generator=generator)
    distances, indices = nearest_database_image(images, database, chunk=3)
    difference = ((images[:, None] - database[None]) ** 2).sum(dim=(2, 3, 4))  # (7, 11)
    energies = (images**2).sum(dim=(1, 2, 3))[:, None] + (database**2).sum(dim=(1, 2, 3))[None]
    brute = difference / energies
    np.testing.assert_array_equal(indices, brute.argmin(1).numpy())
    np.testing.assert_allclose(distances, brute.min(1).values.numpy(), rtol=1e-4, atol=1e-6)
    copies, _ = nearest_database_image(database[[4, 9]], database)
    np.testing.assert_allclose(copies, 0, atol=1e-6)


def test_copy_threshold_flags_its_false_positive_rate_of_real_images():
    real = np.random.default_rng(1).gamma(2.0, 0.01, size=1000)
    threshold = CopyThreshold.calibrate(real, false_positive_rate=0.02)
    assert threshold.copy_rate(real) == pytest.approx(0.02, abs=0.002)
    assert threshold.copy_rate(np.zeros(5)) == 1.0
    with pytest.raises(ValueError, match="use more"):
        CopyThreshold.calibrate(real[:20], false_positive_rate=0.01)


def test_rank_by_caption_finds_the_matching_captions_and_digits_count():
    captions = ["a red 7", "a blue 3", "a red 3", "two green 5s", "a 7 left of a 3"]
    ranked = rank_by_caption(["a red 3", "two green 5s"], captions, 2)
    assert ranked[0, 0] == 2 and ranked[1, 0] == 3
    with pytest.raises(ValueError, match="count"):
        rank_by_caption(["x"], captions, 6)


def test_image_level_retrieval_at_lambda_one_copies_the_retrieved_image(backend):
    """With λ = 1 and one retrieved image, every eligible position takes that image's token."""
    total = backend.grid.size
    retrieved = torch.randint(0, backend.codebook_size, (2, 1, total), generator=torch.Generator().manual_seed(3))
    eligible = Neighbourhood().eligible(backend.grid)
    retriever = StaticImageRetriever(retrieved, torch.tensor([[5], [8]]), eligible)
    config = GenerationConfig(method="daid", retrieval=RetrievalConfig(weight=1.0), seed=4)
    out = generate(backend, ["a red 7", "a 3 and a 5"], config, retriever=retriever)
    positions = torch.as_tensor(sorted(eligible))
    assert torch.equal(out.tokens[:, positions], retrieved[:, 0, positions])
    assert torch.equal(out.records.image_ids[:, positions], torch.tensor([[5], [8]]).expand(2, len(positions)))
    others = torch.as_tensor(sorted(set(range(total)) - set(eligible.tolist())))
    assert not torch.equal(out.tokens[:, others], retrieved[:, 0, others])  # the model drew those itself


def test_a_retriever_needs_daid():
    retriever = StaticImageRetriever(torch.zeros(1, 1, 4), torch.zeros(1, 1), [])
    with pytest.raises(ValueError, match="merged by DAiD"):
        generate(None, ["a red 7"], GenerationConfig(), retriever=retriever)


def test_eval_config_validates():
    with pytest.raises(ValueError, match="distinct"):
        EvalConfig(seeds=(0, 0))
    with pytest.raises(ValueError, match="λ"):
        EvalConfig(weights=(0.0, 1.5))
    assert EvalConfig.quick().test_prompts < EvalConfig().test_prompts


def test_a_small_evaluation_runs_end_to_end_and_writes_its_report(tmp_path):
    config = EvalConfig(
        out=tmp_path / "eval",
        cache=tmp_path / "cache",
        test_prompts=6,
        images_per_prompt=1,
        seeds=(0, 1),
        validation_prompts=6,
        validation_images=1,
        weights=(0.0, 0.3),
        duplicates=("sum",),
        temperatures=(1.0,),
        ks=(64,),
        hops=(1,),
        retrieved_images=2,
        database_scenes=40,
        index=IndexConfig("IVF16,CodebookPQ", search_params="nprobe=4"),
        copy_calibration_scenes=100,
        copy_false_positive_rate=0.05,
    )
    results = evaluate(config)
    assert list(results["methods"]) == ["base", "daid", "image-level", "faid"]  # the shipped FAiD adapter
    for entry in results["methods"].values():
        assert len(entry["overall_per_seed"]) == 2
        assert 0 <= entry["copy_rate"] <= 1
        assert entry["scores"]["overall"].low <= entry["scores"]["overall"].mean <= entry["scores"]["overall"].high
    assert results["methods"]["daid"]["settings"]["duplicates"] == "sum"
    assert set(results["validation"]["sweep"]) == {"DAiD (sum)", "image-level"}
    assert results["samples"]["base"].shape == (6, 64, 64, 3)
    quality = results["methods"]["daid"]["quality"]
    assert all(
        name in quality
        for name in ("Fréchet distance (EfficientNet-Lite0 features)", "KID (EfficientNet-Lite0 features)")
    )
    assert all(value == value for value in quality.values())  # no NaN
    report = write_report(results, config.out, "arrag eval (test)")
    assert {p.name for p in config.out.iterdir()} == {"report.md", "results.json", "sweep.png", "samples.png"}
    assert "| base model |" in report.read_text()
    assert json.loads((config.out / "results.json").read_text())["config"]["test_prompts"] == 6
