"""What retrieval costs next to the model's own decoding: seconds per image of none / DAiD / FAiD, in one run.

Part 1, the built-in model with the world database as `arrag demo` ships it: batch 1 and batch 16, the ratios to
the model alone, the recall@k of the index used against exact search on real decoding queries, the memo's hit rate,
and the physical limit: the model's own step against one batched search at the chosen k.
Part 2 (``--janus-entries`` > 0): the Janus-Pro-1B-shaped random model of ``janus_step_overhead.py`` against a
synthetic database, batch 1 with guidance.

    python benchmarks/daid_overhead.py [--k 2048] [--weight 0.05] [--index Flat] [--janus-entries 1000000]

Prints a JSON record and a table; ratios are relative to the model alone, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np
import torch

from arrag.backends import load_backend
from arrag.config import GenerationConfig, RetrievalConfig
from arrag.decoding.loop import PatchRetriever, generate
from arrag.faid.files import shipped_adapter
from arrag.retrieval.database import PatchDatabase
from arrag.retrieval.indexes import IndexConfig
from arrag.retrieval.keys import patch_keys
from arrag.world.database import CACHE_DIR, world_database, world_database_dir
from arrag.world.prompts import sample_prompts


def seconds_per_image(backend, prompts, config, database=None, adapter=None, batch=1, repeats=1) -> float:
    """Best of ``repeats`` of the wall time per image, ``prompts`` decoded ``batch`` at a time."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        for start in range(0, len(prompts), batch):
            generate(backend, prompts[start : start + batch], config, database, faid=adapter)
        times.append((time.perf_counter() - began) / len(prompts))
    return min(times)


def decoding_queries(backend, database: PatchDatabase, prompts: list[str]) -> np.ndarray:
    """(Q, D) the queries the loop makes for images the model draws alone: every eligible position's key."""
    tokens = generate(backend, prompts, GenerationConfig()).tokens  # (B, T)
    spec = database.spec
    keys = patch_keys(backend.code_vectors(tokens).float().cpu(), database.positions, spec.grid, spec.neighbourhood)
    return np.ascontiguousarray(keys.reshape(-1, keys.shape[-1]).numpy())


def recall_at_k(index: faiss.Index, exact: faiss.Index, queries: np.ndarray, k: int) -> float:
    """Mean share of the k returned entries within the exact k-th distance (ties count as the ties they are)."""
    found, _ = index.search(queries, k)
    truth, _ = exact.search(queries, k)
    return float(np.mean(found <= truth[:, -1:] + 1e-4))


def memo_hit_rate(backend, database, prompts, retrieval: RetrievalConfig) -> float:
    retriever = PatchRetriever(backend, database, retrieval.k, len(prompts))
    generate(backend, prompts, GenerationConfig(method="daid", retrieval=retrieval), database, retriever=retriever)
    return retriever.memo.hit_rate


def builtin_part(args: argparse.Namespace) -> dict[str, object]:
    backend = load_backend("builtin")
    flat = world_database(backend, world_database_dir(CACHE_DIR, backend))
    index = IndexConfig(args.index, search_params=args.search_params)
    database = (
        flat
        if index == IndexConfig()
        else world_database(backend, world_database_dir(CACHE_DIR, backend, index=index), flat.num_images, index=index)
    )
    adapter = shipped_adapter(backend)
    retrieval = RetrievalConfig(weight=args.weight, k=args.k)
    methods = {"none": GenerationConfig(), "daid": GenerationConfig(method="daid", retrieval=retrieval)}
    if adapter is not None:
        methods["faid"] = GenerationConfig(method="faid")
    prompts = [p.text for p in sample_prompts(args.images, 11)]
    generate(backend, prompts[:2], methods["daid"], database)  # warm-up: one-off costs, pages of the index
    seconds = {
        batch: {
            name: seconds_per_image(backend, prompts, config, database, adapter, batch, args.repeats)
            for name, config in methods.items()
        }
        for batch in args.batches
    }
    queries = decoding_queries(backend, flat, prompts[:8])
    step = seconds[max(args.batches)]["none"] / backend.grid.size * max(args.batches)  # one step of the batch
    batch_queries = queries[: max(args.batches)]
    began = time.perf_counter()
    for _ in range(20):
        database.index.search(batch_queries, args.k)
    search = (time.perf_counter() - began) / 20
    return {
        "backend": backend.name,
        "database_entries": len(database),
        "index": f"{index.description} {index.search_params}".strip(),
        "k": args.k,
        "weight": args.weight,
        "seconds_per_image": {str(b): v for b, v in seconds.items()},
        "ratios": {str(b): {n: v / seconds[b]["none"] for n, v in s.items()} for b, s in seconds.items()},
        "batch_speedup_model_alone": seconds[min(args.batches)]["none"] / seconds[max(args.batches)]["none"],
        "recall_at_k": recall_at_k(database.index, flat.index, queries, args.k) if database is not flat else 1.0,
        "memo_hit_rate": memo_hit_rate(backend, database, prompts[: max(args.batches)], retrieval),
        "limit": {
            "model_step_seconds": step,
            "batched_search_seconds": search,
            "batch": max(args.batches),
        },
    }


