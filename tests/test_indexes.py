import math

import faiss
import numpy as np
import pytest
import torch

from arrag.retrieval import indexes
from arrag.retrieval.database import DatabaseSpec, PatchDatabase, make_entries
from arrag.retrieval.grid import Grid, Neighbourhood
from arrag.retrieval.indexes import IndexConfig

V, D_CELL = 50, 4  # a codebook size that is not a power of two
SPEC = DatabaseSpec(
    backend="synthetic",
    grid=Grid(6, 7),
    codebook_size=V,
    codebook_fingerprint="x",
    cell_dim=D_CELL,
    neighbourhood=Neighbourhood(1, "zero"),  # keys with off-grid (zero) cells too
)


def unit_codebook(seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(V, D_CELL)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def token_grids(images: int, seed: int = 0) -> torch.Tensor:
    """Zipf-like token grids: a few codes are common, so many keys repeat (ties, as in real databases)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, V + 1)
    return torch.from_numpy(rng.choice(V, size=(images, SPEC.grid.size), p=weights / weights.sum()))


def filled(config: IndexConfig, images: int = 60, search_params: str = "") -> tuple[PatchDatabase, np.ndarray]:
    codebook = unit_codebook()
    config = IndexConfig(**{**config.to_dict(), "search_params": search_params})
    database = PatchDatabase(SPEC, index_config=config, codebook=codebook)
    tokens = token_grids(images)
    vectors = torch.from_numpy(codebook[tokens])
    if not database.index.is_trained:
        database.train(make_entries(SPEC, tokens, vectors, 0).keys)
    database.add(tokens, vectors, [f"image{i}" for i in range(images)])
    return database, codebook


def all_entries(images: int = 60) -> tuple[np.ndarray, np.ndarray]:
    tokens = token_grids(images)
    entries = make_entries(SPEC, tokens, torch.from_numpy(unit_codebook()[tokens]), 0)
    return entries.keys, entries.numbers


def queries(count: int = 40, seed: int = 1) -> torch.Tensor:
    """Half exact database keys (distance-0 ties), half noisy ones."""
    keys, _ = all_entries()
    rng = np.random.default_rng(seed)
    chosen = keys[rng.choice(len(keys), count, replace=False)]
    chosen[count // 2 :] += rng.normal(0, 0.3, chosen[count // 2 :].shape).astype(np.float32)
    return torch.from_numpy(chosen)


def assert_exact(database: PatchDatabase, k: int = 10) -> None:
    """Same distances as brute force; every returned entry's own key is at the returned distance and the
    returned token is the one at its image and position."""
    keys, numbers = all_entries()
    grids = token_grids(60)
    image, slot = np.divmod(numbers, len(database.positions))
    position = database.positions[slot]
    key_of = dict(zip(zip(image.tolist(), position.tolist(), strict=True), keys, strict=True))
    q = queries()
    found = database.search(q, k)
    brute = ((q.numpy()[:, None, :] - keys[None]) ** 2).sum(-1)  # (B, N)
    np.testing.assert_allclose(found.distances.numpy(), np.sort(brute, axis=1)[:, :k], atol=1e-5)
    for row in range(len(q)):
        where = zip(found.image_ids[row].tolist(), found.positions[row].tolist(), strict=True)
        own = [((q[row].numpy() - key_of[i]) ** 2).sum() for i in where]
        np.testing.assert_allclose(own, found.distances[row].numpy(), atol=1e-5)
    assert torch.equal(found.tokens, grids[found.image_ids, found.positions])


def test_pack_codes_is_faiss_own_encoding_of_codebook_keys():
    codebook = unit_codebook()
    index = SPEC.empty_index(IndexConfig("CodebookPQ"), codebook)
    pq_index = faiss.downcast_index(index)
    bits = pq_index.pq.nbits
    assert bits == math.ceil(math.log2(V + 1))
    cells = np.random.default_rng(0).integers(0, V + 1, size=(500, 4))  # V: the zero cell
    table = np.concatenate([codebook, np.zeros((1, D_CELL), np.float32)])
    keys = table[cells].reshape(500, -1)
    np.testing.assert_array_equal(indexes.pack_codes(cells, bits), pq_index.sa_encode(keys))


@pytest.mark.parametrize("description", ["CodebookPQ", "IVF8,CodebookPQ"])
def test_codebook_pq_distances_are_exact_in_a_few_bytes(description):
    database, _ = filled(IndexConfig(description), search_params="nprobe=8" if "IVF" in description else "")
    pq_index = faiss.downcast_index(faiss.extract_index_ivf(database.index) if "IVF" in description else database.index)
    assert pq_index.pq.code_size == math.ceil(4 * math.log2(V + 1) / 8) == 3  # 4 neighbours × 6 bits
    assert_exact(database)


def test_nprobe_reaches_an_opq_wrapped_ivf_and_changes_results():
    """The paper's code sets index.nprobe on an OPQ pre-transform: older FAISS took it as a new Python attribute
    and searched with nprobe=1; FAISS 1.15 refuses it. ParameterSpace sets the wrapped IVF's."""
    database, _ = filled(IndexConfig("OPQ4,IVF16,Flat"), images=120)
    q = queries()
    one = database.search(q, 10)
    with pytest.raises(AttributeError):
        database.index.nprobe = 16
    database.set_search_params("nprobe=16")
    assert faiss.extract_index_ivf(database.index).nprobe == 16
    every = database.search(q, 10)
    assert not torch.equal(every.distances, one.distances)
    assert (every.distances <= one.distances + 1e-6).all()
    exact, _ = filled(IndexConfig("Flat"), images=120)
    np.testing.assert_allclose(every.distances.numpy(), exact.search(q, 10).distances.numpy(), atol=1e-5)
    assert database.manifest()["index"]["search_params"] == "nprobe=16"


def test_search_params_are_saved_and_applied_on_load(tmp_path):
    database, _ = filled(IndexConfig("IVF8,CodebookPQ"), search_params="nprobe=3")
    database.save(tmp_path / "db")
    loaded = PatchDatabase.load(tmp_path / "db")
    assert faiss.extract_index_ivf(loaded.index).nprobe == 3
    q = queries()
    assert torch.equal(loaded.search(q, 5).distances, database.search(q, 5).distances)


def test_hnsw_ef_search_is_set_and_widens_the_search():
    database, _ = filled(IndexConfig("HNSW8"), search_params="efSearch=10")
    q = queries()
    narrow = database.search(q, 10).distances.sum()
    database.set_search_params("efSearch=400")
    assert faiss.downcast_index(database.index).hnsw.efSearch == 400
    assert database.search(q, 10).distances.sum() < narrow


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="on-disk"):
        IndexConfig("Flat", on_disk=True)
    with pytest.raises(ValueError, match="name=number"):
        IndexConfig("IVF8,Flat", search_params="nprobe")
    with pytest.raises(ValueError, match="1000"):  # a saved index with it could not be read back
        IndexConfig("IVF8,PQ8x4fs,Refine(CodebookPQ)", search_params="k_factor_rf=5000")
    with pytest.raises(ValueError, match="on-disk"):
        IndexConfig("IVF8,PQ8x4fs,Refine(CodebookPQ)", on_disk=True)
    with pytest.raises(ValueError, match="at least one list"):  # FAISS would make it and search nothing
        IndexConfig("IVF0,Flat")
    for params in ("nprobe=0", "efSearch=-5"):
        with pytest.raises(ValueError, match=">= 1"):
            IndexConfig("IVF8,Flat", search_params=params)
    with pytest.raises(ValueError, match="cannot make"):
        indexes.make_index(IndexConfig("NotAnIndex"), 16, 4)
    with pytest.raises(ValueError, match="codebook"):
        indexes.make_index(IndexConfig("CodebookPQ"), 16, 4)
    without_zero = indexes.make_index(IndexConfig("CodebookPQ"), 16, 4, unit_codebook(), zero_cells=False)
    assert faiss.downcast_index(without_zero).pq.nbits == math.ceil(math.log2(V))
    with pytest.raises(ValueError, match="does not fit"):  # a zero cell in a database without them
        indexes.add_entries(
            without_zero, IndexConfig("CodebookPQ"), np.zeros((1, 16)), np.zeros(1), np.full((1, 4), 64)
        )
    with pytest.raises(ValueError, match="training keys"):
        indexes.train(
            indexes.make_index(IndexConfig("IVF64,Flat"), 16, 4), IndexConfig("IVF64,Flat"), np.zeros((10, 16))
        )
    latent_spec = DatabaseSpec(**{**vars(SPEC), "key_source": "latents"})
    with pytest.raises(ValueError, match="CodebookPQ"):
        PatchDatabase(latent_spec, index_config=IndexConfig("CodebookPQ"), codebook=unit_codebook())


