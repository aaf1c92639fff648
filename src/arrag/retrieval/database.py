"""The patch database: a FAISS index over patch keys, and the token that followed each key.

An entry is made for every eligible position of every database image. Its key is
:func:`arrag.retrieval.keys.patch_keys` of the position's causal neighbours. Entries are numbered in order, P per
image: entry ``image · P + slot`` is eligible position ``slot`` of image ``image``, so the number alone says
where an entry came from. How a search result names its entry and next token depends on the index:

- indexes that store an id per entry (IVF, ``IDMap``) store ``number << token_bits | next token``: the
  8 bytes they spend anyway carry everything;
- the others (flat codes such as ``CodebookPQ``, ``Flat``, HNSW) number entries in the order they are added,
  so their ids cost nothing; the next tokens are an array beside the index (``next-tokens.npy``, 2 bytes an
  entry, memory-mapped on load).

Shapes: B queries, K neighbours, D key length, M entries.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
import torch

from arrag.retrieval import indexes
from arrag.retrieval.grid import Grid, Neighbourhood
from arrag.retrieval.indexes import IndexConfig
from arrag.retrieval.keys import KEY_SOURCES, KeySource, key_dim, patch_keys
from arrag.retrieval.layout import NEXT_TOKENS_FILE, DatabaseLayout, write_atomically, write_json
from arrag.retrieval.neighbours import Neighbours

if TYPE_CHECKING:
    from arrag.backends.base import Backend

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 2  # 2: entry numbers (1: ids packed image, position and token)


class DatabaseMismatchError(ValueError):
    """A database was built for another tokenizer, grid or neighbourhood than the one asked for."""


@dataclass(frozen=True)
class DatabaseSpec:
    """Everything a backend and a database must agree on for keys and tokens to mean the same thing."""

    backend: str
    grid: Grid
    codebook_size: int
    codebook_fingerprint: str
    cell_dim: int
    neighbourhood: Neighbourhood = field(default_factory=Neighbourhood)
    key_source: KeySource = "codebook"

    def __post_init__(self) -> None:
        if self.key_source not in KEY_SOURCES:
            raise ValueError(f"key_source must be one of {KEY_SOURCES}, got {self.key_source!r}")
        if self.codebook_size < 2 or self.cell_dim < 1:
            raise ValueError(f"bad codebook: {self.codebook_size} codes of size {self.cell_dim}")
        if not len(self.neighbourhood.eligible(self.grid)):
            raise ValueError(
                f"a {self.neighbourhood.hops}-hop neighbourhood that skips missing cells leaves no position of the "
                f"{self.grid.rows}×{self.grid.cols} grid with a key; choose fewer hops or missing='zero'"
            )

    @property
    def key_dim(self) -> int:
        return key_dim(self.neighbourhood, self.cell_dim)

    @classmethod
    def for_backend(
        cls, backend: Backend, neighbourhood: Neighbourhood | None = None, key_source: KeySource = "codebook"
    ) -> DatabaseSpec:
        """The spec of a database made with ``backend``'s tokenizer (any :class:`arrag.backends.Backend`)."""
        return cls(
            backend=backend.name,
            grid=backend.grid,
            codebook_size=backend.codebook_size,
            codebook_fingerprint=backend.codebook_fingerprint,
            cell_dim=backend.cell_dim,
            neighbourhood=neighbourhood or Neighbourhood(),
            key_source=key_source,
        )

    def empty_index(self, config: IndexConfig, codebook: np.ndarray | None = None) -> faiss.Index:
        """An empty index of ``config`` for this spec's keys (``codebook``: (V, d) unit vectors, for CodebookPQ)."""
        zero_cells = self.neighbourhood.missing == "zero"
        return indexes.make_index(config, self.key_dim, len(self.neighbourhood.offsets), codebook, zero_cells)

    def to_dict(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "grid": [self.grid.rows, self.grid.cols],
            "codebook_size": self.codebook_size,
            "codebook_fingerprint": self.codebook_fingerprint,
            "cell_dim": self.cell_dim,
            "neighbourhood": self.neighbourhood.to_dict(),
            "key_source": self.key_source,
        }

    @classmethod
    def from_dict(cls, data: dict) -> DatabaseSpec:
        return cls(
            backend=data["backend"],
            grid=Grid(*data["grid"]),
            codebook_size=data["codebook_size"],
            codebook_fingerprint=data["codebook_fingerprint"],
            cell_dim=data["cell_dim"],
            neighbourhood=Neighbourhood(**data["neighbourhood"]),
            key_source=data["key_source"],
        )

    def check_serves(self, backend_spec: DatabaseSpec) -> None:
        """Raise :class:`DatabaseMismatchError` unless this database's tokens mean the backend's tokens."""
        for name, ours, theirs in (
            ("codebook fingerprint", self.codebook_fingerprint, backend_spec.codebook_fingerprint),
            ("codebook size", self.codebook_size, backend_spec.codebook_size),
            (
                "token grid",
                (self.grid.rows, self.grid.cols),
                (backend_spec.grid.rows, backend_spec.grid.cols),
            ),
        ):
            if ours != theirs:
                raise DatabaseMismatchError(
                    f"this database was built for backend {self.backend!r} ({name} {ours}), but backend "
                    f"{backend_spec.backend!r} has {name} {theirs}. Build a database with the same backend "
                    f"(arrag db build IMAGES --backend {backend_spec.backend} --out DIR)."
                )


