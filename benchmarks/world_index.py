"""Search time and recall of the built-in world's database under IVF codebook-PQ indexes, against the flat index.

The evaluation (``arrag eval``) searches the world database at every eligible step of every image; this measures
what the IVF setting it uses costs in accuracy. Queries are database keys with small noise, searched in batches
of 120 as the decoding loop does. Recall@k counts a returned entry as correct when its distance is within the
exact k-th distance, so that tied entries (many contexts repeat exactly) count as the ties they are.

    python benchmarks/world_index.py [--k 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from arrag.backends import load_backend
from arrag.retrieval.indexes import IndexConfig
from arrag.world.database import CACHE_DIR, world_database, world_database_dir


def recall_at_k(distances: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the k returned entries within each query's exact k-th distance."""
    return float(np.mean(distances <= exact[:, -1:] + 1e-4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=240)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lists", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--probes", type=int, nargs="+", default=[16, 32, 64])
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    backend = load_backend("builtin")
    flat = world_database(backend, world_database_dir(CACHE_DIR, backend))
    keys = flat.index.reconstruct_n(0, flat.index.ntotal)  # (M, D)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.05, (args.queries, keys.shape[1])).astype(np.float32)
    queries = keys[rng.integers(0, len(keys), args.queries)] + noise  # (Q, D)

    def timed(index: faiss.Index) -> tuple[np.ndarray, float]:
        began = time.perf_counter()
        distances = np.concatenate([index.search(part, args.k)[0] for part in np.split(queries, args.queries // 120)])
        return distances, (time.perf_counter() - began) / args.queries * 1e3

    exact, flat_ms = timed(flat.index)
    print(f"world database: {len(keys):,} entries, k = {args.k}, {args.threads} threads, batches of 120 queries")
    print("| index | search params | ms per query | recall@k |")
    print("|---|---|---|---|")
    print(f"| Flat | | {flat_ms:.2f} | 1.000 |")
    with tempfile.TemporaryDirectory() as scratch:
        for lists in args.lists:
            config = IndexConfig(f"IVF{lists},CodebookPQ")
            database = world_database(backend, Path(scratch) / f"ivf{lists}", flat.num_images, index=config)
            for probes in args.probes:
                database.set_search_params(f"nprobe={probes}")
                distances, ms = timed(database.index)
                print(f"| IVF{lists},CodebookPQ | nprobe={probes} | {ms:.2f} | {recall_at_k(distances, exact):.3f} |")


if __name__ == "__main__":
    main()
