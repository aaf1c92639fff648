"""The one decoding loop: raster-order sampling with optional patch retrieval (DAiD, FAiD).

Shapes: B rows (prompts × images per prompt), T = R·C positions, V codebook size, d cell vector size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol

import torch

from arrag.backends.base import Backend, FaidCapable, MemoryEstimating
from arrag.config import GenerationConfig
from arrag.decoding.merge import retrieve_and_mix
from arrag.decoding.sampling import apply_guidance, filter_probabilities, sample, to_probabilities
from arrag.faid.attach import attached
from arrag.faid.blender import FaidAdapter
from arrag.retrieval.database import PatchDatabase
from arrag.retrieval.keys import patch_keys
from arrag.retrieval.memo import NeighbourMemo
from arrag.retrieval.neighbours import Neighbours

logger = logging.getLogger(__name__)


@dataclass
class RetrievalRecords:
    """Provenance of every sampled token; -1 / NaN where nothing was retrieved.

    The source of a token is the nearest retrieved neighbour whose context was followed by that same token:
    the database patch that "fed" it. ``retrieval_share`` is how much of the token's probability came from
    retrieval, ``λ·p_ret(x) / p(x)``.
    """

    image_ids: torch.Tensor  # (B, T) database image id of the source; -1 if no neighbour had the token
    positions: torch.Tensor  # (B, T) raster position of the source in that image
    distances: torch.Tensor  # (B, T) squared-L2 distance of the source
    retrieval_share: torch.Tensor  # (B, T) in [0, 1]

    @classmethod
    def empty(cls, rows: int, positions: int) -> RetrievalRecords:
        missing = torch.full((rows, positions), -1, dtype=torch.long)
        nan = torch.full((rows, positions), float("nan"))
        return cls(missing, missing.clone(), nan, nan.clone())

    def record(
        self, position: int, found: Neighbours, sampled: torch.Tensor, share: torch.Tensor, retrieved: torch.Tensor
    ) -> None:
        """Fill one position from its neighbours (B, K), the sampled tokens (B,) and the retrieval shares (B,)."""
        same = found.valid & (found.tokens == sampled[:, None])  # (B, K)
        distances = found.distances.masked_fill(~same, float("inf"))
        source = distances.argmin(dim=-1, keepdim=True)  # (B, 1)
        has_source = same.any(dim=-1)  # (B,)
        self.image_ids[:, position] = torch.where(has_source, found.image_ids.gather(-1, source)[:, 0], -1)
        self.positions[:, position] = torch.where(has_source, found.positions.gather(-1, source)[:, 0], -1)
        self.distances[:, position] = torch.where(has_source, distances.gather(-1, source)[:, 0], float("nan"))
        self.retrieval_share[:, position] = torch.where(retrieved, share, float("nan"))


@dataclass
class GenerationOutput:
    prompts: list[str]  # (B,) the prompt of each row
    seeds: list[int]  # (B,) the seed of each row
    tokens: torch.Tensor  # (B, T) raster-order token ids
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    records: RetrievalRecords


class Retriever(Protocol):
    """Where the neighbours come from: told every sampled token, asked before each eligible step."""

    eligible: set[int]  # raster positions that get a search

    def observe(self, position: int, tokens: torch.Tensor) -> None: ...

    def search(self, position: int) -> Neighbours: ...


class PatchRetriever:
    """AR-RAG's retrieval: each row's query is made from its own generated tokens, at every step.

    A query is a function of the neighbour tokens alone (queries always use codebook vectors: generated tokens
    have no encoder latents), so a :class:`NeighbourMemo` answers each distinct context once.
    """

    def __init__(self, backend: Backend, database: PatchDatabase, k: int, rows: int, memo: NeighbourMemo | None = None):
        database.check_backend(backend)
        if not len(database):
            raise ValueError("the patch database is empty; add images to it with arrag db add")
        if k > len(database):
            logger.warning("k = %d is more than the database's %d entries: searching all of them", k, len(database))
        self.backend, self.database, self.k = backend, database, min(k, len(database))
        self.memo = memo if memo is not None else NeighbourMemo()
        spec = database.spec
        self.eligible = set(database.positions.tolist())
        self.cells = torch.as_tensor(spec.neighbourhood.indices(spec.grid))  # (T, n); -1 off the grid
        self.tokens = torch.full((rows, spec.grid.size + 1), -1, dtype=torch.long)  # (B, T+1); the last: off-grid
        self.cell_vectors = torch.zeros(rows, backend.grid.size, backend.cell_dim)  # (B, T, d)

    def observe(self, position: int, tokens: torch.Tensor) -> None:
        self.tokens[:, position] = tokens.cpu()
        self.cell_vectors[:, position] = self.backend.code_vectors(tokens).float().cpu()

    def search(self, position: int) -> Neighbours:
        spec = self.database.spec
        contexts = self.tokens[:, self.cells[position]]  # (B, n): index -1 reads the off-grid column
        queries = patch_keys(self.cell_vectors, [position], spec.grid, spec.neighbourhood)[:, 0]  # (B, D)
        return self.memo.search(contexts, queries, lambda missing: self.database.search(missing, self.k))


def _check_request(
    backend: Backend,
    prompts: list[str],
    config: GenerationConfig,
    database: PatchDatabase | None,
    faid: FaidAdapter | None,
    retriever: Retriever | None,
) -> None:
    """Raise ValueError, with the fix, for a request the loop cannot serve."""
    if not prompts:
        raise ValueError("no prompts given")
    if any(not prompt.strip() for prompt in prompts):
        raise ValueError("a prompt is empty; give every image a description")
    if retriever is not None and config.method != "daid":
        raise ValueError(f"a retriever's neighbours are merged by DAiD; use method 'daid', not {config.method!r}")
    if config.method != "none" and database is None and retriever is None:
        raise ValueError(f"method {config.method!r} needs a patch database (build one with arrag db build)")
    if config.uses_faid and faid is None:
        raise ValueError(f"method {config.method!r} needs a FAiD adapter (train one with arrag train faid)")
    if config.uses_faid and not isinstance(backend, FaidCapable):
        raise ValueError(f"backend {backend.name!r} does not expose its decoder layers to FAiD; use method 'daid'")


def _check_memory(backend: Backend, rows: int, guidance: bool) -> None:
    """Refuse a batch whose session would not fit in the memory free on the backend's device."""
    if not isinstance(backend, MemoryEstimating):
        return
    needed, free = backend.session_bytes(rows, guidance), available_bytes(backend.device)
    if needed > free:
        raise ValueError(
            f"{rows} images at once need about {needed / 2**30:.1f} GiB for the model's cache and "
            f"{free / 2**30:.1f} GiB are free; generate fewer at a time (batch_size)"
        )


