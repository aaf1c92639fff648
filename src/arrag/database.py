"""The patch database: FAISS index over patch keys whose ids carry the next token and its provenance.

An entry is made for every eligible position of every database image. Its key is
:func:`arrag.keys.patch_keys` of the position's causal neighbours; its FAISS id packs
``(image id, position, token)`` (see :class:`IdLayout`), so a search returns the token that followed each
neighbour and where it came from without a second lookup array.

Shapes: B queries, K neighbours, D key length.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from arrag import indexes
from arrag.grid import Grid, Neighbourhood
from arrag.indexes import IndexConfig
from arrag.keys import KEY_SOURCES, KeySource, key_dim, patch_keys

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
SOURCES_FILE = "sources.json"
TEMPLATE_FILE = "trained.faiss"  # the empty trained index: what `arrag db add` adds shards to


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

    @property
    def key_dim(self) -> int:
        return key_dim(self.neighbourhood, self.cell_dim)

    @classmethod
    def for_backend(
        cls, backend: Any, neighbourhood: Neighbourhood | None = None, key_source: KeySource = "codebook"
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


@dataclass(frozen=True)
class IdLayout:
    """Bit layout of a FAISS id: ``image << (position_bits + token_bits) | position << token_bits | token``."""

    token_bits: int
    position_bits: int

    @classmethod
    def for_spec(cls, spec: DatabaseSpec) -> IdLayout:
        return cls(
            token_bits=max(1, math.ceil(math.log2(spec.codebook_size))),
            position_bits=max(1, math.ceil(math.log2(spec.grid.size))),
        )

    @property
    def max_images(self) -> int:
        # 63 bits: FAISS ids are signed and -1 means "no result".
        return 1 << (63 - self.token_bits - self.position_bits)

    def pack(self, image: np.ndarray, position: np.ndarray, token: np.ndarray) -> np.ndarray:
        image, position, token = (np.asarray(a, dtype=np.int64) for a in (image, position, token))
        return (image << (self.position_bits + self.token_bits)) | (position << self.token_bits) | token

    def unpack(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids -> (image, position, token); -1 ids (no result) give -1 everywhere."""
        ids = np.asarray(ids, dtype=np.int64)
        missing = ids < 0
        token = ids & ((1 << self.token_bits) - 1)
        position = (ids >> self.token_bits) & ((1 << self.position_bits) - 1)
        image = ids >> (self.position_bits + self.token_bits)
        return tuple(np.where(missing, -1, part) for part in (image, position, token))  # type: ignore[return-value]


@dataclass(frozen=True)
class Entries:
    """Database entries of some images, ready for an index."""

    keys: np.ndarray  # (M, D) float32 patch keys
    ids: np.ndarray  # (M,) int64 packed (image, position, next token)
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
    layout = IdLayout.for_spec(spec)
    if first_image + n > layout.max_images:
        raise ValueError(f"the id layout holds at most {layout.max_images} images")
    positions = spec.neighbourhood.eligible(spec.grid)  # (P,)
    keys = patch_keys(cell_vectors, positions, spec.grid, spec.neighbourhood)  # (N, P, D)
    image_ids = np.arange(first_image, first_image + n)[:, None]  # (N, 1)
    grid_tokens = tokens.cpu().numpy()  # (N, R·C)
    table = spec.neighbourhood.indices(spec.grid)[positions]  # (P, n)
    padded = np.concatenate([grid_tokens, np.full((n, 1), spec.codebook_size)], axis=1)  # (N, R·C + 1)
    cells = padded[:, np.where(table < 0, spec.grid.size, table)]  # (N, P, n)
    ids = layout.pack(image_ids, positions[None, :], grid_tokens[:, positions])  # (N, P)
    return Entries(
        keys=keys.reshape(-1, keys.shape[-1]).cpu().numpy(),
        ids=ids.ravel(),
        cells=cells.reshape(-1, table.shape[1]).astype(np.int64),
    )


@dataclass
class Neighbours:
    """Search results; entries with ``valid`` False are padding (fewer than K entries in the database)."""

    distances: torch.Tensor  # (B, K) float32 squared L2, +inf where not valid
    tokens: torch.Tensor  # (B, K) int64 token that followed the neighbour, 0 where not valid
    image_ids: torch.Tensor  # (B, K) int64 database image id, -1 where not valid
    positions: torch.Tensor  # (B, K) int64 raster position in that image, -1 where not valid
    valid: torch.Tensor  # (B, K) bool


