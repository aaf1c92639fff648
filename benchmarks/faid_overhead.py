"""Seconds per image of the built-in model alone, with DAiD and with FAiD (the paper: FAiD costs about +36%).

FAiD uses the shipped adapter when the backend is ``builtin`` and one is shipped, otherwise a fresh adapter
(its cost does not depend on its weights). The database is the world's (built once and cached) for
``builtin``, and a small one of random token grids for ``tiny``.

    python benchmarks/faid_overhead.py --backend builtin --prompts 8 --repeats 2
    python benchmarks/faid_overhead.py --backend tiny --prompts 2 --repeats 1     # seconds, for a smoke check

The last lines are a table; ratios are relative to the model alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from arrag.backends import load_backend
from arrag.config import GenerationConfig, RetrievalConfig
from arrag.decoding.loop import generate
from arrag.faid.attach import build_adapter
from arrag.faid.blender import FaidConfig
from arrag.faid.files import shipped_adapter
from arrag.retrieval.database import DatabaseSpec, PatchDatabase
from arrag.world.prompts import sample_prompts


def random_database(backend, images: int, seed: int = 0) -> PatchDatabase:
    tokens = torch.randint(
        0, backend.codebook_size, (images, backend.grid.size), generator=torch.Generator().manual_seed(seed)
    )
    database = PatchDatabase(DatabaseSpec.for_backend(backend))
    database.add(tokens, backend.code_vectors(tokens), [f"random-{i}" for i in range(images)])
    return database


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="builtin")
    parser.add_argument("--prompts", type=int, default=8, help="images per timed batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--daid-k", type=int, default=2048)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "arrag")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backend = load_backend(args.backend)
    if args.backend == "builtin":
        from arrag.world.database import world_database

        database = world_database(
            backend, args.cache / f"world-db-{backend.codebook_fingerprint.removeprefix('sha256:')}"
        )
    else:
        database = random_database(backend, 200)
    adapter = shipped_adapter(backend)
    adapter_source = "shipped" if adapter is not None else "fresh (untrained)"
    if adapter is None:
        adapter = build_adapter(FaidConfig(), backend.faid_target())
    prompts = [p.text for p in sample_prompts(args.prompts, 11)]
    retrieval = RetrievalConfig(k=args.daid_k)
    methods = {
        "none": GenerationConfig(),
        "daid": GenerationConfig(method="daid", retrieval=retrieval),
        "faid": GenerationConfig(method="faid", retrieval=retrieval),
    }
    generate(backend, prompts[:1], methods["faid"], database, faid=adapter)  # warm-up
    seconds = {}
    for method, config in methods.items():
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            generate(backend, prompts, config, database, faid=adapter if method == "faid" else None)
            times.append((time.perf_counter() - began) / len(prompts))
        seconds[method] = min(times)
    result = {
        "backend": backend.name,
        "database_entries": len(database),
        "adapter": adapter_source,
        "faid_k": adapter.config.k,
        "daid_k": args.daid_k,
        "images_per_batch": len(prompts),
        "threads": args.threads,
        "seconds_per_image": seconds,
    }
    print(json.dumps(result, indent=2))
    print(f"{'method':8s} {'s/image':>9s} {'ratio':>7s}")
    for method, value in seconds.items():
        print(f"{method:8s} {value:9.3f} {value / seconds['none']:7.3f}")


if __name__ == "__main__":
    main()
