"""Index types for patch keys at scale: build time, bytes per entry, search latency, recall@10.

Synthetic entries shaped like Janus-Pro's: 24×24 token grids over a 16,384-code codebook of 8-d unit vectors,
tokens drawn from a Zipf law (p(rank r) ∝ r^-s), keys from the paper's 4-cell neighbourhood (32-d, 506
entries per image), made by arrag's own make_entries and added through arrag.retrieval.indexes like a real build.
Tokens are independent unless ``--copy p`` makes each repeat its left or upper neighbour with probability p
(the runs of one token in the flat regions of real images). Queries are keys of other images drawn the same way.

Bytes per entry: the written index file, plus the 2-byte next-token array for indexes that number entries as
added (those that store ids carry the next token in them), over the entries.

recall@10 counts the returned entries whose true distance (recomputed from the entry's image and position)
is within the exact 10th-nearest distance: with codebook keys many entries are exact duplicates, so ties
are common and any of the tied entries is a correct answer.

    python benchmarks/index_benchmark.py --entries 1000000 --threads 1 --out docs/index-benchmark-1M.json

The last lines are a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from arrag.retrieval import indexes
from arrag.retrieval.database import DatabaseSpec, make_entries, token_bits, token_dtype
from arrag.retrieval.grid import Grid
from arrag.retrieval.indexes import IndexConfig

SPEC = DatabaseSpec(backend="synthetic", grid=Grid(24, 24), codebook_size=16384, codebook_fingerprint="-", cell_dim=8)
CHUNK = 512  # images per make_entries call


def zipf_grids(images: int, exponent: float, seed: int, copy: float = 0.0) -> np.ndarray:
    """(N, 576) token grids; token ranks follow a Zipf law over a random permutation of the codebook.

    ``copy``: the probability that a token repeats its left or upper neighbour (one of the two at random)
    instead of being drawn, as the flat regions of real images repeat a token. 0 gives independent tokens,
    the same draws as without it.
    """
    if not 0 <= copy <= 1:
        raise ValueError(f"copy is a probability, in [0, 1], not {copy}")
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, SPEC.codebook_size + 1) ** exponent
    ranks = rng.choice(SPEC.codebook_size, size=(images, SPEC.grid.size), p=weights / weights.sum())
    grids = rng.permutation(SPEC.codebook_size)[ranks]
    if copy > 0:
        copied = rng.random(grids.shape) < copy  # (N, R·C)
        from_left = rng.random(grids.shape) < 0.5  # (N, R·C); else from above
        for position in range(1, SPEC.grid.size):  # raster order: a copied token may itself be a copy
            row, col = divmod(position, SPEC.grid.cols)
            source = np.where(from_left[:, position] & (col > 0) | (row == 0), position - 1, position - SPEC.grid.cols)
            rows = copied[:, position].nonzero()[0]
            grids[rows, position] = grids[rows, source[rows]]
    return grids


def entries(grids: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(M, 32) keys, (M,) ids (for indexes that store them), (M, 4) neighbour tokens of every entry."""
    parts = [
        make_entries(SPEC, torch.from_numpy(grids[s : s + CHUNK]), torch.from_numpy(codebook[grids[s : s + CHUNK]]), s)
        for s in range(0, len(grids), CHUNK)
    ]
    return tuple(np.concatenate([getattr(p, name) for p in parts]) for name in ("keys", "ids", "cells"))  # type: ignore[return-value]


def true_distances(
    queries: np.ndarray, ids: np.ndarray, numbered: bool, grids: np.ndarray, codebook: np.ndarray
) -> np.ndarray:
    """(B, K) squared distance from each query to the key of each returned entry, recomputed from its tokens;
    ``numbered``: the index numbers entries as added (its ids are entry numbers, not stored ids)."""
    eligible = SPEC.neighbourhood.eligible(SPEC.grid)
    valid = ids >= 0
    numbers = np.where(valid, ids, 0) >> (0 if numbered else token_bits(SPEC.codebook_size))
    image, slot = np.divmod(numbers, len(eligible))
    table = SPEC.neighbourhood.indices(SPEC.grid)  # (R·C, 4)
    cells = grids[image[..., None], table[eligible[slot]]]  # (B, K, 4)
    keys = codebook[cells].reshape(*ids.shape, -1)  # (B, K, 32)
    return np.where(valid, ((queries[:, None, :] - keys) ** 2).sum(-1), np.inf)


