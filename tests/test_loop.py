import numpy as np
import pytest
import torch

from arrag.config import GenerationConfig, RetrievalConfig, SamplingConfig
from arrag.decoding.loop import generate, generate_in_batches

PROMPTS = ["a red 7", "two blue cats", "a 3 left of a 5", "green"]


def daid(weight: float, **retrieval) -> GenerationConfig:
    return GenerationConfig(method="daid", retrieval=RetrievalConfig(weight=weight, **retrieval))


def test_lambda_zero_gives_byte_identical_images(backend, database):
    plain = generate(backend, PROMPTS[:2], GenerationConfig(num_images_per_prompt=2, seed=7))
    config = GenerationConfig(
        method="daid", retrieval=RetrievalConfig(weight=0.0, k=16), num_images_per_prompt=2, seed=7
    )
    mixed = generate(backend, PROMPTS[:2], config, database)
    assert torch.equal(plain.tokens, mixed.tokens)
    assert torch.equal(plain.images, mixed.images)
    shares = mixed.records.retrieval_share[:, database.positions]
    assert torch.equal(shares, torch.zeros_like(shares))  # retrieval ran, and weighed nothing


def reference_entries(backend) -> tuple[np.ndarray, np.ndarray]:
    """All (key, next token) pairs of the fixture database, rebuilt with numpy loops from its images."""
    from conftest import blob_images

    pixels = torch.stack([backend.preprocess(image) for image in blob_images(32, seed=1)])
    grids = backend.encode(pixels).numpy()  # the same images the `database` fixture was built from
    codebook = backend.code_vectors(torch.arange(backend.codebook_size)).numpy()
    grid, keys, values = backend.grid, [], []
    for tokens in grids:
        for r in range(1, grid.rows):
            for c in range(1, grid.cols - 1):
                cells = [(r - 1, c - 1), (r - 1, c), (r - 1, c + 1), (r, c - 1)]
                keys.append(np.concatenate([codebook[tokens[grid.index(a, b)]] for a, b in cells]))
                values.append(tokens[grid.index(r, c)])
    return np.stack(keys), np.array(values)


