import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from arrag.backends.builtin import tiny_backend
from arrag.retrieval.database import (
    NEXT_TOKENS_FILE,
    DatabaseMismatchError,
    DatabaseSpec,
    PatchDatabase,
    make_entries,
    stored_ids,
)
from arrag.retrieval.grid import Grid, Neighbourhood
from arrag.retrieval.indexes import IndexConfig

SPEC = DatabaseSpec(backend="synthetic", grid=Grid(6, 7), codebook_size=100, codebook_fingerprint="x", cell_dim=4)


def random_database(images: int = 30, seed: int = 0) -> tuple[PatchDatabase, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, SPEC.codebook_size, (images, SPEC.grid.size), generator=g)
    vectors = torch.randn(images, SPEC.grid.size, SPEC.cell_dim, generator=g)
    database = PatchDatabase(SPEC)
    database.add(tokens[:10], vectors[:10], [f"a{i}" for i in range(10)])  # two adds: ids keep counting
    database.add(tokens[10:], vectors[10:], [f"b{i}" for i in range(images - 10)])
    return database, tokens, vectors


def brute_force_entries(tokens: torch.Tensor, vectors: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """All (key, (image, position, token)) of the L neighbourhood, built with plain numpy loops."""
    unit = vectors.numpy() / np.linalg.norm(vectors.numpy(), axis=-1, keepdims=True)
    keys, meta = [], []
    grid = SPEC.grid
    for image in range(len(tokens)):
        for row in range(1, grid.rows):
            for col in range(1, grid.cols - 1):
                cells = [(row - 1, col - 1), (row - 1, col), (row - 1, col + 1), (row, col - 1)]
                keys.append(np.concatenate([unit[image, grid.index(r, c)] for r, c in cells]))
                meta.append((image, grid.index(row, col), int(tokens[image, grid.index(row, col)])))
    return np.stack(keys).astype(np.float32), np.array(meta)


def test_search_equals_brute_force_numpy():
    database, tokens, vectors = random_database()
    keys, meta = brute_force_entries(tokens, vectors)
    assert len(database) == len(keys) == 30 * 5 * 5
    queries = torch.from_numpy(
        keys[::37] + np.random.default_rng(0).normal(0, 0.3, keys[::37].shape).astype(np.float32)
    )
    found = database.search(queries, k=5)
    distances = ((queries.numpy()[:, None, :] - keys[None]) ** 2).sum(-1)  # (B, N)
    order = np.argsort(distances, axis=1)[:, :5]
    np.testing.assert_allclose(found.distances.numpy(), np.take_along_axis(distances, order, 1), rtol=1e-4)
    assert found.image_ids.tolist() == meta[order][..., 0].tolist()
    assert found.positions.tolist() == meta[order][..., 1].tolist()
    assert found.tokens.tolist() == meta[order][..., 2].tolist()
    assert found.valid.all()


def test_fewer_entries_than_k_are_marked_invalid():
    database, _, _ = random_database(images=11)
    found = database.search(torch.zeros(2, SPEC.key_dim), k=len(database) + 3)
    assert found.valid.sum(-1).tolist() == [len(database)] * 2
    assert torch.isinf(found.distances[~found.valid]).all()
    assert (found.image_ids[~found.valid] == -1).all()


def test_entry_numbers_locate_image_position_and_next_token():
    database, tokens, vectors = random_database()
    _, meta = brute_force_entries(tokens, vectors)
    located = database.locate(np.arange(len(database)))
    assert np.stack(located, axis=1).tolist() == meta.tolist()
    assert [part.tolist() for part in database.locate(np.array([[-1]]))] == [[[-1]], [[-1]], [[0]]]


@given(st.integers(0, (1 << (63 - 7)) // 25 - 1), st.integers(0, 24), st.integers(0, 99))
def test_stored_ids_of_any_database_size_locate_image_position_and_token(image, slot, token):
    """Ids of indexes that store them (here up to the largest database of 100 codes) decode to what they hold."""
    database = PatchDatabase(SPEC, index_config=IndexConfig("IDMap,Flat"))
    ids = stored_ids(SPEC, np.array([image * 25 + slot]), np.array([token]))
    assert ids[0] >= 0
    assert [int(part[0]) for part in database.locate(ids)] == [image, int(database.positions[slot]), token]


def test_the_largest_database_is_refused_past_its_last_image():
    last = (1 << (63 - 7)) // 25 - 1  # 100 codes: 7 token bits; 25 entries per image
    make_entries(SPEC, torch.zeros(1, SPEC.grid.size, dtype=torch.long), torch.ones(1, 42, 4), last)
    with pytest.raises(ValueError, match="at most"):
        make_entries(SPEC, torch.zeros(1, SPEC.grid.size, dtype=torch.long), torch.ones(1, 42, 4), last + 1)


@pytest.mark.parametrize("description", ["Flat", "IDMap,Flat"])
def test_an_empty_database_finds_nothing(description):
    found = PatchDatabase(SPEC, index_config=IndexConfig(description)).search(torch.zeros(2, SPEC.key_dim), k=3)
    assert not found.valid.any() and (found.image_ids == -1).all() and (found.tokens == 0).all()


def test_save_load_round_trip_gives_identical_results(tmp_path):
    database, _, _ = random_database()
    queries = torch.randn(16, SPEC.key_dim, generator=torch.Generator().manual_seed(3))
    before = database.search(queries, k=8)
    database.save(tmp_path / "db")
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    assert manifest["version"] == 2
    assert manifest["counts"] == {"images": 30, "entries": 750, "entries_per_image": 25}
    assert manifest["spec"]["neighbourhood"] == {"hops": 1, "missing": "skip"}
    loaded = PatchDatabase.load(tmp_path / "db", expect=SPEC)
    after = loaded.search(queries, k=8)
    for name in ("distances", "tokens", "image_ids", "positions", "valid"):
        assert torch.equal(getattr(before, name), getattr(after, name)), name
    assert loaded.sources == database.sources


def test_a_database_from_another_tokenizer_or_grid_is_refused(tmp_path):
    ours, theirs = tiny_backend(seed=0), tiny_backend(seed=1)
    database = PatchDatabase(DatabaseSpec.for_backend(ours))
    database.save(tmp_path / "db")
    with pytest.raises(DatabaseMismatchError) as refused:
        PatchDatabase.load(tmp_path / "db", expect=DatabaseSpec.for_backend(theirs))
    assert ours.codebook_fingerprint in str(refused.value)
    assert theirs.codebook_fingerprint in str(refused.value)
    other_grid = DatabaseSpec(**{**vars(database.spec), "grid": Grid(4, 4)})
    with pytest.raises(DatabaseMismatchError, match="token grid"):
        PatchDatabase.load(tmp_path / "db", expect=other_grid)


def test_a_neighbourhood_that_leaves_no_position_with_a_key_is_refused():
    with pytest.raises(ValueError, match="no position"):
        DatabaseSpec(**{**vars(SPEC), "grid": Grid(4, 4), "neighbourhood": Neighbourhood(hops=4)})
    zero = DatabaseSpec(**{**vars(SPEC), "grid": Grid(4, 4), "neighbourhood": Neighbourhood(hops=4, missing="zero")})
    assert len(zero.neighbourhood.eligible(zero.grid)) == 15  # all but the first position


def test_load_refuses_a_folder_without_a_database_or_with_a_truncated_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a patch database"):
        PatchDatabase.load(tmp_path)
    database, _, _ = random_database()
    database.save(tmp_path / "db")
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    manifest["counts"]["entries"] += 1
    (tmp_path / "db" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="entries"):
        PatchDatabase.load(tmp_path / "db")


def test_add_checks_its_inputs():
    database = PatchDatabase(SPEC)
    with pytest.raises(ValueError, match="same images"):
        database.add(torch.zeros(2, 42, dtype=torch.long), torch.zeros(2, 42, 4), ["only one"])
    with pytest.raises(ValueError, match="queries must be"):
        database.search(torch.zeros(1, 3), k=1)


def test_a_damaged_or_older_database_is_refused_with_what_to_do(tmp_path):
    database, _, _ = random_database()
    database.save(tmp_path / "db")
    next_tokens = np.load(tmp_path / "db" / NEXT_TOKENS_FILE)
    np.save(tmp_path / "db" / NEXT_TOKENS_FILE, next_tokens[:-25])
    with pytest.raises(ValueError, match="damaged, build it again"):
        PatchDatabase.load(tmp_path / "db")
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    (tmp_path / "db" / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(ValueError, match="build the database again"):
        PatchDatabase.load(tmp_path / "db")
    for damaged in ('{"format": "arrag-patch', "[1, 2]"):
        (tmp_path / "db" / "manifest.json").write_text(damaged)
        with pytest.raises(ValueError, match=r"manifest\.json"):
            PatchDatabase.load(tmp_path / "db")
