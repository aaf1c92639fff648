"""``arrag train faid``: fine-tune a FAiD adapter with teacher forcing, through :func:`arrag.training.train`.

Every image position t gets the k database entries nearest to its causal neighbourhood. The paper makes the
queries from the ground-truth neighbours; ``query_source="sampled"`` makes them from tokens the model itself
samples at every position (one teacher-forced pass, no retrieval), which brings training queries closer to the
generated-token queries of inference. Dropped captions train the unconditional branch of guidance, which gets
no retrieval at inference, so those rows get none either.

Shapes: B batch, T = R·C positions, P eligible positions, K candidates, V codebook size.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from arrag.backends.base import Backend
from arrag.faid.attach import FaidHooks, attached, build_adapter
from arrag.faid.blender import FaidAdapter, FaidConfig
from arrag.faid.files import model_fingerprint
from arrag.retrieval import indexes
from arrag.retrieval.database import PatchDatabase
from arrag.retrieval.keys import patch_keys
from arrag.training import TrainConfig, train

logger = logging.getLogger(__name__)

LOSSES_FILE = "losses.jsonl"
QuerySource = Literal["ground_truth", "sampled"]


@dataclass(frozen=True)
class FaidSchedule:
    """How long and how fast an adapter trains; :meth:`train_config` adds the rest of FAiD's recipe."""

    steps: int
    batch_size: int = 16
    learning_rate: float = 1e-3
    accumulation: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        self.train_config()  # raises ValueError for values the training loop would refuse

    def train_config(self, bf16: bool = False) -> TrainConfig:
        """The paper's 10% linear warm-up, then cosine decay; a checkpoint every 50 steps."""
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            warmup_steps=max(1, self.steps // 10),
            accumulation=self.accumulation,
            checkpoint_every=50,
            seed=self.seed,
            bf16=bf16,
        )


