"""GenEval (Ghosh et al. 2023): images in the official folder layout, for GenEval's own scorer.

Reads GenEval's ``evaluation_metadata.jsonl`` and writes, for the prompt on line i (from 0)::

    OUT/<i:05d>/metadata.jsonl      that prompt's JSON line
    OUT/<i:05d>/samples/0000.png    n images (arrag's metadata in each PNG's text chunk)
    OUT/<i:05d>/grid.png            optional

``metadata.jsonl`` is written last: a prompt folder is finished once it and all n samples exist.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from arrag.backends.base import Backend
from arrag.bench.runner import BenchConfig, Job, RunSummary, read_jsonl, run_jobs, save_atomic, tile
from arrag.faid.blender import FaidAdapter
from arrag.retrieval.database import PatchDatabase


def read_geneval_prompts(path: Path) -> list[Job]:
    """GenEval's metadata file -> one job per line, keyed by its zero-padded line index."""
    jobs = []
    for index, record in enumerate(read_jsonl(path)):
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}: entry {index} has no 'prompt'; is this GenEval's evaluation_metadata.jsonl?")
        jobs.append(Job(index, f"{index:05d}", prompt, record))
    return jobs


@dataclass(frozen=True)
class GenEvalLayout:
    out: Path
    images_per_prompt: int
    grid: bool = False

    def samples(self, job: Job) -> list[Path]:
        return [self.out / job.key / "samples" / f"{j:04d}.png" for j in range(self.images_per_prompt)]

    def finished(self, job: Job) -> Path | None:
        samples = self.samples(job)
        done = (self.out / job.key / "metadata.jsonl").exists() and all(path.exists() for path in samples)
        return samples[0] if done else None

    def write(self, job: Job, images: torch.Tensor, metadata: list[dict], grid: dict) -> None:
        folder = self.out / job.key
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        for image, path, sample_metadata in zip(images, self.samples(job), metadata, strict=True):
            save_atomic(image, path, sample_metadata)
        if self.grid:
            save_atomic(tile(images, math.ceil(math.sqrt(len(images)))), folder / "grid.png", grid)
        partial = folder / ".metadata.jsonl.partial"
        partial.write_text(json.dumps(job.record) + "\n", encoding="utf-8")
        os.replace(partial, folder / "metadata.jsonl")


def run_geneval(
    metadata_file: Path,
    out: Path,
    backend: Backend,
    config: BenchConfig,
    database: PatchDatabase | None = None,
    database_path: Path | str | None = None,
    grid: bool = False,
    faid: FaidAdapter | None = None,
    faid_name: str | None = None,
) -> RunSummary:
    """Generate the unfinished prompts of ``config``'s shard into ``out``, in GenEval's layout.

    ``database_path`` and ``faid_name`` name the database and the adapter in the images' settings.
    """
    jobs = read_geneval_prompts(metadata_file)
    layout = GenEvalLayout(Path(out), config.generation.num_images_per_prompt, grid)
    return run_jobs(jobs, backend, config, layout, database, database_path, faid, faid_name)