def available_bytes(device: torch.device) -> int:
    """Memory free for new allocations on ``device`` (for the CPU: the kernel's MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: the pages the system reports
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@torch.inference_mode()
def generate(
    backend: Backend,
    prompts: str | Sequence[str],
    config: GenerationConfig | None = None,
    database: PatchDatabase | None = None,
    seeds: Sequence[int] | None = None,
    faid: FaidAdapter | None = None,
    retriever: Retriever | None = None,
    on_step: Callable[[], None] | None = None,
) -> GenerationOutput:
    """Generate ``num_images_per_prompt`` images for every prompt, optionally with DAiD and/or FAiD.

    Row i (prompt i // n, image i % n) samples from its own ``torch.Generator`` seeded ``seeds[i]``
    (default ``config.seed + i``), so its tokens do not depend on the rest of the batch. The search for position
    t is issued before the model's step t: both need only the tokens before t, and FAISS and torch release the
    GIL, so with DAiD alone they run at the same time; FAiD's blenders need the neighbours in the step, so they
    wait for them. ``faid`` is attached to the backend's model for this call only. ``retriever`` replaces the
    patch database search with another source of neighbours for DAiD's merge (e.g. the image-level baseline in
    :mod:`arrag.evaluation.image_retrieval`). ``on_step`` is called after every position (for progress bars).
    """
    config = config or GenerationConfig()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    _check_request(backend, prompts, config, database, faid, retriever)
    sampling, retrieval = config.sampling or backend.sampling, config.retrieval if config.uses_daid else None
    _check_memory(backend, len(prompts) * config.num_images_per_prompt, sampling.guidance_scale != 1.0)
    rows = [prompt for prompt in prompts for _ in range(config.num_images_per_prompt)]
    seeds = list(seeds) if seeds is not None else [config.seed + i for i in range(len(rows))]
    if len(seeds) != len(rows):
        raise ValueError(f"{len(rows)} rows need {len(rows)} seeds, got {len(seeds)}")
    if retriever is None and database is not None and config.method != "none":
        k = max(config.retrieval.k if config.uses_daid else 0, faid.config.k if config.uses_faid else 0)
        retriever = PatchRetriever(backend, database, k, len(rows))
    generators = [torch.Generator(device=backend.device).manual_seed(s) for s in seeds]
    tokens = torch.full((len(rows), backend.grid.size), -1, dtype=torch.long)  # (B, T)
    records = RetrievalRecords.empty(*tokens.shape)
    with ExitStack() as stack:
        hooks = stack.enter_context(attached(faid, backend.faid_target())) if config.uses_faid else None
        session = backend.start(rows, sampling.guidance_scale)
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        previous: torch.Tensor | None = None
        for t in range(backend.grid.size):
            eligible = retriever is not None and t in retriever.eligible
            pending: Future[Neighbours] | None = pool.submit(retriever.search, t) if eligible else None
            if hooks is not None:
                hooks.prepare_step(t, pending.result() if pending is not None else None)
            step = session.step(previous)
            logits = apply_guidance(step.cond, step.uncond, sampling.guidance_scale)  # (B, V)
            probs = to_probabilities(logits, sampling.temperature)
            if sampling.filter_order == "before_merge":
                probs = filter_probabilities(probs, sampling.top_k, sampling.top_p)
            found = pending.result() if pending is not None else None
            mixture = retrieve_and_mix(probs, found, retrieval)
            probs = mixture.probs
            if sampling.filter_order == "after_merge":
                probs = filter_probabilities(probs, sampling.top_k, sampling.top_p)
            previous = sample(probs, generators)  # (B,)
            if found is not None:
                records.record(t, found, previous.cpu(), mixture.share(previous).cpu(), mixture.found.cpu())
            tokens[:, t] = previous.cpu()
            if retriever is not None:
                retriever.observe(t, previous)
            if on_step is not None:
                on_step()
    images = backend.decode(tokens).cpu()  # (B, 3, H, W)
    return GenerationOutput(rows, seeds, tokens, images, records)


def generate_in_batches(
    backend: Backend,
    prompts: str | Sequence[str],
    config: GenerationConfig | None = None,
    database: PatchDatabase | None = None,
    faid: FaidAdapter | None = None,
    batch_size: int = 16,
    progress: Callable[[float], None] | None = None,
) -> Iterator[GenerationOutput]:
    """:func:`generate`'s images ``batch_size`` rows at a time, each batch as soon as it is done.

    The images are those of one call (row i is seeded ``config.seed + i`` either way), in memory bounded by the
    batch: a caller can write every batch out before the next begins. ``progress`` gets the images done since
    its last call (fractions of a batch, position by position).
    """
    config = config or GenerationConfig()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    _check_request(backend, prompts, config, database, faid, None)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n, single = config.num_images_per_prompt, replace(config, num_images_per_prompt=1)
    for start in range(0, len(prompts) * n, batch_size):
        batch = [prompts[row // n] for row in range(start, min(start + batch_size, len(prompts) * n))]
        seeds = [config.seed + start + i for i in range(len(batch))]
        step = None if progress is None else partial(progress, len(batch) / backend.grid.size)
        yield generate(backend, batch, single, database, seeds, faid, on_step=step)