class MemoisedSearch:
    """The training-time search: each distinct query answered once, optionally through an IVF copy of the index.

    A codebook key is a function of its neighbour tokens and training images repeat neighbourhoods, so answers
    are remembered per query. Exact flat search costs ~10 ms per query on one core for the world's 420k entries,
    which would dominate training; ``probes`` builds ``IndexIVFFlat`` over the database's keys (``lists`` k-means
    cells, ``nprobe = probes``, set on the IVF index itself so that it takes effect), 40× faster at a measured
    recall@10 of 0.997 with 16 of 1,024 cells. ``probes=None`` searches the database exactly; a database whose
    index stores ids (IVF, ``IDMap``) is searched as it is, with its own search parameters.
    """

    def __init__(self, database: PatchDatabase, k: int, probes: int | None = 16, lists: int = 1024, seed: int = 0):
        self.database, self.k = database, k
        self.answers: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        self.index: faiss.Index | None = None
        if probes is not None and indexes.stores_ids(database.index):
            logger.info("searching the database's own %s index during training", database.index_config.description)
        elif probes is not None:
            keys = database.index.reconstruct_n(0, len(database))  # (N, D) the stored keys, in entry order
            lists = min(lists, max(1, len(keys) // 39))  # faiss wants >= 39 training points per cell
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(keys.shape[1]), keys.shape[1], lists)
            sample = np.random.default_rng(seed).permutation(len(keys))[: 64 * lists]
            ivf.train(keys[sample])
            ivf.add(keys)  # numbered as added: ids are the database's entry numbers
            ivf.nprobe = min(probes, lists)
            self.index = ivf

    def describe(self) -> str:
        """How queries are answered, for the adapter's description."""
        if self.index is not None:
            return f"IVF{self.index.nlist},Flat nprobe={self.index.nprobe}"
        config = self.database.index_config
        return f"the database's {config.description} {config.search_params}".rstrip()

    def nearest(self, queries: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q, D) queries -> (Q, K) distances, next tokens and valid, from the IVF copy or the database."""
        if self.index is None:
            found = self.database.search(torch.from_numpy(queries), self.k)
            return found.distances, found.tokens, found.valid
        distances, numbers = self.index.search(queries, self.k)  # (Q, K) each
        tokens = self.database.locate(numbers)[2]
        return torch.from_numpy(distances), torch.from_numpy(tokens), torch.from_numpy(numbers >= 0)

    def __call__(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, D) queries -> ((Q, K) next tokens, (Q, K) valid)."""
        unique, inverse = torch.unique(queries, dim=0, return_inverse=True)  # (U, D), (Q,)
        names = [row.numpy().tobytes() for row in unique]
        missing = [i for i, name in enumerate(names) if name not in self.answers]
        if missing:
            _, tokens, valid = self.nearest(np.ascontiguousarray(unique[missing].numpy()))
            for j, i in enumerate(missing):
                self.answers[names[i]] = (tokens[j], valid[j])
        tokens = torch.stack([self.answers[name][0] for name in names])  # (U, K)
        valid = torch.stack([self.answers[name][1] for name in names])
        return tokens[inverse], valid[inverse]


def retrievals(backend: Backend, search: MemoisedSearch, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates of every position, searched with keys made from ``context`` (B, T) tokens.

    Returns:
        ((B, T, K) next tokens of the nearest entries, (B, T, K) valid; False at positions without a key).
    """
    spec = search.database.spec
    positions = search.database.positions  # (P,)
    keys = patch_keys(backend.code_vectors(context).float().cpu(), positions, spec.grid, spec.neighbourhood)
    found, valid = search(keys.reshape(-1, keys.shape[-1]))  # (B·P, K) each
    batch, total = context.shape
    tokens = torch.zeros(batch, total, search.k, dtype=torch.long)
    mask = torch.zeros(batch, total, search.k, dtype=torch.bool)
    tokens[:, positions] = found.view(batch, len(positions), -1)
    mask[:, positions] = valid.view(batch, len(positions), -1)
    return tokens, mask


@torch.no_grad()
def sample_context(
    backend: Backend, hooks: FaidHooks, prompts: Sequence[str], tokens: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """(B, T) tokens the model samples at every position given the true tokens before it, without retrieval."""
    batch, total = tokens.shape
    hooks.begin()
    hooks.prepare(0, torch.zeros(batch, total, 1, dtype=torch.long), torch.zeros(batch, total, 1, dtype=torch.bool))
    probs = torch.softmax(backend.teacher_forced_logits(prompts, tokens).float(), dim=-1)  # (B, T, V)
    return torch.multinomial(probs.reshape(batch * total, -1).cpu(), 1, generator=generator).view(batch, total)


def train_faid(
    backend: Backend,
    captions: Sequence[str],
    tokens: np.ndarray,
    database: PatchDatabase,
    out: Path,
    config: FaidConfig,
    train_config: TrainConfig,
    query_source: QuerySource = "ground_truth",
    caption_dropout: float = 0.1,
    description: dict | None = None,
    probes: int | None = 16,
) -> FaidAdapter:
    """Train a FAiD adapter for ``backend`` on captioned token grids; weights and config land in ``out``.

    Args:
        captions: N captions.
        tokens: (N, T) their images' token grids (disjoint from the database's images).
        database: the patch database retrievals come from (it must serve ``backend``).
        probes: IVF cells searched per query (see :class:`MemoisedSearch`); None searches exactly.
    """
    if query_source not in ("ground_truth", "sampled"):
        raise ValueError(f"query_source must be 'ground_truth' or 'sampled', got {query_source!r}")
    if not 0 <= caption_dropout < 1:
        raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
    if len(captions) != len(tokens) or tokens.shape[1] != backend.grid.size:
        raise ValueError(f"{len(captions)} captions and tokens {tokens.shape} do not describe the same images")
    database.check_backend(backend)
    target = backend.faid_target()
    fingerprint = model_fingerprint(target.model)
    torch.manual_seed(train_config.seed)
    adapter = build_adapter(config, target).to(backend.device)
    search = MemoisedSearch(database, config.k, probes, seed=train_config.seed)
    data = torch.from_numpy(tokens.astype(np.int64))

    with attached(adapter, target) as hooks:
        target.model.train(config.lora_rank > 0)  # LoRA dropout; the base models have no other dropout

        def loss_at(step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
            rng = np.random.default_rng([train_config.seed, step, micro])
            rows = rng.integers(0, len(captions), size=train_config.batch_size)
            texts = [captions[r] for r in rows]
            dropped = torch.from_numpy(rng.random(len(rows)) < caption_dropout)  # (B,)
            image = data[rows]  # (B, T)
            context = image
            if query_source == "sampled":
                generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
                context = sample_context(backend, hooks, texts, image, generator)
            candidates, valid = retrievals(backend, search, context)  # (B, T, K) each
            valid &= ~dropped[:, None, None]  # guidance's unconditional rows never see retrieval
            hooks.begin()
            hooks.prepare(0, candidates, valid)
            logits = backend.teacher_forced_logits(texts, image, dropped)  # (B, T, V)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), image.to(logits.device).reshape(-1))
            with (out / LOSSES_FILE).open("a") as log:  # the loss curve, for smoke checks and the docs
                log.write(json.dumps({"step": step, "micro": micro, "loss": loss.item()}) + "\n")
            return loss, {"loss": loss.item(), "memo": float(len(search.answers))}

        full_description = {
            "model": "FaidAdapter",
            "faid": config.to_dict(),
            "backend": backend.name,
            "base_fingerprint": fingerprint,
            "query_source": query_source,
            "caption_dropout": caption_dropout,
            "database_entries": len(database),
            "training_images": len(captions),
            "training_search": search.describe(),
            "trainable_parameters": adapter.trainable_parameters(),
            **(description or {}),
        }
        train(adapter, loss_at, train_config, out, full_description)
        target.model.eval()
    return adapter


def train_world_faid(
    out: Path,
    schedule: FaidSchedule,
    config: FaidConfig,
    scenes: int = 5000,
    query_source: QuerySource = "ground_truth",
    caption_dropout: float = 0.1,
    database_dir: Path | None = None,
    command: str = "",
    probes: int | None = 16,
) -> FaidAdapter:
    """Train the built-in model's FAiD adapter on train-pool scenes with the world's patch database.

    The database is made of the database pool's glyphs and the training scenes of the train pool's, so no
    training image can retrieve itself. Matmuls run in bfloat16, as in the world's other recipes.
    """
    from arrag.backends import load_backend
    from arrag.world.database import world_database
    from arrag.world.train import DATASET_FILE, WORLD_DESCRIPTION, tokenized_scenes

    backend = load_backend("builtin")
    database_dir = database_dir or out / "world-db"
    database = world_database(backend, database_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset_path = out / DATASET_FILE
    if not dataset_path.exists():  # made once; a resumed run reuses it
        captions, tokens = tokenized_scenes(backend.vq, scenes, schedule.seed + 100)
        np.savez(dataset_path, captions=np.array(captions), tokens=tokens)
    dataset = np.load(dataset_path)
    description = {"command": command, "database": str(database_dir), "scenes": scenes, **WORLD_DESCRIPTION}
    return train_faid(
        backend,
        [str(c) for c in dataset["captions"]],
        dataset["tokens"],
        database,
        out,
        config,
        schedule.train_config(bf16=True),
        query_source,
        caption_dropout,
        description,
        probes,
    )
