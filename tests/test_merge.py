import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arrag.decoding.merge import entropy, mix, mix_per_row, retrieval_distribution
from arrag.decoding.weights import AdaptiveWeight, gated_weight, logistic_weight

V = 12


@st.composite
def retrieval_cases(draw):
    rows, k = draw(st.integers(1, 4)), draw(st.integers(1, 16))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    distances = torch.rand(rows, k, generator=g) * draw(st.sampled_from([1.0, 16.0, 1e4]))
    tokens = torch.randint(0, V, (rows, k), generator=g)
    valid = torch.rand(rows, k, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    p_model = torch.softmax(torch.randn(rows, V, generator=g) * 3, dim=-1)
    tau = draw(st.sampled_from([1e-6, 0.1, 1.0, 100.0]))
    return distances, tokens, valid, p_model, tau


@settings(max_examples=200, deadline=None)
@given(retrieval_cases(), st.sampled_from(["nearest", "sum"]), st.floats(0.0, 1.0))
def test_merge_properties(case, duplicates, weight):
    distances, tokens, valid, p_model, tau = case
    p_ret, found = retrieval_distribution(distances, tokens, valid, V, tau, duplicates)
    assert torch.isfinite(p_ret).all()
    assert torch.equal(found, valid.any(-1))
    merged = mix(p_model, p_ret, found, weight)
    torch.testing.assert_close(merged.sum(-1), torch.ones(len(merged)))  # rows sum to 1
    assert torch.equal(merged[~found], p_model[~found])  # rows without retrieval are untouched
    assert torch.equal(mix(p_model, p_ret, found, 0.0), p_model)  # λ = 0 is the model
    retrieved = torch.zeros(len(tokens), V).scatter_add(-1, tokens, valid.float()) > 0  # (B, V)
    only_retrieval = mix(p_model, p_ret, found, 1.0)
    assert (only_retrieval[found][~retrieved[found]] == 0).all()  # λ = 1: support on retrieved tokens only
    # The result does not depend on the order of the neighbours.
    order = torch.randperm(tokens.shape[1], generator=torch.Generator().manual_seed(1))
    shuffled, _ = retrieval_distribution(distances[:, order], tokens[:, order], valid[:, order], V, tau, duplicates)
    torch.testing.assert_close(shuffled, p_ret)


def test_nearest_keeps_each_tokens_nearest_occurrence_and_sum_adds_them():
    distances = torch.tensor([[0.0, 1.0, 1.0]])
    tokens = torch.tensor([[3, 5, 5]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    nearest, _ = retrieval_distribution(distances, tokens, valid, 8, temperature=1.0, duplicates="nearest")
    summed, _ = retrieval_distribution(distances, tokens, valid, 8, temperature=1.0, duplicates="sum")
    e = math.exp(-1.0)
    torch.testing.assert_close(nearest[0, [3, 5]], torch.tensor([1 / (1 + e), e / (1 + e)]))
    torch.testing.assert_close(summed[0, [3, 5]], torch.tensor([1 / (1 + 2 * e), 2 * e / (1 + 2 * e)]))


def test_tiny_temperature_puts_all_mass_on_the_nearest_token():
    distances = torch.tensor([[5.0, 5.0 + 1e-3, 1e6]])
    tokens = torch.tensor([[2, 7, 1]])
    p, _ = retrieval_distribution(distances, tokens, torch.ones(1, 3, dtype=torch.bool), 8, temperature=1e-9)
    assert p[0, 2] == 1.0
    assert p.sum() == 1.0


def test_invalid_parameters_are_refused_with_a_message():
    p = torch.full((1, 4), 0.25)
    found = torch.ones(1, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"λ must be in \[0, 1\]"):
        mix(p, p, found, 1.5)
    with pytest.raises(ValueError, match="τ must be a finite number > 0"):
        retrieval_distribution(torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long), found[:, None], 4, 0.0)
    with pytest.raises(ValueError, match="τ"):
        retrieval_distribution(torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long), found[:, None], 4, math.inf)


# Adaptive weights


@settings(max_examples=100, deadline=None)
@given(retrieval_cases(), st.floats(0.0, 1.0), st.floats(0.0, 20.0))
def test_gated_weight_is_the_fixed_weight_inside_and_zero_outside(case, weight, threshold):
    distances, *_ = case
    nearest = distances[:, 0]
    gated = gated_weight(nearest, weight, threshold)
    assert gated.dtype == torch.float64
    assert gated.tolist() == [weight if d <= threshold else 0.0 for d in nearest.tolist()]
    assert torch.equal(gated_weight(nearest, weight, math.inf), torch.full_like(gated, weight))  # +inf: fixed λ
    assert gated_weight(torch.tensor([math.inf]), weight, math.inf).tolist() == [weight]  # no neighbour: still λ


@settings(max_examples=100, deadline=None)
@given(
    retrieval_cases(),
    st.tuples(*[st.floats(-50.0, 50.0)] * 4),
    st.floats(0.0, 1.0),
)
def test_logistic_weight_stays_in_zero_to_its_maximum(case, coefficients, max_weight):
    distances, tokens, valid, p_model, tau = case
    p_ret, _ = retrieval_distribution(distances, tokens, valid, V, tau)
    nearest = distances.masked_fill(~valid, math.inf).min(-1).values  # +inf where nothing was found
    weights = logistic_weight(nearest, entropy(p_ret), entropy(p_model), coefficients, max_weight)
    assert torch.isfinite(weights).all()
    assert ((weights >= 0) & (weights <= max_weight)).all()
    a, b, c, e = coefficients
    expected = max_weight / (1 + math.exp(-(a + b * 0.5 + c * 1.0 + e * 2.0)))
    one = logistic_weight(torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([2.0]), coefficients, max_weight)
    assert one.item() == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_logistic_weight_ignores_a_feature_with_a_zero_coefficient():
    flat = logistic_weight(torch.tensor([math.inf, 0.0]), torch.ones(2), torch.ones(2), (0.0, 0.0, 1.0, -1.0), 0.5)
    assert torch.equal(flat, torch.full((2,), 0.25, dtype=torch.float64))


@settings(max_examples=100, deadline=None)
@given(retrieval_cases(), st.floats(0.0, 1.0))
def test_mix_per_row_with_one_weight_everywhere_is_mix(case, weight):
    distances, tokens, valid, p_model, tau = case
    p_ret, found = retrieval_distribution(distances, tokens, valid, V, tau)
    rows = torch.full((len(p_model),), weight)
    assert torch.equal(mix_per_row(p_model, p_ret, found, rows), mix(p_model, p_ret, found, weight))
    varied = torch.linspace(0, 1, len(p_model))
    merged = mix_per_row(p_model, p_ret, found, varied)
    for i in range(len(p_model)):
        assert torch.equal(merged[i], mix(p_model[i : i + 1], p_ret[i : i + 1], found[i : i + 1], float(varied[i]))[0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mix_per_row(p_model, p_ret, found, rows + 2)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 30), st.integers(0, 2**16))
def test_entropy_is_zero_for_a_point_mass_and_log_v_for_uniform(size, seed):
    assert entropy(torch.full((1, size), 1 / size, dtype=torch.float64)).item() == pytest.approx(math.log(size))
    point = torch.zeros(1, size)
    point[0, seed % size] = 1.0
    assert entropy(point).item() == 0.0
    assert entropy(torch.zeros(1, size)).item() == 0.0
    p = torch.softmax(torch.randn(3, size, generator=torch.Generator().manual_seed(seed)), -1)
    assert ((entropy(p) >= -1e-6) & (entropy(p) <= math.log(size) + 1e-5)).all()


def test_adaptive_weights_round_trip_through_json_and_refuse_bad_rules():
    rules = [
        AdaptiveWeight(),
        AdaptiveWeight("gated", 0.2, threshold=0.01),
        AdaptiveWeight("logistic", 0.9, coefficients=(1.0, -2.0, 0.5, 0.25)),
    ]
    for rule in rules:
        assert AdaptiveWeight.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
    nearest, h = torch.tensor([0.0, 0.5, math.inf]), torch.ones(3)
    assert torch.equal(rules[0].weights(nearest), torch.full((3,), 0.3, dtype=torch.float64))
    assert torch.equal(rules[1].weights(nearest), torch.tensor([0.2, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(rules[2].weights(nearest, h, h), logistic_weight(nearest, h, h, (1.0, -2.0, 0.5, 0.25), 0.9))
    with pytest.raises(ValueError, match="finite distance threshold"):
        AdaptiveWeight("gated", 0.2)
    with pytest.raises(ValueError, match="finite distance threshold"):
        AdaptiveWeight("gated", 0.2, threshold=math.inf)
    with pytest.raises(ValueError, match="only a logistic"):
        AdaptiveWeight("fixed", 0.2, coefficients=(0.0, 0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="λ must be in"):
        AdaptiveWeight("fixed", 1.5)
    with pytest.raises(ValueError, match="entropies"):
        rules[2].weights(nearest)


def test_retrieve_and_mix_applies_a_logistic_rule_row_by_row():
    """The logistic λ of each row from its nearest distance and the entropies of p_ret and p_model."""
    from arrag.config import RetrievalConfig
    from arrag.decoding.merge import retrieve_and_mix
    from arrag.retrieval.neighbours import Neighbours

    generator = torch.Generator().manual_seed(0)
    p_model = torch.softmax(torch.randn(3, 6, generator=generator), dim=-1)
    distances = torch.rand(3, 4, generator=generator).sort(dim=-1).values
    tokens = torch.randint(0, 6, (3, 4), generator=generator)
    valid = torch.tensor([[True] * 4, [True, True, False, False], [False] * 4])
    found = Neighbours(distances.masked_fill(~valid, float("inf")), tokens, tokens, tokens, valid)
    rule = AdaptiveWeight("logistic", 0.8, coefficients=(0.5, -2.0, 0.3, -0.4))
    mixture = retrieve_and_mix(p_model, found, RetrievalConfig(0.8, 0.5, 4, "sum", rule))
    p_ret, rows = retrieval_distribution(found.distances, tokens, valid, 6, 0.5, "sum")
    nearest = found.distances.min(dim=-1).values
    weights = logistic_weight(nearest, entropy(p_ret), entropy(p_model), rule.coefficients, 0.8).where(rows, 0.0)
    torch.testing.assert_close(mixture.probs, mix_per_row(p_model, p_ret, rows, weights), rtol=0, atol=0)
    assert torch.equal(mixture.probs[2], p_model[2])  # no neighbours: the model alone
    assert 0 < weights[0] < 0.8 and weights[2] == 0