def janus_part(args: argparse.Namespace) -> dict[str, object]:
    from janus_step_overhead import FirstRows, PromptProcessor, janus_pro_1b_shaped, zipf_database
    from transformers import JanusForConditionalGeneration

    torch.manual_seed(0)
    model = JanusForConditionalGeneration(janus_pro_1b_shaped()).eval()
    model.generation_config.generation_kwargs = {"boi_token_id": 100016}
    model.generation_config.bos_token_id, model.generation_config.pad_token_id = 100000, 100015
    backend = FirstRows(model, PromptProcessor(), "janus-pro-1b-shaped-random", args.janus_rows)
    index = IndexConfig(args.janus_index, search_params=args.janus_search_params)
    database = zipf_database(backend, args.janus_entries, index)
    retrieval = RetrievalConfig(weight=args.weight, k=args.k)
    daid = GenerationConfig(method="daid", retrieval=retrieval)
    prompts = ["a photo of a cat"] * 2
    generate(backend, prompts[:1], daid, database)  # warm-up
    base = seconds_per_image(backend, prompts, GenerationConfig(), repeats=args.repeats)
    with_daid = seconds_per_image(backend, prompts, daid, database, repeats=args.repeats)
    return {
        "entries": len(database),
        "index": f"{index.description} {index.search_params}".strip(),
        "rows_decoded": args.janus_rows,
        "seconds_per_image": {"none": base, "daid": with_daid},
        "ratio": with_daid / base,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=2048, help="neighbours DAiD asks for")
    parser.add_argument("--weight", type=float, default=0.05, help="DAiD's λ (the demo's)")
    parser.add_argument("--index", default="Flat", help="index of the world database (Flat: as the demo ships it)")
    parser.add_argument("--search-params", default="")
    parser.add_argument("--images", type=int, default=16, help="images timed per setting")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--janus-entries", type=int, default=0, help="0 skips the Janus-Pro-1B-shaped part")
    parser.add_argument("--janus-rows", type=int, default=4, help="token rows the Janus part decodes")
    parser.add_argument("--janus-index", default="IVF4096,CodebookPQ")
    parser.add_argument("--janus-search-params", default="nprobe=64")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    result = {"threads": args.threads, "builtin": builtin_part(args)}
    if args.janus_entries:
        result["janus_pro_1b_shaped"] = janus_part(args)
    print(json.dumps(result, indent=2))
    builtin = result["builtin"]
    print(f"\nbuilt-in model, {builtin['index']}, k {args.k}, λ {args.weight}: seconds per image (ratio to none)")
    for batch, values in builtin["seconds_per_image"].items():
        cells = "  ".join(f"{name} {v:.3f} ({builtin['ratios'][batch][name]:.2f}×)" for name, v in values.items())
        print(f"  batch {batch:>2}: {cells}")
    print(
        f"  model alone, batch {max(args.batches)} / batch {min(args.batches)}: "
        f"{builtin['batch_speedup_model_alone']:.2f}× the images per second"
    )
    print(f"  recall@{args.k} {builtin['recall_at_k']:.3f}; memo hit rate {builtin['memo_hit_rate']:.1%}")
    limit = builtin["limit"]
    print(
        f"  one model step (batch {limit['batch']}) {limit['model_step_seconds'] * 1e3:.1f} ms; "
        f"one batched search {limit['batched_search_seconds'] * 1e3:.1f} ms"
    )
    if "janus_pro_1b_shaped" in result:
        janus = result["janus_pro_1b_shaped"]
        print(
            f"Janus-Pro-1B shape, {janus['entries']:,} entries, {janus['index']}: DAiD {janus['ratio']:.3f}× the model"
        )


if __name__ == "__main__":
    main()
