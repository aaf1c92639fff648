"""The stages of a database build, each a function over one shard that writes its result atomically.

    read/decode ─▶ tokenize (batched) ─▶ token shard (Parquet)      :func:`tokenize_shard` -> TokenizedShard
    token shard ─▶ keys ─▶ index shard (FAISS file)                    :func:`index_shard` -> IndexedShard

An add does not tokenize images the database holds already (:class:`KnownImages`: by source name, and by
the SHA-256 of the encoded bytes that token shards record); it lists them as duplicates.

A shard's output file appears under its final name only when complete (:func:`write_atomically`), and the
tokenize stage writes its record after its Parquet file, so a build killed at any point knows exactly
which shards are done. Both build engines call these functions; :class:`TokenizeStage` and
:class:`IndexStage` wrap them with what a worker loads once (the tokenizer; the trained empty index), and
take and give the engines' JSON-able dicts.

Shapes: N images, R·C cells per token grid, d code size.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

import faiss
import numpy as np
import torch

from arrag.backends import Backend, BackendRef
from arrag.build.sources import Item, ShardSpec, read_shard
from arrag.retrieval import indexes
from arrag.retrieval.database import DatabaseSpec, make_entries, read_manifest
from arrag.retrieval.indexes import IndexConfig
from arrag.retrieval.keys import KeySource
from arrag.retrieval.layout import DatabaseLayout, write_atomically, write_json

logger = logging.getLogger(__name__)


class _Record:
    """A frozen dataclass of JSON values: what a stage takes or gives, and what its record files hold."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        return cls(**data)


@dataclass(frozen=True)
class TokenizedShard(_Record):
    """What the tokenize stage made of a shard (``DB/build/tokenized/NNNNNN.json``)."""

    shard: int
    file: str  # the token file, relative to the database folder
    images: int  # tokenized
    skipped: list[dict[str, str]]  # {"path", "reason"}: items that could not be read
    seconds: float
    duplicates: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}: already in the database

    def __post_init__(self) -> None:
        if self.shard < 0 or self.images < 0:
            raise ValueError(f"a tokenized shard needs a shard number and an image count >= 0, got {self}")

    @classmethod
    def read(cls, path: Path) -> TokenizedShard:
        return cls.from_dict(json.loads(path.read_text()))


@dataclass(frozen=True)
class IndexTask(_Record):
    """What the index stage is asked: the entries of a token shard whose first image has id ``first_image``."""

    shard: int
    first_image: int

    def __post_init__(self) -> None:
        if self.shard < 0 or self.first_image < 0:
            raise ValueError(f"an index task needs a shard number and a first image >= 0, got {self}")


@dataclass(frozen=True)
class IndexedShard(_Record):
    """What the index stage made of a token shard."""

    shard: int
    entries: int
    seconds: float


# ---------------------------------------------------------------------------------------------------------
# Token shards


