"""What the benchmark runners share: prompt files, seeds, resuming, and the one decoding loop.

A benchmark is a list of :class:`Job` (one prompt each). :func:`run_jobs` generates the unfinished ones in
batches through :func:`arrag.decoding.loop.generate` and hands each prompt's images to the benchmark's
writer. Image j of the prompt at index i of the prompt file is seeded ``seed + i·n + j`` (n images per
prompt), so an image does not depend on batching, on ``start`` / ``limit`` shards, or on resuming.

Shapes: n images per prompt, H×W pixels.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import torch

from arrag.backends.base import Backend
from arrag.config import GenerationConfig
from arrag.decoding.loop import generate
from arrag.faid.blender import FaidAdapter
from arrag.images import read_metadata, save_image
from arrag.metadata import Settings, grid_metadata, image_metadata, settings_of
from arrag.progress import ImageBar
from arrag.retrieval.database import PatchDatabase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    """How to run a benchmark: the generation request, the shard of prompts, prompts per decoding batch."""

    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(num_images_per_prompt=4))
    start: int = 0  # index of the first prompt of the file to run
    limit: int | None = None  # at most this many prompts from ``start``
    batch_prompts: int = 1  # prompts decoded together (× images per prompt rows)
    max_prompt_bytes: int | None = None  # cut longer prompts (UTF-8) to this; None: not cut (CLI: the model's limit)
    retrieval_from: str | None = None  # where DAiD's setting came from, recorded in the images (Settings)

    def __post_init__(self) -> None:
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")
        if self.batch_prompts < 1:
            raise ValueError(f"batch_prompts must be >= 1, got {self.batch_prompts}")
        if self.max_prompt_bytes is not None and self.max_prompt_bytes < 1:
            raise ValueError(f"max_prompt_bytes must be >= 1 or None, got {self.max_prompt_bytes}")


@dataclass(frozen=True)
class Job:
    index: int  # position in the prompt file: fixes the seeds
    key: str  # where the output goes (GenEval: "00012", DPG-Bench: the prompt id)
    prompt: str
    record: dict  # the prompt file's line, as read


@dataclass(frozen=True)
class RunSummary:
    generated: list[str]  # keys written by this run
    skipped: list[str]  # keys already finished before this run
    seconds: float


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object per non-empty line; a bad line is reported with its number."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def select(jobs: Sequence[Job], config: BenchConfig) -> list[Job]:
    """The shard ``[start, start + limit)`` of the jobs."""
    end = None if config.limit is None else config.start + config.limit
    return list(jobs[config.start : end])


def clip_prompt(prompt: str, max_bytes: int | None) -> str:
    """The longest prefix of ``prompt`` of at most ``max_bytes`` UTF-8 bytes that ends on a whole character."""
    if max_bytes is None:
        return prompt
    return prompt.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def seeds_for(job: Job, generation: GenerationConfig) -> list[int]:
    n = generation.num_images_per_prompt
    return [generation.seed + job.index * n + j for j in range(n)]


def check_resumable(finished: Path, expected: Settings) -> None:
    """Refuse to add images to an output folder whose finished images were made with other settings."""
    found, wanted = _flat(settings_of(read_metadata(finished))), _flat(expected.to_dict())
    differ = sorted(key for key in wanted.keys() | found.keys() if found.get(key) != wanted.get(key))
    if differ:
        changes = ", ".join(f"{key}: {found.get(key)!r} -> {wanted.get(key)!r}" for key in differ)
        raise ValueError(
            f"{finished} was generated with other settings ({changes}); "
            "resume with the same settings, or write to another folder (out=DIR)"
        )


def _flat(settings: dict, prefix: str = "") -> dict[str, object]:
    """Nested settings -> {"config.seed": 7, ...}, so that a difference is named by its own key."""
    flat: dict[str, object] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def save_atomic(image: torch.Tensor, path: Path, metadata: dict) -> None:
    """Write a PNG (metadata in its text chunk) under a hidden temporary name, then rename it into place."""
    partial = path.with_name(f".{path.name}.partial")
    save_image(image, partial, metadata, sidecar=False)
    os.replace(partial, path)


def tile(images: torch.Tensor, columns: int) -> torch.Tensor:
    """(n, 3, H, W) -> (3, rows·H, columns·W), row-major, no padding; missing cells stay black."""
    n, channels, height, width = images.shape
    rows = -(-n // columns)
    cells = torch.zeros(rows * columns, channels, height, width, dtype=images.dtype)
    cells[:n] = images
    grid = cells.view(rows, columns, channels, height, width).permute(2, 0, 3, 1, 4)  # (3, rows, H, columns, W)
    return grid.reshape(channels, rows * height, columns * width)


class Layout(Protocol):
    """Where a benchmark's outputs go."""

    def finished(self, job: Job) -> Path | None:
        """A finished job's image file (it carries the run's settings); None while the job is unfinished."""
        ...

    def write(self, job: Job, images: torch.Tensor, metadata: list[dict], grid: dict) -> None:
        """Store one job's images, (n, 3, H, W) in [0, 1], with each image's metadata and their grid's."""
        ...


def run_jobs(
    jobs: Sequence[Job],
    backend: Backend,
    config: BenchConfig,
    layout: Layout,
    database: PatchDatabase | None = None,
    database_path: Path | str | None = None,
    faid: FaidAdapter | None = None,
    faid_name: str | None = None,
) -> RunSummary:
    """Generate the images of every unfinished job of the shard and hand them to ``layout``.

    ``database_path`` and ``faid_name`` (the adapter's folder, or "shipped") are how the images' settings
    name the database and the adapter.
    """
    began = time.perf_counter()
    generation = config.generation
    database_name = None if database_path is None else str(database_path)
    settings = Settings(
        backend.name, generation, database_name, faid_name, config.max_prompt_bytes, config.retrieval_from
    )
    earlier = next((path for job in jobs if (path := layout.finished(job)) is not None), None)
    if earlier is not None:  # any shard's finished image: the folder holds one run's images only
        check_resumable(earlier, settings)
    pending, skipped = [], []
    for job in select(jobs, config):
        (pending if layout.finished(job) is None else skipped).append(job)
    n = generation.num_images_per_prompt
    done = 0
    try:
        with ImageBar(len(pending) * n, "generating") as bar:
            for first in range(0, len(pending), config.batch_prompts):
                batch = pending[first : first + config.batch_prompts]
                seeds = [seed for job in batch for seed in seeds_for(job, generation)]
                prompts = [clip_prompt(job.prompt, config.max_prompt_bytes) for job in batch]
                step = partial(bar.update, len(seeds) / backend.grid.size)
                output = generate(backend, prompts, generation, database, seeds, faid=faid, on_step=step)
                for i, job in enumerate(batch):
                    rows = range(i * n, (i + 1) * n)
                    metadata = [image_metadata(output, row, settings, database) for row in rows]
                    grid = grid_metadata(output, rows, settings)
                    layout.write(job, output.images[rows.start : rows.stop], metadata, grid)
                    done += 1
                logger.info("%d/%d prompts written (%s)", first + len(batch), len(pending), batch[-1].key)
    except KeyboardInterrupt:  # what Ctrl-C kept: every prompt written is finished, and a rerun resumes
        raise KeyboardInterrupt(
            f"{done} of the {len(pending)} prompts to do are finished ({len(skipped)} were before this run); "
            "the same command resumes the rest"
        ) from None
    return RunSummary([job.key for job in pending], [job.key for job in skipped], round(time.perf_counter() - began, 1))