def recall_at_10(found: np.ndarray, exact_10th: np.ndarray) -> float:
    return float((found <= exact_10th[:, None] + 1e-5).sum(1).mean() / 10)


def latency_ms(index: faiss.Index, queries: np.ndarray, batch: int) -> float:
    count = min(len(queries), 200 if batch == 1 else len(queries))
    start = time.perf_counter()
    for s in range(0, count, batch):
        index.search(queries[s : s + batch], 10)
    return (time.perf_counter() - start) / count * 1e3


def index_size(index: faiss.Index) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "index.faiss"
        faiss.write_index(index, str(path))
        return path.stat().st_size


@dataclass
class Workload:
    """Synthetic entries and queries, and the exact answers recall is measured against."""

    codebook: np.ndarray  # (V, d) unit vectors
    grids: np.ndarray  # (N, R·C) token grids of the entries' images
    keys: np.ndarray  # (M, D)
    ids: np.ndarray  # (M,) stored ids, for indexes that keep them
    cells: np.ndarray  # (M, n) neighbour tokens
    queries: np.ndarray  # (Q, D)
    query_cells: np.ndarray  # (Q, n)
    sample: np.ndarray  # (S, D) training keys
    exact_ids: np.ndarray  # (Q, 10) each query's exact 10 nearest entries (their numbers)
    exact_10th: np.ndarray  # (Q,) each query's exact 10th-nearest distance

    def recall(self, index: faiss.Index, found_ids: np.ndarray) -> float:
        """recall@10 of ``index``'s (Q, 10) answers."""
        numbered = not indexes.stores_ids(index)  # its ids are entry numbers
        found = true_distances(self.queries, found_ids, numbered, self.grids, self.codebook)
        return recall_at_10(found, self.exact_10th)


