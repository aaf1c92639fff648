"""DPG-Bench (Hu et al. 2024, ELLA): one 2×2 grid of four images per prompt, named by the prompt's id.

Reads ``prompts.jsonl`` (one ``{"id", "prompt"}`` per line) and writes ``OUT/<id>.png``, the four images
tiled without padding, as DPG-Bench's scorer (``compute_dpg_bench.py --resolution H --pic-num 4``) crops
them. The folder holds nothing else: the scorer reads every file in it. Each PNG's text chunk holds the
prompt, the four seeds and arrag's settings (:func:`arrag.metadata.grid_metadata`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from arrag.backends.base import Backend
from arrag.bench.runner import BenchConfig, Job, RunSummary, read_jsonl, run_jobs, save_atomic, tile
from arrag.faid.blender import FaidAdapter
from arrag.retrieval.database import PatchDatabase

IMAGES_PER_PROMPT = 4  # the scorer's 2×2 crops
GRID_COLUMNS = 2


def read_dpg_prompts(path: Path) -> list[Job]:
    """DPG-Bench's prompts -> one job per line, keyed by its id (the scorer's file name)."""
    jobs, seen = [], set()
    for index, record in enumerate(read_jsonl(path)):
        key, prompt = str(record.get("id", "")), record.get("prompt")
        if not key or "/" in key or key.startswith(".") or not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}: entry {index} needs an 'id' usable as a file name and a 'prompt'")
        if key in seen:
            raise ValueError(f"{path}: id {key!r} appears twice")
        seen.add(key)
        jobs.append(Job(index, key, prompt, record))
    return jobs


@dataclass(frozen=True)
class DpgLayout:
    out: Path

    def finished(self, job: Job) -> Path | None:
        path = self.out / f"{job.key}.png"
        return path if path.exists() else None

    def write(self, job: Job, images: torch.Tensor, metadata: list[dict], grid: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        save_atomic(tile(images, GRID_COLUMNS), self.out / f"{job.key}.png", grid)  # (3, 2H, 2W)


def run_dpg(
    prompts_file: Path,
    out: Path,
    backend: Backend,
    config: BenchConfig,
    database: PatchDatabase | None = None,
    database_path: Path | str | None = None,
    faid: FaidAdapter | None = None,
    faid_name: str | None = None,
) -> RunSummary:
    """Generate the unfinished prompts of ``config``'s shard into ``out`` as 2×2 grids.

    ``database_path`` and ``faid_name`` name the database and the adapter in the grids' settings.
    """
    if config.generation.num_images_per_prompt != IMAGES_PER_PROMPT:
        raise ValueError(
            f"DPG-Bench grids hold {IMAGES_PER_PROMPT} images per prompt, "
            f"got num_images_per_prompt={config.generation.num_images_per_prompt}"
        )
    jobs = read_dpg_prompts(prompts_file)
    return run_jobs(jobs, backend, config, DpgLayout(Path(out)), database, database_path, faid, faid_name)