def token_dtype(codebook_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token of the codebook."""
    return np.dtype(np.uint16 if codebook_size <= 1 << 16 else np.uint32)


def token_bits(codebook_size: int) -> int:
    return max(1, math.ceil(math.log2(codebook_size)))


def stored_ids(spec: DatabaseSpec, numbers: np.ndarray, next_tokens: np.ndarray) -> np.ndarray:
    """The ids indexes that store ids keep: ``entry number << token_bits | next token`` (int64)."""
    return (np.asarray(numbers, dtype=np.int64) << token_bits(spec.codebook_size)) | next_tokens.astype(np.int64)


def next_tokens(spec: DatabaseSpec, tokens: np.ndarray) -> np.ndarray:
    """(N, R·C) token grids -> (N·P,) the token at each of their entries' positions, in entry order."""
    return tokens[:, spec.neighbourhood.eligible(spec.grid)].ravel().astype(token_dtype(spec.codebook_size))


@dataclass(frozen=True)
class Entries:
    """Database entries of some images, ready for an index."""

    keys: np.ndarray  # (M, D) float32 patch keys
    numbers: np.ndarray  # (M,) int64 entry numbers, image · P + slot
    ids: np.ndarray  # (M,) int64 stored_ids: what indexes that store ids keep (the others number as added)
    next_tokens: np.ndarray  # (M,) token at each entry's position (token_dtype)
    cells: np.ndarray  # (M, n) int64 token of each neighbour cell; codebook_size where the cell is off the grid


def make_entries(spec: DatabaseSpec, tokens: torch.Tensor, cell_vectors: torch.Tensor, first_image: int) -> Entries:
    """The entries of images ``first_image, first_image + 1, ...``.

    Args:
        spec: the database's spec.
        tokens: (N, R·C) token grids in raster order.
        cell_vectors: (N, R·C, d) the vectors keys are made of (codebook vectors or encoder latents).
        first_image: database id of the first image.
    """
    n = tokens.shape[0]
    if cell_vectors.shape[:2] != tokens.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and cell_vectors {tuple(cell_vectors.shape)} differ")
    if tokens.shape[1] != spec.grid.size or cell_vectors.shape[2] != spec.cell_dim:
        raise ValueError(
            f"this database takes {spec.grid.size} cells of {spec.cell_dim} values per image, got "
            f"tokens {tuple(tokens.shape)} and cell_vectors {tuple(cell_vectors.shape)}"
        )
    if n and (tokens.min() < 0 or tokens.max() >= spec.codebook_size):
        raise ValueError(f"token ids must be in [0, {spec.codebook_size}), got {tokens.min()}..{tokens.max()}")
    if not torch.isfinite(cell_vectors).all():
        raise ValueError("cell_vectors contain NaN or infinite values")
    positions = spec.neighbourhood.eligible(spec.grid)  # (P,)
    max_entries = 1 << (63 - token_bits(spec.codebook_size))  # stored ids are signed 64-bit
    if (first_image + n) * len(positions) > max_entries:
        raise ValueError(f"a database of this spec holds at most {max_entries // len(positions)} images")
    keys = patch_keys(cell_vectors, positions, spec.grid, spec.neighbourhood)  # (N, P, D)
    grid_tokens = tokens.cpu().numpy()  # (N, R·C)
    table = spec.neighbourhood.indices(spec.grid)[positions]  # (P, n)
    padded = np.concatenate([grid_tokens, np.full((n, 1), spec.codebook_size)], axis=1)  # (N, R·C + 1)
    cells = padded[:, np.where(table < 0, spec.grid.size, table)]  # (N, P, n)
    numbers = first_image * len(positions) + np.arange(n * len(positions))  # (N·P,)
    following = next_tokens(spec, grid_tokens)  # (N·P,)
    return Entries(
        keys=keys.reshape(-1, keys.shape[-1]).cpu().numpy(),
        numbers=numbers,
        ids=stored_ids(spec, numbers, following),
        next_tokens=following,
        cells=cells.reshape(-1, table.shape[1]).astype(np.int64),
    )


class PatchDatabase:
    """Patch database over a FAISS index (exact ``Flat`` by default; see :mod:`arrag.retrieval.indexes` for others).

    ``next_tokens`` holds the token at every entry's position, in entry order, for an index that does not
    store ids (None for one that does: its ids carry the tokens). ``token_shards`` lists the
    Parquet token shards a sharded build wrote (``file``, ``first_image``, ``images``) and ``preprocessing``
    how it prepared images for the tokenizer; a database built in memory records neither.
    """

    def __init__(
        self,
        spec: DatabaseSpec,
        index: faiss.Index | None = None,
        sources: list[str] | None = None,
        index_config: IndexConfig | None = None,
        codebook: np.ndarray | None = None,
        token_shards: list[dict] | None = None,
        preprocessing: dict | None = None,
        next_tokens: np.ndarray | None = None,
    ):
        """``index`` defaults to an empty index of ``index_config`` (``codebook``, (V, d) unit vectors: the
        codebook PQ's centroids)."""
        self.spec = spec
        self.index_config = index_config or IndexConfig()
        if self.index_config.codebook_codes and spec.key_source != "codebook":
            raise ValueError("a CodebookPQ index stores codebook keys; this database's keys are encoder latents")
        if index is None:
            index = spec.empty_index(self.index_config, codebook)
        self.index = index
        if self.index.d != spec.key_dim:
            raise ValueError(f"index has dimension {self.index.d}, the spec's keys have {spec.key_dim}")
        self.sources: list[str] = list(sources or [])
        ids_carry_tokens = indexes.stores_ids(self.index)
        if next_tokens is None and not ids_carry_tokens:
            next_tokens = np.zeros(0, dtype=token_dtype(spec.codebook_size))
        self.next_tokens: np.ndarray | None = None if ids_carry_tokens else next_tokens  # (M,)
        expected = len(self.sources) * len(self.positions)
        tokens = self.index.ntotal if self.next_tokens is None else len(self.next_tokens)
        if not self.index.ntotal == tokens == expected:
            raise ValueError(
                f"index holds {self.index.ntotal} entries and next_tokens {tokens}, but {len(self.sources)} "
                f"images have {expected}; the database is damaged, build it again"
            )
        self.token_shards: list[dict] = list(token_shards or [])
        self.preprocessing: dict = dict(preprocessing or {})
        indexes.set_search_params(self.index, self.index_config.search_params)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ids the index returned (any shape; -1: no entry) -> (image id, raster position, next token);
        -1, -1, 0 where there is no entry."""
        ids = np.asarray(ids, dtype=np.int64)
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        if self.next_tokens is None:
            bits = token_bits(self.spec.codebook_size)
            numbers, token = safe >> bits, safe & ((1 << bits) - 1)
        else:
            numbers, token = safe, np.zeros(ids.shape, dtype=np.int64)
            token[valid] = self.next_tokens[ids[valid]]
        image, slot = np.divmod(numbers, len(self.positions))
        return np.where(valid, image, -1), np.where(valid, self.positions[slot], -1), np.where(valid, token, 0)

    @property
    def num_images(self) -> int:
        return len(self.sources)

    @property
    def positions(self) -> np.ndarray:
        """Raster positions that get entries (and decoding-time queries)."""
        return self.spec.neighbourhood.eligible(self.spec.grid)

    def add(self, tokens: torch.Tensor, cell_vectors: torch.Tensor, sources: list[str]) -> None:
        """Add images to the database.

        Args:
            tokens: (N, R·C) token grids in raster order.
            cell_vectors: (N, R·C, d) the vectors keys are made of (codebook vectors or encoder latents).
            sources: N names (file paths) recorded for provenance.
        """
        if len(sources) != tokens.shape[0]:
            raise ValueError(
                f"tokens {tuple(tokens.shape)}, cell_vectors {tuple(cell_vectors.shape)} and "
                f"{len(sources)} sources do not describe the same images"
            )
        if not self.index.is_trained:
            raise ValueError(f"the {self.index_config.description} index must be trained before adding entries")
        entries = make_entries(self.spec, tokens, cell_vectors, self.num_images)
        indexes.add_entries(self.index, self.index_config, entries.keys, entries.ids, entries.cells)
        if self.next_tokens is not None:
            self.next_tokens = np.concatenate([self.next_tokens, entries.next_tokens])
        self.sources.extend(sources)

    def train(self, keys: np.ndarray, seed: int = 0) -> None:
        """Train the index's quantizers on (S, D) sample keys (IVF, PQ, OPQ; the codebook PQ's IVF only)."""
        indexes.train(self.index, self.index_config, keys, seed)

    def set_search_params(self, params: str) -> None:
        """Search with other FAISS parameters (``nprobe=64``, ``efSearch=256``); saved with the database."""
        indexes.set_search_params(self.index, params)
        self.index_config = IndexConfig(**{**self.index_config.to_dict(), "search_params": params})

    def check_backend(self, backend: Backend) -> None:
        """Raise :class:`DatabaseMismatchError` unless this database's tokens are ``backend``'s tokens."""
        self.spec.check_serves(DatabaseSpec.for_backend(backend, self.spec.neighbourhood, self.spec.key_source))

    def search(self, queries: torch.Tensor, k: int) -> Neighbours:
        """Find the k nearest entries of each query (B, D); squared-L2 distances."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if queries.ndim != 2 or queries.shape[1] != self.spec.key_dim:
            raise ValueError(f"queries must be (B, {self.spec.key_dim}), got {tuple(queries.shape)}")
        query_array = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        distances, ids = self.index.search(query_array, k)  # (B, K) each
        image, position, token = self.locate(ids)
        valid = ids >= 0
        return Neighbours(
            distances=torch.from_numpy(np.where(valid, distances, np.inf).astype(np.float32)),
            tokens=torch.from_numpy(token),
            image_ids=torch.from_numpy(image),
            positions=torch.from_numpy(position),
            valid=torch.from_numpy(valid),
        )

    def manifest(self) -> dict[str, object]:
        return {
            "format": "arrag-patch-database",
            "version": MANIFEST_VERSION,
            "spec": self.spec.to_dict(),
            "entry_ids": {
                "number": "image * entries_per_image + slot of the position among the eligible ones",
                "id": "number << token_bits | next token" if self.next_tokens is None else "number",
                "token_bits": token_bits(self.spec.codebook_size),
                "next_tokens": None if self.next_tokens is None else NEXT_TOKENS_FILE,
            },
            "index": {**self.index_config.to_dict(), "metric": "squared-l2", "key_dim": self.spec.key_dim},
            "counts": {
                "images": self.num_images,
                "entries": len(self),
                "entries_per_image": len(self.positions),
            },
            "preprocessing": self.preprocessing,
            "token_shards": self.token_shards,
        }

    def save(self, directory: str | Path) -> Path:
        """Write index, sources and manifest; the manifest goes last so a half-written save never loads.

        An index with on-disk inverted lists must already have its ``.ivfdata`` file in ``directory``.
        """
        layout = DatabaseLayout(directory)
        layout.root.mkdir(parents=True, exist_ok=True)
        write_atomically(layout.index, lambda tmp: faiss.write_index(self.index, str(tmp)))
        if self.next_tokens is None:
            layout.next_tokens.unlink(missing_ok=True)
        else:
            write_atomically(layout.next_tokens, lambda tmp: _save_array(tmp, self.next_tokens))
        write_json(layout.sources, self.sources)
        write_json(layout.manifest, self.manifest())
        logger.info("saved %d entries from %d images to %s", len(self), self.num_images, directory)
        return layout.root

    @classmethod
    def load(cls, directory: str | Path, expect: DatabaseSpec | None = None) -> PatchDatabase:
        """Load a saved database; with ``expect``, refuse one whose tokens mean something else. A database
        an add is growing loads as it was before the add (while the add merges, ``BuildRunningError``)."""
        layout = DatabaseLayout(directory)
        manifest = read_manifest(directory)
        spec = DatabaseSpec.from_dict(manifest["spec"])
        if expect is not None:
            spec.check_serves(expect)
        index = indexes.read_index(layout.index)
        sources = json.loads(layout.sources.read_text())
        counts = manifest["counts"]
        if index.ntotal != counts["entries"] or len(sources) != counts["images"]:
            if layout.build_running():  # an add is merging its entries
                raise layout.running()
            raise ValueError(
                f"{layout.root}: index holds {index.ntotal} entries of {len(sources)} images, the manifest "
                f"says {counts['entries']} of {counts['images']}; the database is damaged, build it again"
            )
        return cls(
            spec,
            index,
            sources,
            IndexConfig.from_dict(manifest["index"]),
            token_shards=manifest.get("token_shards", []),
            preprocessing=manifest.get("preprocessing", {}),
            next_tokens=load_next_tokens(layout.root),
        )