def make_workload(size: int, queries: int, zipf: float, copy: float, train_size: int, seed: int) -> Workload:
    """``size`` entries of Zipf-drawn grids; queries from other grids drawn the same way."""
    per_image = len(SPEC.neighbourhood.eligible(SPEC.grid))
    rng = np.random.default_rng(seed)
    codebook = rng.normal(size=(SPEC.codebook_size, SPEC.cell_dim)).astype(np.float32)
    codebook /= np.linalg.norm(codebook, axis=1, keepdims=True)
    grids = zipf_grids(-(-size // per_image), zipf, seed + 1, copy)
    keys, ids, cells = (array[:size] for array in entries(grids, codebook))
    pool, _, pool_cells = entries(zipf_grids(queries // per_image + 1, zipf, seed + 2, copy), codebook)
    picked = rng.choice(len(pool), queries, replace=False)
    chosen = np.ascontiguousarray(pool[picked])
    sample = keys[np.sort(rng.choice(len(keys), min(train_size, len(keys)), replace=False))]
    exact = faiss.IndexFlatL2(keys.shape[1])
    exact.add(keys)
    distances, nearest = exact.search(chosen, 10)
    return Workload(codebook, grids, keys, ids, cells, chosen, pool_cells[picked], sample, nearest, distances[:, -1])


def build_index(workload: Workload, config: IndexConfig, seed: int) -> tuple[faiss.Index, float, float]:
    """The index trained on the workload's sample and holding its entries, added as a build adds them;
    the seconds spent training and in all."""
    clock = time.perf_counter()
    index = SPEC.empty_index(config, workload.codebook)
    if not index.is_trained:
        indexes.train(index, config, workload.sample, seed)
    train_s = time.perf_counter() - clock
    step = 1 << 18
    for s in range(0, len(workload.keys), step):
        part = slice(s, s + step)
        indexes.add_entries(index, config, workload.keys[part], workload.ids[part], workload.cells[part])
    return index, train_s, time.perf_counter() - clock


def default_nlist(size: int) -> int:
    """About 4·sqrt(entries) IVF lists, a power of two."""
    return 1 << round(np.log2(4 * np.sqrt(size)))


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the token distribution")
    parser.add_argument("--copy", type=float, default=0.0, help="probability that a token repeats a neighbour")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nlist", type=int, help="IVF lists (default: about 4·sqrt(entries), a power of two)")
    parser.add_argument("--train-size", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument(
        "--indexes",
        nargs="+",
        default=["Flat", "CodebookPQ", "IVF{nlist},CodebookPQ", "OPQ8,IVF{nlist},PQ8", "IVF{nlist},PQ16x4fs", "HNSW32"],
    )
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--k-factor", type=int, nargs="+", default=[10], help="shortlist size / k, for Refine(...)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    nlist = args.nlist or default_nlist(args.entries)
    clock = time.perf_counter()
    workload = make_workload(args.entries, args.queries, args.zipf, args.copy, args.train_size, args.seed)
    keys = workload.keys
    print(f"{len(keys):,} entries, {args.queries} queries, nlist {nlist}: made in {time.perf_counter() - clock:.1f} s")
    grids = workload.grids.reshape(-1, SPEC.grid.rows, SPEC.grid.cols)
    print(f"tokens equal to their left neighbour: {np.mean(grids[:, :, 1:] == grids[:, :, :-1]):.1%}")
    shared = workload.cells[workload.exact_ids] == workload.query_cells[:, None]  # (Q, 10, n)
    print(
        f"exact 10 nearest entries: {shared.mean():.1%} of their cells hold the query's token; "
        f"{shared.any(-1).mean():.1%} share at least one cell with the query"
    )

    rows = []
    for template in args.indexes:
        description = template.format(nlist=nlist)
        config = IndexConfig(description, train_size=args.train_size)
        index, train_s, build_s = build_index(workload, config, args.seed)
        numbered = not indexes.stores_ids(index)  # then the next tokens are an array beside the index
        next_token_bytes = len(keys) * token_dtype(SPEC.codebook_size).itemsize if numbered else 0
        size = (index_size(index) + next_token_bytes) / len(keys)
        if config.codebook_refine:
            settings = [f"nprobe={n},k_factor_rf={k}" for n in args.nprobe for k in args.k_factor]
        elif config.is_ivf:
            settings = [f"nprobe={n}" for n in args.nprobe]
        elif description.startswith("HNSW"):
            settings = [f"efSearch={e}" for e in args.ef_search]
        else:
            settings = [""]
        for setting in settings:
            indexes.set_search_params(index, setting)
            recall = workload.recall(index, index.search(workload.queries, 10)[1])
            row = {
                "index": description,
                "search": setting or "-",
                "entries": len(keys),
                "train_s": round(train_s, 1),
                "build_s": round(build_s, 1),
                "bytes_per_entry": round(size, 2),
                "recall_at_10": round(recall, 4),
                **{f"ms_per_query_batch{b}": round(latency_ms(index, workload.queries, b), 4) for b in (1, 16, 256)},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del index
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(
        f"\nthreads={args.threads}, zipf={args.zipf}, copy={args.copy}, {len(keys):,} entries, {args.queries} queries\n"
    )
    print("| index | search | build s (train) | bytes/entry | recall@10 | ms/query b=1 | b=16 | b=256 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['index']} | {r['search']} | {r['build_s']} ({r['train_s']}) | {r['bytes_per_entry']} | "
            f"{r['recall_at_10']:.3f} | {r['ms_per_query_batch1']} | {r['ms_per_query_batch16']} | "
            f"{r['ms_per_query_batch256']} |"
        )


if __name__ == "__main__":
    main()
