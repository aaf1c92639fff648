"""The one decoding loop: raster-order sampling with optional patch retrieval (DAiD).

Shapes: B rows (prompts × images per prompt), T = R·C positions, V codebook size, d cell vector size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from arrag.backends.base import Backend
from arrag.config import GenerationConfig, RetrievalConfig
from arrag.database import Neighbours, PatchDatabase
from arrag.decoding.merge import mix, retrieval_distribution
from arrag.decoding.sampling import apply_guidance, filter_probabilities, sample, to_probabilities
from arrag.keys import patch_keys

logger = logging.getLogger(__name__)


@dataclass
class RetrievalRecords:
    """Per row and position: where the nearest retrieved neighbour came from (-1 / NaN: no retrieval)."""

    image_ids: torch.Tensor  # (B, T) database image id of the nearest neighbour
    positions: torch.Tensor  # (B, T) its raster position in that image
    distances: torch.Tensor  # (B, T) its squared-L2 distance
    retrieval_share: torch.Tensor  # (B, T) λ·p_ret(x) / p(x): how much of the sampled token x came from retrieval

    @classmethod
    def empty(cls, rows: int, positions: int) -> RetrievalRecords:
        missing = torch.full((rows, positions), -1, dtype=torch.long)
        nan = torch.full((rows, positions), float("nan"))
        return cls(missing, missing.clone(), nan, nan.clone())


@dataclass
class GenerationOutput:
    prompts: list[str]  # (B,) the prompt of each row
    seeds: list[int]  # (B,) the seed of each row
    tokens: torch.Tensor  # (B, T) raster-order token ids
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    records: RetrievalRecords


class PatchRetriever:
    """Makes each row's query from its own generated tokens and searches the database."""

    def __init__(self, backend: Backend, database: PatchDatabase, config: RetrievalConfig, rows: int):
        database.check_backend(backend)
        self.backend, self.database, self.config = backend, database, config
        self.eligible = set(database.positions.tolist())
        # Queries always use codebook vectors: generated tokens have no encoder latents.
        self.cell_vectors = torch.zeros(rows, backend.grid.size, backend.cell_dim)  # (B, T, d)

    def observe(self, position: int, tokens: torch.Tensor) -> None:
        self.cell_vectors[:, position] = self.backend.code_vectors(tokens).float().cpu()

    def search(self, position: int) -> Neighbours:
        spec = self.database.spec
        queries = patch_keys(self.cell_vectors, [position], spec.grid, spec.neighbourhood)[:, 0]  # (B, D)
        return self.database.search(queries, self.config.k)


def _merge(
    probs: torch.Tensor, found: Neighbours, config: RetrievalConfig, records: RetrievalRecords, position: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DAiD on one step -> (merged probabilities, retrieval probabilities); fills the provenance records."""
    p_retrieved, has_any = retrieval_distribution(
        found.distances, found.tokens, found.valid, probs.shape[-1], config.temperature, config.duplicates
    )
    p_retrieved = p_retrieved.to(probs.device)
    merged = mix(probs, p_retrieved, has_any.to(probs.device), config.weight)  # (B, V)
    nearest = found.distances.argmin(dim=-1, keepdim=True)  # (B, 1)
    records.image_ids[:, position] = found.image_ids.gather(-1, nearest)[:, 0]
    records.positions[:, position] = found.positions.gather(-1, nearest)[:, 0]
    records.distances[:, position] = torch.where(has_any, found.distances.gather(-1, nearest)[:, 0], float("nan"))
    return merged, p_retrieved


@torch.inference_mode()
def generate(
    backend: Backend,
    prompts: Sequence[str],
    config: GenerationConfig,
    database: PatchDatabase | None = None,
    seeds: Sequence[int] | None = None,
) -> GenerationOutput:
    """Generate ``num_images_per_prompt`` images for every prompt, optionally with DAiD.

    Row i (prompt i // n, image i % n) samples from its own ``torch.Generator`` seeded ``seeds[i]``
    (default ``config.seed + i``), so its tokens do not depend on the rest of the batch. With DAiD, the
    search for position t is issued before the model's step t: both need only the tokens before t,
    and FAISS and torch release the GIL, so they run at the same time.
    """
    for prompt in prompts:
        if not prompt.strip():
            raise ValueError("a prompt is empty; give every image a description")
    if config.method == "daid" and database is None:
        raise ValueError("method 'daid' needs a patch database (build one with arrag db build)")
    rows = [prompt for prompt in prompts for _ in range(config.num_images_per_prompt)]
    seeds = list(seeds) if seeds is not None else [config.seed + i for i in range(len(rows))]
    if len(seeds) != len(rows):
        raise ValueError(f"{len(rows)} rows need {len(rows)} seeds, got {len(seeds)}")
    generators = [torch.Generator(device=backend.device).manual_seed(s) for s in seeds]
    sampling, total = config.sampling, backend.grid.size
    retriever = (
        PatchRetriever(backend, database, config.retrieval, len(rows))
        if config.method == "daid" and database is not None
        else None
    )
    records = RetrievalRecords.empty(len(rows), total)
    tokens = torch.full((len(rows), total), -1, dtype=torch.long)  # (B, T)
    session = backend.start(rows, sampling.guidance_scale)
    previous: torch.Tensor | None = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        for t in range(total):
            pending: Future[Neighbours] | None = None
            if retriever is not None and t in retriever.eligible:
                pending = pool.submit(retriever.search, t)
            step = session.step(previous)
            logits = apply_guidance(step.cond, step.uncond, sampling.guidance_scale)  # (B, V)
            probs = to_probabilities(logits, sampling.temperature)
            if sampling.filter_order == "before_merge":
                probs = filter_probabilities(probs, sampling.top_k, sampling.top_p)
            mixed, p_retrieved = probs, None
            if pending is not None:
                mixed, p_retrieved = _merge(probs, pending.result(), config.retrieval, records, t)
            probs = mixed
            if sampling.filter_order == "after_merge":
                probs = filter_probabilities(probs, sampling.top_k, sampling.top_p)
            previous = sample(probs, generators)  # (B,)
            if p_retrieved is not None:
                chosen = previous[:, None]
                share = config.retrieval.weight * p_retrieved.gather(-1, chosen) / mixed.gather(-1, chosen)
                records.retrieval_share[:, t] = share[:, 0].cpu()
            tokens[:, t] = previous.cpu()
            if retriever is not None:
                retriever.observe(t, previous)
    images = backend.decode(tokens).cpu()  # (B, 3, H, W)
    return GenerationOutput(rows, seeds, tokens, images, records)
