import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arrag.decoding.merge import mix, retrieval_distribution

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