class PatchDatabase:
    """Patch database over a FAISS index (exact ``Flat`` by default; see :mod:`arrag.indexes` for others).

    ``token_shards`` lists the Parquet token shards a sharded build wrote (``file``, ``first_image``,
    ``images``) and ``preprocessing`` how it prepared images for the tokenizer; a database built in memory
    records neither.
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
    ):
        """``index`` defaults to an empty index of ``index_config`` (``codebook``, (V, d) unit vectors: the
        codebook PQ's centroids)."""
        self.spec = spec
        self.layout = IdLayout.for_spec(spec)
        self.index_config = index_config or IndexConfig()
        if self.index_config.codebook_pq and spec.key_source != "codebook":
            raise ValueError("a CodebookPQ index stores codebook keys; this database's keys are encoder latents")
        if index is None:
            index = spec.empty_index(self.index_config, codebook)
        self.index = index
        if self.index.d != spec.key_dim:
            raise ValueError(f"index has dimension {self.index.d}, the spec's keys have {spec.key_dim}")
        self.sources: list[str] = list(sources or [])
        self.token_shards: list[dict] = list(token_shards or [])
        self.preprocessing: dict = dict(preprocessing or {})
        indexes.set_search_params(self.index, self.index_config.search_params)

    def __len__(self) -> int:
        return int(self.index.ntotal)

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
        self.sources.extend(sources)

    def train(self, keys: np.ndarray, seed: int = 0) -> None:
        """Train the index's quantizers on (S, D) sample keys (IVF, PQ, OPQ; the codebook PQ's IVF only)."""
        indexes.train(self.index, self.index_config, keys, seed)

    def set_search_params(self, params: str) -> None:
        """Search with other FAISS parameters (``nprobe=64``, ``efSearch=256``); saved with the database."""
        indexes.set_search_params(self.index, params)
        self.index_config = IndexConfig(**{**self.index_config.to_dict(), "search_params": params})

    def check_backend(self, backend: Any) -> None:
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
        image, position, token = self.layout.unpack(ids)
        valid = ids >= 0
        return Neighbours(
            distances=torch.from_numpy(np.where(valid, distances, np.inf).astype(np.float32)),
            tokens=torch.from_numpy(np.where(valid, token, 0)),
            image_ids=torch.from_numpy(image),
            positions=torch.from_numpy(position),
            valid=torch.from_numpy(valid),
        )

    def manifest(self) -> dict[str, object]:
        return {
            "format": "arrag-patch-database",
            "version": MANIFEST_VERSION,
            "spec": self.spec.to_dict(),
            "id_layout": asdict(self.layout),
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
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (INDEX_FILE + ".tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, directory / INDEX_FILE)
        _write_json(directory / SOURCES_FILE, self.sources)
        _write_json(directory / MANIFEST_FILE, self.manifest())
        logger.info("saved %d entries from %d images to %s", len(self), self.num_images, directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path, expect: DatabaseSpec | None = None) -> PatchDatabase:
        """Load a saved database; with ``expect``, refuse one whose tokens mean something else."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        spec = DatabaseSpec.from_dict(manifest["spec"])
        if expect is not None:
            spec.check_serves(expect)
        if IdLayout(**manifest["id_layout"]) != IdLayout.for_spec(spec):
            raise ValueError(f"{directory}: id layout in the manifest does not match its spec")
        index = indexes.read_index(directory / INDEX_FILE)
        sources = json.loads((directory / SOURCES_FILE).read_text())
        config = IndexConfig.from_dict(manifest["index"])
        database = cls(
            spec,
            index,
            sources,
            config,
            token_shards=manifest.get("token_shards", []),
            preprocessing=manifest.get("preprocessing", {}),
        )
        counts = manifest["counts"]
        if len(database) != counts["entries"] or database.num_images != counts["images"]:
            raise ValueError(
                f"{directory}: index holds {len(database)} entries of {database.num_images} images, the manifest "
                f"says {counts['entries']} of {counts['images']}; the database is damaged, build it again"
            )
        return database


def index_bytes(directory: str | Path) -> int:
    """Bytes the index of a saved database takes on disk: the index file and its on-disk inverted lists."""
    directory = Path(directory)
    return sum(path.stat().st_size for path in [directory / INDEX_FILE, *directory.glob("*.ivfdata")])


def read_manifest(directory: str | Path) -> dict:
    """Read and check a database manifest."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a patch database (no {MANIFEST_FILE}); build one with arrag db build"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "arrag-patch-database":
        raise ValueError(f"{path} is not an arrag patch database manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{path} has manifest version {manifest.get('version')}, this arrag reads version {MANIFEST_VERSION}"
        )
    return manifest


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
