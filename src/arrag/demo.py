"""``arrag demo``: the whole idea on a laptop CPU in about a minute.

The built-in model draws a handful of the built-in world's prompts with the same seeds, once alone, once with
DAiD over a patch database of real handwriting (built on first use, then cached) and, where the install ships
a trained FAiD adapter, once with FAiD. The world's
checker judges every image; a side-by-side grid and a JSON summary are written into a fresh run folder (or a
given one, which must not hold an earlier demo's unless ``overwrite``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

from arrag.backends import load_backend
from arrag.config import GenerationConfig, RetrievalConfig
from arrag.decoding.loop import generate
from arrag.faid.files import shipped_adapter
from arrag.images import labelled_grid
from arrag.outputs import check_out, fresh_run_folder
from arrag.progress import ImageBar
from arrag.world.database import CACHE_DIR, world_database, world_database_dir
from arrag.world.prompts import sample_prompts
from arrag.world.report import load_checker
from arrag.world.scenes import to_uint8

DEMO_PROMPT_SEED = 2026
SCALE = 3  # 64 px scenes are shown at 192 px
RUNS = Path("runs/demo")  # where each demo gets a fresh run folder
SUMMARY = "summary.json"


@dataclass(frozen=True)
class DemoConfig:
    out: Path | None = None  # None: a fresh run-NNNN in RUNS
    overwrite: bool = False  # replace an earlier demo's grid and summary in ``out``
    cache: Path = CACHE_DIR
    prompts: int = 6  # one per GenEval category
    images_per_prompt: int = 2
    seed: int = 0
    # The DAiD setting `arrag eval` chose on validation prompts (docs/results.md).
    retrieval: RetrievalConfig = field(
        default_factory=lambda: RetrievalConfig(weight=0.05, temperature=1.0, k=2048, duplicates="nearest")
    )

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.images_per_prompt < 1:
            raise ValueError("the demo needs at least one prompt and one image per prompt")


def holds_demo(folder: Path) -> bool:
    return (folder / SUMMARY).exists()


def run_demo(config: DemoConfig) -> dict[str, object]:
    """Generate, judge, and write ``grid.png`` and ``summary.json`` into ``config.out`` (summary's ``out``)."""
    if config.out is not None:
        check_out(config.out, config.overwrite, holds_demo)
    start = time.perf_counter()
    backend = load_backend("builtin")
    checker = load_checker()
    database_dir = world_database_dir(config.cache, backend)
    database = world_database(backend, database_dir)
    built = time.perf_counter()
    prompts = sample_prompts(config.prompts, DEMO_PROMPT_SEED)
    texts = [p.text for p in prompts]
    n = config.images_per_prompt
    base = GenerationConfig(num_images_per_prompt=n, seed=config.seed)
    methods = {  # name: (request, database, FAiD adapter)
        "base": (base, None, None),
        "daid": (replace(base, method="daid", retrieval=config.retrieval), database, None),
    }
    adapter = shipped_adapter(backend)
    if adapter is not None:  # FAiD joins when this install ships a trained adapter
        methods["faid"] = (replace(base, method="faid"), database, adapter)
    with ImageBar(len(methods) * len(texts) * n, "demo") as bar:
        step = partial(bar.update, len(texts) * n / backend.grid.size)
        runs = {
            method: generate(backend, texts, generation, retrieved, faid=faid, on_step=step)
            for method, (generation, retrieved, faid) in methods.items()
        }
    rows, summary_images = [], []
    for row in range(len(texts) * n):
        prompt = prompts[row // n]
        cells = []
        for method, output in runs.items():
            image = to_uint8(output.images[row : row + 1])[0]
            verdict = checker.judge(prompt, image)
            summary_images.append(
                {
                    "prompt": prompt.text,
                    "category": prompt.category,
                    "seed": output.seeds[row],
                    "method": method,
                    "correct": verdict,
                    "detections": [asdict(d) for d in checker.detect(image)],
                }
            )
            cells.append((image, f"{method}: {'correct' if verdict else 'wrong'}"))
        rows.append((prompt.text, cells))
    out = config.out or fresh_run_folder(RUNS)
    out.mkdir(parents=True, exist_ok=True)
    labelled_grid(rows, SCALE).save(out / "grid.png")
    scores = {
        method: sum(im["correct"] for im in summary_images if im["method"] == method) / len(rows) for method in runs
    }
    summary = {
        "out": str(out),
        "backend": backend.name,
        "database": str(database_dir),
        "database_entries": len(database),
        "retrieval": asdict(config.retrieval),
        "fraction_correct": scores,
        "images": summary_images,
        "seconds": {"database": round(built - start, 1), "total": round(time.perf_counter() - start, 1)},
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary
