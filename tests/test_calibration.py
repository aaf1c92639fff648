"""Calibration: the grid equals DAiD's own merge, λ = 0 is the model, and the verdicts follow the database."""

import json
import math
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arrag.config import SamplingConfig
from arrag.decoding.merge import entropy, mix, retrieval_distribution
from arrag.decoding.sampling import apply_guidance, to_probabilities
from arrag.decoding.weights import AdaptiveWeight
from arrag.evaluation.calibration import (
    CalibrationConfig,
    DaidSetting,
    HeldOut,
    as_heldout,
    calibrate,
    render_report,
    world_heldout,
    write_report,
)
from arrag.evaluation.calibration.grid import DUPLICATES, mixed_log_likelihood, place_temperatures, score_grid
from arrag.evaluation.calibration.retrieval import TemperatureGrid, measure_retrieval
from arrag.evaluation.calibration.teacher import score_model
from arrag.evaluation.calibration.tuning import Evidence, GridTable, cross_validate, fit_logistic
from arrag.retrieval.database import DatabaseSpec, PatchDatabase
from arrag.retrieval.grid import Neighbourhood
from conftest import blob_images, database_from_images

V = 10
FAST = CalibrationConfig(ks=(4, 16), temperatures=(0.1, 1.0), resamples=300, logistic_steps=50, logistic_candidates=2)


def sorted_neighbours(g: torch.Generator, queries: int, k: int, scale: float):
    """Search results: ties (as duplicate entries give), padding last (as FAISS returns it), and, unless it is the
    only one, a first query that found nothing."""
    distances = (torch.rand(queries, k, generator=g) * scale).sort(-1).values  # (U, K)
    distances[:, 1::3] = distances[:, 0::3][:, : distances[:, 1::3].shape[1]]
    distances = distances.sort(-1).values
    tokens = torch.randint(0, V, (queries, k), generator=g)
    valid = torch.ones(queries, k, dtype=torch.bool)
    valid[-1, k // 2 :] = False
    valid[0] = queries == 1
    return distances.masked_fill(~valid, math.inf), tokens, valid


def brute_force(distances, tokens, valid, temperature, duplicates):
    """The retrieved distribution in float64, every token's mass summed or maxed one by one."""
    p = torch.zeros(len(tokens), V, dtype=torch.float64)
    for row in range(len(tokens)):
        live = valid[row]
        if not live.any():
            continue
        nearest = distances[row][live].double().min()
        for d, t in zip(distances[row][live].double(), tokens[row][live], strict=True):
            w = math.exp(-(d - nearest) / temperature)
            p[row, t] = p[row, t] + w if duplicates == "sum" else max(p[row, t], w)
        p[row] /= p[row].sum()
    return p


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**16),
    st.integers(1, 6),
    st.integers(4, 24),
    st.sampled_from([0.5, 8.0, 1e3]),
    st.sampled_from([[1e-3, 1.0], [0.05, 30.0, 1e4]]),
    st.floats(0.0, 1.0),
)
def test_the_grid_equals_retrieval_distribution_and_mix_position_by_position(seed, queries, k, scale, taus, weight):
    g = torch.Generator().manual_seed(seed)
    distances, tokens, valid = sorted_neighbours(g, queries, k, scale)
    rows = torch.randint(0, queries, (12,), generator=g)  # positions sharing queries
    targets = torch.randint(0, V, (12,), generator=g)
    ks = sorted({1, max(1, k // 3), k})
    scores = score_grid(distances, tokens, valid, rows, targets, V, taus, ks)
    p_model = torch.softmax(torch.randn(12, V, generator=g) * 2, -1)  # (B, V)
    log_model = p_model.double().log().gather(-1, targets[:, None])[:, 0]
    for r, rule in enumerate(DUPLICATES):
        for s, tau in enumerate(taus):
            for q, kk in enumerate(ks):
                p_ret, found = retrieval_distribution(distances[:, :kk], tokens[:, :kk], valid[:, :kk], V, tau, rule)
                p_ret, found = p_ret[rows], found[rows]
                assert torch.equal(scores.found[:, q], found)
                torch.testing.assert_close(
                    scores.log_target[:, r, s, q].exp(),
                    p_ret.double().gather(-1, targets[:, None])[:, 0],
                    atol=1e-6,
                    rtol=1e-5,
                )
                merged = mix(p_model, p_ret, found, weight).double().gather(-1, targets[:, None])[:, 0]
                ours = torch.where(
                    found, mixed_log_likelihood(log_model, scores.log_target[:, r, s, q], weight), log_model
                )
                torch.testing.assert_close(ours.exp(), merged, atol=1e-6, rtol=1e-5)
                exact = brute_force(distances[:, :kk], tokens[:, :kk], valid[:, :kk], tau, rule)[rows]
                torch.testing.assert_close(scores.entropy[:, r, s, q], entropy(exact), atol=1e-9, rtol=1e-9)
                assert torch.equal(scores.top1[:, r, s, q], (exact.argmax(-1) == targets) & found)
                absent = ~((tokens[:, :kk][rows] == targets[:, None]) & valid[:, :kk][rows]).any(-1)
                assert torch.equal(scores.missing[:, q], absent)


def test_a_mixtures_likelihood_equals_its_closed_form():
    """Neighbours at distances 0 and 1 with next tokens y and z, τ 1, λ 0.5, p_model(y) = 0.2."""
    distances, tokens = torch.tensor([[0.0, 1.0]]), torch.tensor([[3, 5]])
    scores = score_grid(
        distances, tokens, torch.ones(1, 2, dtype=torch.bool), torch.tensor([0]), torch.tensor([3]), 8, [1.0], [2]
    )
    e = math.exp(-1.0)
    assert scores.log_target[0, 0, 0, 0].exp().item() == pytest.approx(1 / (1 + e))  # nearest rule
    nll = -mixed_log_likelihood(torch.tensor(math.log(0.2), dtype=torch.float64), scores.log_target[0, 0, 0, 0], 0.5)
    assert nll.item() == pytest.approx(-math.log(0.5 * 0.2 + 0.5 / (1 + e)))
    assert scores.entropy[0, 0, 0, 0].item() == pytest.approx(
        -(1 / (1 + e)) * math.log(1 / (1 + e)) - (e / (1 + e)) * math.log(e / (1 + e))
    )
    assert torch.equal(
        mixed_log_likelihood(torch.tensor([-1.5]).double(), torch.tensor([-9.0]).double(), 0.0),
        torch.tensor([-1.5]).double(),
    )


def test_temperatures_span_the_measured_gaps():
    distances = torch.tensor([[0.0, 0.0, 0.01, 2.0], [1.0, 1.5, 3.0, 5.0]])
    taus = place_temperatures(distances, torch.ones(2, 4, dtype=torch.bool), 5, (0.0, 1.0))
    assert taus[0] == pytest.approx(0.01)  # the smallest positive gap
    assert taus[-1] == pytest.approx(4.0)  # the largest
    assert len(taus) == 5
    assert place_temperatures(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 5, (0.05, 0.95)) == (1.0,)


@pytest.fixture(scope="module")
def blobs():
    return blob_images(24, seed=5)


@pytest.fixture(scope="module")
def self_report(backend, blobs):
    """Calibration on a database built from the held-out images themselves."""
    database, _ = database_from_images(backend, blobs, Neighbourhood())
    captions = [None if i % 4 == 0 else "a red 7" for i in range(len(blobs))]
    return calibrate(backend, database, list(zip(captions, blobs, strict=True)), FAST)


def test_lambda_zero_is_exactly_the_models_likelihood(backend, blobs, self_report):
    heldout = as_heldout(backend, [("a red 7", image) for image in blobs])
    sampling = backend.sampling
    captions = [None if i % 4 == 0 else "a red 7" for i in range(len(blobs))]
    with torch.inference_mode():
        prompts = [c or "" for c in captions]
        cond = backend.teacher_forced_logits(prompts, heldout.tokens, torch.tensor([c is None for c in captions]))
        uncond = backend.teacher_forced_logits(prompts, heldout.tokens, torch.ones(len(blobs), dtype=torch.bool))
    probs = to_probabilities(apply_guidance(cond, uncond, sampling.guidance_scale), sampling.temperature)
    nll = -probs.double().log().gather(-1, heldout.tokens[..., None])[..., 0]  # (N, T)
    test = ~HeldOut(tuple(captions), heldout.tokens).split(FAST.validation_fraction, FAST.split_seed)
    guided = self_report.decoding
    assert guided.name == "guided"
    assert guided.rows[0].name == "model alone"
    assert guided.rows[0].test_nll.mean == pytest.approx(nll[test].mean().item(), rel=1e-6)
    assert guided.rows[0].validation_nll == pytest.approx(nll[~test].mean().item(), rel=1e-6)
    assert np.asarray(guided.validation_grid).shape == (2, 2, 3, len(FAST.weights))  # [rule][τ][k: 4, 16, all][λ]


def test_a_database_of_the_heldout_images_themselves_informs_the_model(self_report):
    for part in self_report.distributions:
        chosen = part.row(part.chosen)
        assert chosen.setting is not None
        assert chosen.setting["weight"]["weight"] > 0
        assert chosen.change.high < -20  # a large reduction, clear of zero
        assert part.informative
        assert "informs this model" in part.verdict
        assert part.missing["16"] < 0.05  # the true token follows one of the exact matches
        assert part.top1["nearest neighbour's token"] > 0.5


def test_a_database_of_random_token_grids_does_not_inform_the_model(backend, blobs):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, backend.codebook_size, (32, backend.grid.size), generator=g)
    database = PatchDatabase(DatabaseSpec.for_backend(backend))
    database.add(tokens, backend.code_vectors(tokens), [f"random{i}" for i in range(32)])
    report = calibrate(backend, database, [("a red 7", image) for image in blobs], FAST)
    for part in report.distributions:
        chosen = part.row(part.chosen)
        assert chosen.setting is None or chosen.setting["weight"]["weight"] <= min(FAST.weights)
        assert not part.informative
        assert "does not inform this model" in part.verdict


def test_the_tables_gates_and_logistic_rule_are_scored_as_they_decode(backend, blobs):
    """Per-image table sums equal the rules applied position by position; the fitted logistic rule is no worse than
    the fixed λ it starts from; out-of-fold changes come from settings tuned without the fold."""
    database, tokens = database_from_images(backend, blobs[:12], Neighbourhood())
    others = as_heldout(backend, [(None, b) for b in blobs[12:]]).tokens
    heldout = HeldOut(tuple(["a red 7"] * 24), torch.cat([tokens, others]))
    validation = heldout.split(0.5, 0)
    grid = TemperatureGrid((0.1, 1.0))
    measured = measure_retrieval(backend, database, heldout.tokens, validation, (4, 16), grid, 4, 4096, 0)
    model = score_model(backend, heldout, SamplingConfig(guidance_scale=1.0))["conditional"]
    positions = measured.positions
    images = torch.arange(len(heldout)).repeat_interleave(len(positions))
    evidence = Evidence(
        model.log_target[:, positions].flatten(), model.entropy[:, positions].flatten(), measured.scores,
        measured.temperatures, measured.ks, {}, images, validation,
    )  # fmt: skip
    for rule in DUPLICATES:  # λ = 0 is exactly the model, position by position
        alone = DaidSetting(rule, 0.1, 4, AdaptiveWeight("fixed", 0.0))
        assert torch.equal(evidence.log_mixture(alone), evidence.log_model)
    table = GridTable.build(evidence, (0.1, 0.5, 0.9), (0.25, 0.5, 0.75))
    for tuned in (table.best_fixed(evidence, validation), table.best_gated(evidence, validation)):
        direct = float(evidence.nll_change(tuned.setting)[evidence.on_validation].sum())
        assert tuned.objective == pytest.approx(direct, rel=1e-9, abs=1e-9)
    assert table.best_gated(evidence, validation).setting.weight.kind == "gated"
    start = DaidSetting("nearest", 1.0, 16, AdaptiveWeight("fixed", 0.5))
    fitted = fit_logistic(evidence, start, 0.99, 100)
    assert fitted.setting.weight.kind == "logistic"
    assert fitted.objective <= float(evidence.nll_change(start)[evidence.on_validation].sum()) + 1e-9
    r, s, q = evidence.index(start)
    weights = fitted.setting.weight.weights(
        evidence.retrieval.nearest, evidence.retrieval.entropy[:, r, s, q], evidence.model_entropy
    )
    assert bool(((weights >= 0) & (weights <= 0.99)).all())
    folds = torch.arange(len(heldout)) % 2
    final, held_out = cross_validate(partial(table.best_fixed, evidence), evidence, folds)
    assert final == table.best_fixed(evidence, validation)
    assert bool((held_out[~evidence.on_validation] == 0).all())
    for fold in (0, 1):
        inner = table.best_fixed(evidence, validation & (folds != fold))
        inside = (validation & (folds == fold))[images]
        assert torch.equal(held_out[inside], evidence.nll_change(inner.setting)[inside])


def test_the_report_is_json_and_names_a_setting_decoding_can_use(tmp_path, backend, self_report):
    with pytest.raises(ValueError, match="say where"):
        write_report(self_report)
    path = write_report(self_report, tmp_path)
    data = json.loads(path.read_text())
    assert path.name == "calibration.json"
    assert data["backend"] == backend.name
    assert data["heldout"]["images"] == 24
    assert data["heldout"]["captioned"] == 18
    chosen = data["chosen"]["setting"]
    weight = AdaptiveWeight.from_dict(chosen["weight"])
    setting = DaidSetting(chosen["duplicates"], chosen["temperature"], chosen["k"], weight)
    assert setting.to_dict() == chosen
    assert setting.retrieval_config().k == chosen["k"]
    text = render_report(self_report)
    assert "model alone" in text
    assert "beyond the best control" in text
    assert self_report.decoding.verdict in text


def test_a_database_folder_is_loaded_and_the_report_lands_beside_it(tmp_path, backend, database, blobs):
    database.save(tmp_path / "db")
    report = calibrate(backend, tmp_path / "db", [("a red 7", image) for image in blobs[:6]], FAST)
    assert write_report(report) == tmp_path / "db" / "calibration.json"


def test_heldout_items_are_refused_when_mixed_or_too_few(backend, blobs):
    with pytest.raises(ValueError, match="either all as images or all as token grids"):
        as_heldout(backend, [(None, blobs[0]), (None, torch.zeros(backend.grid.size, dtype=torch.long))])
    with pytest.raises(ValueError, match="at least two"):
        as_heldout(backend, [(None, blobs[0])])
    with pytest.raises(ValueError, match="weights"):
        CalibrationConfig(weights=(0.0, 0.5))


def test_world_heldout_gives_captioned_scenes():
    captions, images = world_heldout(6)
    assert len(captions) == len(images) == 6
    assert all(isinstance(c, str) and c for c in captions)
    assert images[0].size == (64, 64)


def test_the_tiny_janus_backend_calibrates_end_to_end(blobs):
    pytest.importorskip("transformers")
    from arrag.backends.janus import JanusBackend
    from janus_tiny import tiny_janus_model, tiny_janus_processor

    janus = JanusBackend(tiny_janus_model(), tiny_janus_processor(), "tiny-janus")
    database, _ = database_from_images(janus, blobs[:8], Neighbourhood())
    captions = ["a red cat on the sofa", None, "a blue dog", "a photo of a cat"] * 2
    report = calibrate(janus, database, list(zip(captions, blobs[8:16], strict=True)), FAST)
    assert [part.name for part in report.distributions] == ["conditional", "guided"]
    assert report.backend == "tiny-janus"
    json.dumps(report.to_dict())
