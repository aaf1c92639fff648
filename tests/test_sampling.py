import pytest
import torch

from arrag.config import GenerationConfig, RetrievalConfig, SamplingConfig
from arrag.decoding.sampling import (
    apply_guidance,
    filter_probabilities,
    sample,
    to_probabilities,
    top_k_filter,
    top_p_filter,
)


def test_guidance_is_uncond_plus_scale_times_difference():
    cond, uncond = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 3.0]])
    torch.testing.assert_close(apply_guidance(cond, uncond, 5.0), torch.tensor([[3.0, -2.0]]))
    assert apply_guidance(cond, uncond, 1.0) is cond
    assert apply_guidance(cond, None, 5.0) is cond


def test_top_k_keeps_the_k_most_probable():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    original = probs.clone()
    torch.testing.assert_close(top_k_filter(probs, 2), torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]]))
    assert torch.equal(probs, original)  # inputs are never modified


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    torch.testing.assert_close(top_p_filter(probs, 0.7), torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]]))
    torch.testing.assert_close(top_p_filter(probs, 0.71), torch.tensor([[0.0, 4 / 9, 2 / 9, 3 / 9]]))
    torch.testing.assert_close(top_p_filter(probs, 0.05), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    assert torch.equal(filter_probabilities(probs, None, None), probs)


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[0.0, 1.0]])
    assert (
        to_probabilities(logits, 0.1)[0, 1] > to_probabilities(logits, 1.0)[0, 1] > to_probabilities(logits, 10)[0, 1]
    )


def test_each_row_draws_from_its_own_generator():
    probs = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(0)), -1)
    batch = sample(probs, [torch.Generator().manual_seed(s) for s in range(4)])
    alone = [sample(probs[i : i + 1], [torch.Generator().manual_seed(i)]) for i in range(4)]
    assert torch.equal(batch, torch.cat(alone))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SamplingConfig(temperature=0), "temperature must be > 0"),
        (lambda: SamplingConfig(top_p=1.5), "top_p"),
        (lambda: SamplingConfig(top_k=0), "top_k"),
        (lambda: RetrievalConfig(weight=-0.1), "λ"),
        (lambda: RetrievalConfig(temperature=-1), "τ"),
        (lambda: RetrievalConfig(k=0), "k must be an integer"),
        (lambda: RetrievalConfig(duplicates="max"), "duplicates"),  # type: ignore[arg-type]
        (lambda: GenerationConfig(method="knn"), "method"),  # type: ignore[arg-type]
        (lambda: GenerationConfig(num_images_per_prompt=0), "num_images_per_prompt"),
    ],
)
def test_configs_refuse_out_of_range_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()