def nearest_tokens(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> set[int]:
    """Next tokens of every entry at the minimum distance (exact duplicates of a key may tie)."""
    distances = ((keys - query) ** 2).sum(-1)
    return set(values[distances <= distances.min() + 1e-4].tolist())


def test_lambda_one_copies_the_brute_force_nearest_neighbour(backend, database):
    out = generate(backend, PROMPTS, daid(1.0, k=1, temperature=1e-6), database)
    keys, values = reference_entries(backend)
    assert len(keys) == len(database)
    codebook = backend.code_vectors(torch.arange(backend.codebook_size)).numpy()
    grid, eligible = backend.grid, set(database.positions.tolist())
    for row in range(len(PROMPTS)):
        for t in range(grid.size):
            if t in eligible:
                r, c = grid.cell(t)
                cells = [(r - 1, c - 1), (r - 1, c), (r - 1, c + 1), (r, c - 1)]
                query = np.concatenate([codebook[out.tokens[row, grid.index(a, b)]] for a, b in cells])
                assert out.tokens[row, t].item() in nearest_tokens(keys, values, query)
                assert out.records.retrieval_share[row, t] == pytest.approx(1.0)
            else:
                assert out.records.image_ids[row, t] == -1
    assert len({tuple(r) for r in out.tokens.tolist()}) == len(PROMPTS)  # each row followed its own queries


@pytest.mark.parametrize("method", ["none", "daid"])
def test_a_batch_equals_single_runs_with_the_same_seeds(backend, database, method):
    config = GenerationConfig(
        method=method, retrieval=RetrievalConfig(weight=0.5, k=32), num_images_per_prompt=2, seed=11
    )
    batch = generate(backend, PROMPTS, config, database)
    assert batch.seeds == list(range(11, 19))
    single = GenerationConfig(method=method, retrieval=config.retrieval)
    for row, (prompt, seed) in enumerate(zip(batch.prompts, batch.seeds, strict=True)):
        alone = generate(backend, [prompt], single, database, seeds=[seed])
        assert torch.equal(alone.tokens[0], batch.tokens[row]), row


def test_greedy_filtering_equals_a_plain_argmax_loop(backend):
    """top-k = 1 through the loop equals argmax decoding written out by hand on the backend's session."""
    out = generate(backend, ["a red 7", "two 3s"], GenerationConfig(sampling=SamplingConfig(top_k=1)), seeds=[0, 9])
    session = backend.start(["a red 7", "two 3s"], guidance_scale=5.0)
    previous, expected = None, []
    for _ in range(backend.grid.size):
        step = session.step(previous)
        previous = (step.uncond + 5.0 * (step.cond - step.uncond)).argmax(-1)
        expected.append(previous)
    assert torch.equal(out.tokens, torch.stack(expected, dim=1))


def test_filter_order_is_respected(backend, database):
    """top-k = 1 after the merge is greedy on the mixture (seed-free); before it, retrieval still adds choice."""

    def run(order, seed):
        sampling = SamplingConfig(top_k=1, filter_order=order)
        config = GenerationConfig(method="daid", sampling=sampling, retrieval=RetrievalConfig(weight=0.9, k=8))
        return generate(backend, ["a red 7"], config, database, seeds=[seed]).tokens

    assert torch.equal(run("after_merge", 0), run("after_merge", 5))
    assert not torch.equal(run("before_merge", 0), run("before_merge", 5))
    assert not torch.equal(run("before_merge", 0), run("after_merge", 0))


def test_bad_requests_are_refused(backend, database):
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(backend, ["a red 7", "  "], GenerationConfig())
    with pytest.raises(ValueError, match="needs a patch database"):
        generate(backend, ["a red 7"], daid(0.5))
    with pytest.raises(ValueError, match="no prompts"):
        generate(backend, [], GenerationConfig())
    with pytest.raises(ValueError, match="seeds"):
        generate(backend, ["a red 7"], GenerationConfig(), seeds=[1, 2])


def test_a_request_without_sampling_uses_the_backends_own(backend):
    from arrag.backends.builtin import tiny_backend

    greedy = SamplingConfig(guidance_scale=2.0, top_k=1)
    own = tiny_backend(seed=0)
    own.sampling = greedy
    implicit = generate(own, PROMPTS[:2], GenerationConfig(seed=3))
    explicit = generate(backend, PROMPTS[:2], GenerationConfig(sampling=greedy, seed=3))
    default = generate(backend, PROMPTS[:2], GenerationConfig(seed=3))
    assert torch.equal(implicit.tokens, explicit.tokens)
    assert not torch.equal(implicit.tokens, default.tokens)  # top-1 differs from sampling the full distribution


def test_a_single_prompt_string_and_the_default_config_are_accepted(backend):
    """A string is one prompt, not a list of characters; the config defaults to the model alone."""
    out = generate(backend, "a red 7")
    assert out.prompts == ["a red 7"]
    assert torch.equal(out.tokens, generate(backend, ["a red 7"], GenerationConfig()).tokens)


def test_k_beyond_the_database_searches_all_of_it(backend, database):
    """A k of a billion neither allocates for a billion neighbours nor changes the result of searching everything."""
    huge = generate(backend, PROMPTS[:2], daid(0.5, k=10**9, duplicates="sum"), database)
    everything = generate(backend, PROMPTS[:2], daid(0.5, k=len(database), duplicates="sum"), database)
    assert torch.equal(huge.tokens, everything.tokens)


def test_a_batch_that_cannot_fit_is_refused_before_anything_is_allocated(backend):
    with pytest.raises(ValueError, match="generate fewer at a time"):
        generate(backend, ["a red 7"], GenerationConfig(num_images_per_prompt=10**9))


def test_batches_give_the_images_of_one_call(backend, database):
    config = GenerationConfig(
        method="daid", retrieval=RetrievalConfig(weight=0.5, k=32), num_images_per_prompt=2, seed=4
    )
    whole = generate(backend, PROMPTS[:3], config, database)
    done = []
    batches = list(generate_in_batches(backend, PROMPTS[:3], config, database, batch_size=4, progress=done.append))
    assert [len(b.prompts) for b in batches] == [4, 2]
    assert torch.equal(torch.cat([b.tokens for b in batches]), whole.tokens)
    assert [seed for b in batches for seed in b.seeds] == whole.seeds == list(range(4, 10))
    assert sum(done) == pytest.approx(6.0)  # the progress of every image, position by position


def test_batches_of_a_huge_request_come_one_at_a_time(backend):
    """A billion images are never listed up front: the first batch arrives after its own work only."""
    batches = generate_in_batches(backend, "a red 7", GenerationConfig(num_images_per_prompt=10**9), batch_size=2)
    first = next(batches)
    assert first.seeds == [0, 1]
    assert torch.equal(first.tokens, generate(backend, ["a red 7"] * 2, GenerationConfig()).tokens)


def test_a_weight_rule_is_applied_by_the_loop(backend, database):
    """A fixed rule is the fixed λ; a gate every neighbour passes is the fixed λ, one none passes the model alone."""
    from arrag.decoding.weights import AdaptiveWeight

    def with_rule(rule):
        retrieval = RetrievalConfig(weight=0.6, k=16, rule=rule)
        return generate(backend, PROMPTS[:2], GenerationConfig(method="daid", retrieval=retrieval, seed=5), database)

    fixed = with_rule(None).tokens
    alone = generate(backend, PROMPTS[:2], GenerationConfig(seed=5)).tokens
    assert not torch.equal(fixed, alone)
    assert torch.equal(with_rule(AdaptiveWeight("fixed", 0.6)).tokens, fixed)
    assert torch.equal(with_rule(AdaptiveWeight("gated", 0.6, threshold=1e9)).tokens, fixed)
    gated_off = with_rule(AdaptiveWeight("gated", 0.6, threshold=-1.0))
    assert torch.equal(gated_off.tokens, alone)
    shares = gated_off.records.retrieval_share[:, database.positions]
    assert torch.equal(shares, torch.zeros_like(shares))  # retrieval ran, and the gate weighed nothing
    with pytest.raises(ValueError, match="must be the same number"):
        RetrievalConfig(weight=0.3, rule=AdaptiveWeight("fixed", 0.6))