def write_token_shard(
    path: Path, names: list[str], tokens: np.ndarray, latents: np.ndarray | None, hashes: list[str]
) -> None:
    """(N, R·C) tokens (and (N, R·C, d) encoder latents for latent keys) with their source names and the
    SHA-256 of their encoded bytes ("" for generated images) -> Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "source": pa.array(names, type=pa.string()),
        "sha256": pa.array(hashes, type=pa.string()),
        "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.astype(np.int32).ravel()), tokens.shape[1]),
    }
    if latents is not None:
        flat = pa.array(latents.astype(np.float32).ravel())
        columns["latents"] = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(latents.shape[1:])))
    write_atomically(path, lambda tmp: pq.write_table(pa.table(columns), tmp))


@dataclass
class TokenShard:
    names: list[str]
    tokens: np.ndarray  # (N, R·C) int64
    latents: np.ndarray | None  # (N, R·C, d) float32 when the database keys are encoder latents
    hashes: list[str] = field(default_factory=list)  # SHA-256 of each image's encoded bytes ("" if none)


def read_token_shard(
    path: Path, cell_dim: int, columns: tuple[str, ...] = ("source", "tokens", "latents")
) -> TokenShard:
    """Read a token shard written by :func:`write_token_shard` (only ``columns`` of it; shards written before
    hashes were recorded have no ``sha256``)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=[c for c in columns if c in pq.read_schema(path).names])
    n = table.num_rows

    def values(name: str) -> np.ndarray:
        return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)

    tokens = values("tokens").astype(np.int64).reshape(n, -1) if "tokens" in table.column_names else None
    latents = values("latents").reshape(n, -1, cell_dim) if "latents" in table.column_names else None
    names = table.column("source").to_pylist() if "source" in table.column_names else []
    hashes = table.column("sha256").to_pylist() if "sha256" in table.column_names else []
    return TokenShard(names, tokens, latents, hashes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class KnownImages:
    """The images a database holds already, by source name and content hash: what an add leaves out."""

    names: frozenset[str] = frozenset()
    hashes: dict[str, str] = field(default_factory=dict)  # SHA-256 -> the source name it was added as

    @classmethod
    def read(cls, layout: DatabaseLayout, images: int) -> KnownImages:
        """The first ``images`` images of the database in ``layout`` (those before an add), from its sources and
        the hashes its token shards record."""
        if not images:
            return cls()
        manifest = read_manifest(layout.root)
        hashes: dict[str, str] = {}
        for shard in manifest.get("token_shards", []):
            if shard["first_image"] < images:
                read = read_token_shard(layout.root / shard["file"], 1, ("source", "sha256"))
                hashes.update((digest, name) for digest, name in zip(read.hashes, read.names, strict=False) if digest)
        return cls(frozenset(json.loads(layout.sources.read_text())[:images]), hashes)

    def duplicate(self, item: Item) -> str | None:
        """Why ``item`` is already in the database, or None if it is not."""
        if item.name in self.names:
            return "already in the database"
        if item.sha256 in self.hashes:
            return f"the same bytes as {self.hashes[item.sha256]}, already in the database"
        return None


# ---------------------------------------------------------------------------------------------------------
# Stage 1: read, decode, tokenize


@dataclass(frozen=True)
class TokenizeJob:
    """What every tokenize task shares: the database folder, the batch size, the key source and how many
    images the database holds already (an add's first image id), which are not added again."""

    directory: str
    batch_size: int = 32
    key_source: KeySource = "codebook"
    known_images: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def layout(self) -> DatabaseLayout:
        return DatabaseLayout(self.directory)


def _batches(
    items: Iterator[Item],
    size: int,
    known: KnownImages,
    skipped: list[dict[str, str]],
    duplicates: list[dict[str, str]],
) -> Iterator[list[Item]]:
    """Decoded items in lists of ``size``; items without an image go to ``skipped``, known ones to ``duplicates``."""
    batch: list[Item] = []
    for item in items:
        if item.image is None:
            logger.warning("skipping %s: %s", item.name, item.error)
            skipped.append({"path": item.name, "reason": item.error})
            continue
        if (reason := known.duplicate(item)) is not None:
            duplicates.append({"path": item.name, "reason": reason})
            continue
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def tokenize_batch(backend: Backend, pixels: torch.Tensor, key_source: KeySource) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) preprocessed images -> (N, R·C) tokens and the (N, R·C, d) vectors their keys are made of:
    the tokens' codebook vectors, or the encoder latents."""
    tokens = backend.encode(pixels)  # (N, R·C)
    vectors = backend.code_vectors(tokens) if key_source == "codebook" else backend.encode_latents(pixels)
    return tokens.cpu(), vectors.float().cpu()


@torch.no_grad()
def tokenize_shard(
    shard: ShardSpec, backend: Backend, job: TokenizeJob, known: KnownImages = KnownImages()
) -> TokenizedShard:
    """Decode, preprocess and tokenize every image of ``shard`` but the ``known`` ones; write its token shard,
    then its record."""
    start = time.perf_counter()
    layout = job.layout
    names: list[str] = []
    hashes: list[str] = []
    tokens: list[np.ndarray] = []
    latents: list[np.ndarray] = []
    skipped: list[dict[str, str]] = []
    duplicates: list[dict[str, str]] = []
    for batch in _batches(read_shard(shard), job.batch_size, known, skipped, duplicates):
        pixels = torch.stack([backend.preprocess(item.image) for item in batch])  # (B, 3, H, W)
        batch_tokens, vectors = tokenize_batch(backend, pixels, job.key_source)  # (B, R·C), (B, R·C, d)
        tokens.append(batch_tokens.numpy())
        if job.key_source == "latents":
            latents.append(vectors.numpy())
        names += [item.name for item in batch]
        hashes += [item.sha256 for item in batch]
    grid = np.concatenate(tokens) if tokens else np.zeros((0, backend.grid.size), dtype=np.int64)
    cells = np.concatenate(latents) if latents else np.zeros((0, backend.grid.size, backend.cell_dim), np.float32)
    latent_cells = cells if job.key_source == "latents" else None
    write_token_shard(layout.token_shard(shard.index), names, grid, latent_cells, hashes)
    seconds = round(time.perf_counter() - start, 3)
    record = TokenizedShard(shard.index, layout.token_file(shard.index), len(names), skipped, seconds, duplicates)
    write_json(layout.tokenized(shard.index), record.to_dict())
    return record


