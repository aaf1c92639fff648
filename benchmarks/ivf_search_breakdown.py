"""Where an inverted-file search spends its time: the coarse quantizer, the scan of the lists, the re-ranking.

Same synthetic entries and queries as ``index_benchmark.py`` (its options), for IVF-family indexes: ``IVF<n>,...``,
the inverted multi-index ``IMI2x<b>,...`` (2^(2b) lists, visited in order of the sum of two half-key distances), and
either under ``Refine(CodebookPQ)``. Per nprobe, in batches of 256 queries: recall@10, codes visited per query,
and ms per query for the whole search, for the coarse quantizer's search alone and for the list scan alone (FAISS's
``search_preassigned`` with the same shortlist length); what the whole search takes beyond the two is the
re-ranking and the merging of results.

    python benchmarks/ivf_search_breakdown.py --entries 10000000 --threads 2 --nprobe 256 512 2048 4096 \\
        --indexes "IVF{nlist},PQ32x4fs,Refine(CodebookPQ)" "IMI2x10,PQ32x4fs,Refine(CodebookPQ)"

The last lines are a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch
from index_benchmark import add_workload_arguments, build_index, default_nlist, make_workload

from arrag.retrieval import indexes
from arrag.retrieval.indexes import IndexConfig

BATCH = 256


def ms_per_query(queries: np.ndarray, search: Callable[[np.ndarray], object]) -> float:
    start = time.perf_counter()
    for s in range(0, len(queries), BATCH):
        search(queries[s : s + BATCH])
    return (time.perf_counter() - start) / len(queries) * 1e3


def timings(index: faiss.Index, nprobe: int, shortlist: int, queries: np.ndarray) -> dict[str, float]:
    """ms per query of the whole search, of its coarse quantizer and of its list scan (``shortlist`` results)."""
    ivf = faiss.extract_index_ivf(index)
    coarse = iter([ivf.quantizer.search(queries[s : s + BATCH], nprobe) for s in range(0, len(queries), BATCH)])

    def scan(part: np.ndarray) -> object:
        distances, lists = next(coarse)
        return ivf.search_preassigned(part, shortlist, lists, distances)

    return {
        "ms_total": round(ms_per_query(queries, lambda part: index.search(part, 10)), 4),
        "ms_quantizer": round(ms_per_query(queries, lambda part: ivf.quantizer.search(part, nprobe)), 4),
        "ms_scan": round(ms_per_query(queries, scan), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--indexes", nargs="+", default=["IVF{nlist},PQ32x4fs,Refine(CodebookPQ)"])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--k-factor", type=int, default=10, help="shortlist size / k, for Refine(...)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    nlist = args.nlist or default_nlist(args.entries)
    workload = make_workload(args.entries, args.queries, args.zipf, args.copy, args.train_size, args.seed)
    queries = workload.queries
    stats = faiss.cvar.indexIVF_stats

    rows = []
    for template in args.indexes:
        description = template.format(nlist=nlist)
        config = IndexConfig(description, train_size=args.train_size)
        index, _, build_s = build_index(workload, config, args.seed)
        shortlist = 10 * args.k_factor if config.codebook_refine else 10
        for nprobe in args.nprobe:
            indexes.set_search_params(
                index, f"nprobe={nprobe}" + (f",k_factor_rf={args.k_factor}" * config.codebook_refine)
            )
            stats.reset()
            recall = workload.recall(index, index.search(queries, 10)[1])
            codes = stats.ndis / len(queries)
            row = {
                "index": description,
                "nprobe": nprobe,
                "build_s": round(build_s, 1),
                "recall_at_10": round(recall, 4),
                "codes_per_query": round(codes),
                **timings(index, nprobe, shortlist, queries),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del index
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(f"\nthreads={args.threads}, copy={args.copy}, {args.entries:,} entries, batches of {BATCH} queries\n")
    print("| index | nprobe | recall@10 | codes/query | ms/query | quantizer | list scan |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['index']} | {r['nprobe']} | {r['recall_at_10']:.3f} | "
            f"{r['codes_per_query']:,} | {r['ms_total']} | {r['ms_quantizer']} | {r['ms_scan']} |"
        )


if __name__ == "__main__":
    main()
