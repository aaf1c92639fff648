"""The neighbour memo: remembered answers are exactly the answers a search gives."""

import torch

from arrag.config import GenerationConfig, RetrievalConfig
from arrag.decoding.loop import PatchRetriever, generate
from arrag.retrieval.keys import patch_keys
from arrag.retrieval.memo import BYTES_PER_NEIGHBOUR, NeighbourMemo

PROMPTS = ["a red 7", "two blue cats", "a 3 left of a 5"]


def contexts_and_queries(backend, database, rows: int, seed: int):
    """Random token grids -> every eligible position's (contexts, queries), as the loop makes them."""
    spec = database.spec
    tokens = torch.randint(
        0, backend.codebook_size, (rows, spec.grid.size), generator=torch.Generator().manual_seed(seed)
    )
    tokens[1] = tokens[0]  # two rows with the same contexts everywhere
    cells = torch.as_tensor(spec.neighbourhood.indices(spec.grid))
    queries = patch_keys(backend.code_vectors(tokens).float(), database.positions, spec.grid, spec.neighbourhood)
    return [(tokens[:, cells[p]], queries[:, i]) for i, p in enumerate(database.positions.tolist())]


def test_remembered_answers_equal_searching(backend, database):
    memo, k = NeighbourMemo(), 16
    for round_ in range(2):  # the second round is answered from the memo alone
        for contexts, queries in contexts_and_queries(backend, database, rows=4, seed=0):
            got, expected = memo.search(contexts, queries, lambda q: database.search(q, k)), database.search(queries, k)
            for name in ("distances", "tokens", "image_ids", "positions", "valid"):
                assert torch.equal(getattr(got, name), getattr(expected, name)), (round_, name)
    positions = len(database.positions)
    assert memo.misses <= 3 * positions  # rows 0 and 1 share every context: searched once
    assert memo.hits >= positions + 4 * positions  # all of the second round, and row 1 in the first


def test_the_memo_stays_within_its_bound_and_stays_exact(backend, database):
    k = 8
    memo = NeighbourMemo(max_bytes=10 * k * BYTES_PER_NEIGHBOUR)  # room for ten contexts
    for contexts, queries in contexts_and_queries(backend, database, rows=3, seed=1):
        got = memo.search(contexts, queries, lambda q: database.search(q, k))
        assert torch.equal(got.tokens, database.search(queries, k).tokens)
        assert len(memo.answers) <= 10
        assert memo.bytes <= memo.max_bytes


class UncachedRetriever(PatchRetriever):
    """The reference: every row's query sent to the database, at every step."""

    def search(self, position):
        spec = self.database.spec
        queries = patch_keys(self.cell_vectors, [position], spec.grid, spec.neighbourhood)[:, 0]
        return self.database.search(queries, self.k)


def test_generation_with_the_memo_equals_generation_without(backend, database):
    config = GenerationConfig(method="daid", retrieval=RetrievalConfig(weight=0.6, k=32), num_images_per_prompt=2)
    cached = generate(backend, PROMPTS, config, database)
    reference = UncachedRetriever(backend, database, 32, rows=len(PROMPTS) * 2)
    uncached = generate(backend, PROMPTS, config, database, retriever=reference)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert torch.equal(cached.records.image_ids, uncached.records.image_ids)