@pytest.mark.parametrize("description", ["IDMap,Flat", "IDMap,HNSW8"])
def test_indexes_that_store_ids_return_the_same_entries_as_those_that_number_them(description):
    """Stored ids carry the entry number and next token; Flat numbers entries as added and keeps the tokens
    beside the index. Both must name the same image, position and token for every result."""
    stored, _ = filled(IndexConfig(description), search_params="efSearch=400" if "HNSW" in description else "")
    numbered, _ = filled(IndexConfig("Flat"))
    assert indexes.stores_ids(stored.index) and stored.next_tokens is None
    assert not indexes.stores_ids(numbered.index) and len(numbered.next_tokens) == len(numbered)
    q = queries()
    a, b = stored.search(q, 10), numbered.search(q, 10)
    if "HNSW" not in description:  # the graph is approximate among these many tied keys
        np.testing.assert_allclose(a.distances.numpy(), b.distances.numpy(), atol=1e-5)
    grids = token_grids(60)
    for found in (a, b):
        assert torch.equal(found.tokens, grids[found.image_ids, found.positions])


def test_a_fast_scan_shortlist_refined_by_the_codebook_pq_ranks_by_exact_distances():
    """Every list probed and a shortlist of all entries: the refined index is exact. With a short shortlist
    the lossy 4-bit scan misses some nearest entries, but what it returns is still ranked by exact distance."""
    description = "IVF8,PQ8x4fs,Refine(CodebookPQ)"
    database, _ = filled(IndexConfig(description), search_params="nprobe=8,k_factor_rf=1000")
    refine = faiss.downcast_index(faiss.downcast_index(database.index).refine_index)
    assert refine.pq.code_size == 3 and database.next_tokens is not None
    assert_exact(database)
    database.set_search_params("nprobe=8,k_factor_rf=1")
    keys, _ = all_entries()
    q = queries()
    found = database.search(q, 10)
    own = ((q.numpy()[:, None, :] - keys[None]) ** 2).sum(-1)  # (B, N)
    exact = np.sort(own, axis=1)[:, :10]
    assert (found.distances.numpy() >= exact - 1e-5).all() and (found.distances.numpy() > exact + 1e-5).any()
    assert (np.diff(found.distances.numpy(), axis=1) >= 0).all()