@dataclass(frozen=True)
class TokenizeStage:
    """Stage 1 for an engine: loads the tokenizer once per worker, then tokenizes shard after shard."""

    backend: Backend | BackendRef
    job: TokenizeJob
    name: str = "tokenize"
    gpu: bool = True  # an engine that has accelerators gives each tokenizer worker one

    def setup(self, device: str | None) -> tuple[Backend, KnownImages]:
        backend = self.backend.load(device) if isinstance(self.backend, BackendRef) else self.backend
        return backend, KnownImages.read(self.job.layout, self.job.known_images)

    def __call__(self, context: tuple[Backend, KnownImages], task: dict) -> dict:
        backend, known = context
        return tokenize_shard(ShardSpec.from_dict(task), backend, self.job, known).to_dict()


# ---------------------------------------------------------------------------------------------------------
# Stage 2: keys and index shards


@dataclass(frozen=True)
class IndexJob:
    """What every index task shares: the database folder, spec, index and the trained empty index's file."""

    directory: str
    spec: DatabaseSpec
    index: IndexConfig
    template: str
    codes: np.ndarray | None = None  # (V, d) code vectors of every token (keys.code_table), for codebook keys
    chunk_images: int = 512  # images turned into keys at a time: bounds memory

    @property
    def layout(self) -> DatabaseLayout:
        return DatabaseLayout(self.directory)

    def cell_vectors(self, shard: TokenShard, start: int, stop: int) -> torch.Tensor:
        """(n, R·C, d) the vectors keys of images ``start:stop`` of ``shard`` are made of."""
        if self.spec.key_source == "latents":
            return torch.from_numpy(shard.latents[start:stop])
        return torch.from_numpy(self.codes[shard.tokens[start:stop]])


def shard_entries(job: IndexJob, shard: TokenShard, first_image: int) -> Iterator:
    """The database entries of a token shard whose first image has id ``first_image``, in chunks."""
    for start in range(0, len(shard.tokens), job.chunk_images):
        stop = min(start + job.chunk_images, len(shard.tokens))
        tokens = torch.from_numpy(shard.tokens[start:stop])
        yield make_entries(job.spec, tokens, job.cell_vectors(shard, start, stop), first_image + start)


def index_shard(task: IndexTask, template: faiss.Index, job: IndexJob) -> IndexedShard:
    """Add the entries of the task's token shard to a copy of the trained empty ``template`` and write it as
    an index shard."""
    start = time.perf_counter()
    layout = job.layout
    shard = read_token_shard(layout.token_shard(task.shard), job.spec.cell_dim, ("tokens", "latents"))
    index = indexes.shard_template(template)
    for entries in shard_entries(job, shard, task.first_image):
        indexes.add_entries(index, job.index, entries.keys, entries.ids, entries.cells)
    write_atomically(layout.index_shard(task.shard), lambda tmp: faiss.write_index(index, str(tmp)))
    return IndexedShard(task.shard, int(index.ntotal), round(time.perf_counter() - start, 3))


@dataclass(frozen=True)
class IndexStage:
    """Stage 2 for an engine: reads the trained empty index once per worker, then builds index shards."""

    job: IndexJob
    name: str = "index"
    gpu: bool = False

    def setup(self, device: str | None) -> faiss.Index:
        return indexes.read_index(Path(self.job.template))

    def __call__(self, template: faiss.Index, task: dict) -> dict:
        return index_shard(IndexTask.from_dict(task), template, self.job).to_dict()