def load_next_tokens(directory: Path) -> np.ndarray | None:
    """A saved database's next-token array, memory-mapped (paged in as searches need it); None if it has none."""
    path = DatabaseLayout(directory).next_tokens
    return np.load(path, mmap_mode="r") if path.exists() else None


def index_bytes(directory: str | Path) -> int:
    """Bytes a saved database's search structures take on disk: the index file, its on-disk inverted lists
    and the next-token array."""
    layout = DatabaseLayout(directory)
    paths = [layout.index, *layout.ivfdata_files()]
    if layout.next_tokens.exists():
        paths.append(layout.next_tokens)
    return sum(path.stat().st_size for path in paths)


def read_manifest(directory: str | Path) -> dict:
    """Read and check a database manifest; a folder whose build is running or unfinished says so
    (:class:`arrag.retrieval.layout.BuildRunningError`, or ``FileNotFoundError`` naming ``resume=True`` and
    ``rollback()``)."""
    layout = DatabaseLayout(directory)
    path = layout.manifest
    if not path.is_file() and layout.build_running():
        raise layout.running()
    if not path.is_file() and layout.unfinished:
        raise FileNotFoundError(layout.unfinished_message())
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a patch database (no {path.name}); build one with arrag db build")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is damaged ({error}); build the database again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "arrag-patch-database":
        raise ValueError(f"{path} is not an arrag patch database manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{path} has manifest version {manifest.get('version')}, this arrag reads version {MANIFEST_VERSION}; "
            f"build the database again with this arrag (arrag db build)"
        )
    return manifest


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as file:  # np.save given a name not ending in .npy would add the suffix
        np.save(file, array)
