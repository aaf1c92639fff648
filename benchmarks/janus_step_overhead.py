"""Seconds per decoding step of a Janus-Pro-1B-shaped model, without and with DAiD.

The model is transformers' JanusForConditionalGeneration with Janus-Pro-1B's generation path at full size
(24-layer, 2048-wide Llama; 16,384-code VQ; 24×24 tokens) and random weights: no download. The
understanding-only SigLIP tower is shrunk, since image generation never runs it. The database holds
synthetic entries whose token grids follow a Zipf law over the codebook, keyed with the model's codebook.

    python benchmarks/janus_step_overhead.py --entries 1000000 --steps 40 [--device cuda --dtype bfloat16]

The last lines are a table; the overhead ratio is (s/step with DAiD) / (s/step without).
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np
import torch
from transformers import JanusConfig, JanusForConditionalGeneration

from arrag.backends.janus import DTYPES, JanusBackend
from arrag.config import GenerationConfig, RetrievalConfig
from arrag.decoding.loop import generate
from arrag.retrieval.database import DatabaseSpec, PatchDatabase, make_entries
from arrag.retrieval.grid import Grid
from arrag.retrieval.indexes import IndexConfig


def janus_pro_1b_shaped() -> JanusConfig:
    return JanusConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": 102400,
            "hidden_size": 2048,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "intermediate_size": 5632,
            "max_position_embeddings": 16384,
            "pad_token_id": 100015,
            "bos_token_id": 100000,
            "eos_token_id": 100001,
        },
        vision_config={
            "image_size": 384,
            "patch_size": 16,
            "num_image_tokens": 576,
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "projection_dim": 2048,
        },
        vq_config={"num_patches": 24, "projection_dim": 2048, "image_token_embed_dim": 2048},
        image_token_id=100581,
    )


class PromptProcessor:
    """Stands in for JanusProcessor: fixed-length random prompt ids ending in begin-of-image (id 100016)."""

    def __init__(self, length: int = 24):
        self.length = length

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return messages[0]["content"][0]["text"]

    def __call__(self, text, **kwargs):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 90000, (len(text), self.length), generator=g)
        ids[:, 0], ids[:, -1] = 100000, 100016
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def zipf_database(backend: JanusBackend, entries: int, index: IndexConfig, seed: int = 0) -> PatchDatabase:
    """Synthetic token grids with Zipf-distributed tokens; an index that needs training learns on the first 256."""
    codebook = backend.code_vectors(torch.arange(backend.codebook_size)).float().cpu().numpy()
    database = PatchDatabase(DatabaseSpec.for_backend(backend), index_config=index, codebook=codebook)
    per_image = len(database.positions)
    rng = np.random.default_rng(seed)
    ranks = rng.permutation(backend.codebook_size)
    images = -(-entries // per_image)
    for start in range(0, images, 256):
        n = min(256, images - start)
        draws = np.minimum(rng.zipf(1.3, size=(n, backend.grid.size)) - 1, backend.codebook_size - 1)
        tokens = torch.from_numpy(ranks[draws])
        vectors = backend.code_vectors(tokens).float().cpu()
        if not database.index.is_trained:
            database.train(make_entries(database.spec, tokens, vectors, 0).keys, seed)
        database.add(tokens, vectors, [f"synthetic-{start + i}" for i in range(n)])
    return database


class FirstRows(JanusBackend):
    """Decodes the first rows of the grid only and skips pixel decoding: the benchmark times decoding steps."""

    def __init__(self, model, processor, name, rows: int):
        super().__init__(model, processor, name)
        self.grid = Grid(rows, self.grid.cols)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros(tokens.shape[0], 3, 1, 1)


def seconds_per_step(backend, config, database) -> float:
    """Mean wall time of one decoding step (prefill included, amortised), after a warm-up run."""
    generate(backend, ["warm up"], config, database)  # first call pays one-off costs
    start = time.perf_counter()
    generate(backend, ["a photo of a cat"], config, database)
    return (time.perf_counter() - start) / backend.grid.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--rows", type=int, default=4, help="generate only this many token rows (time per step)")
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=0, help="torch and FAISS threads (0: library default)")
    parser.add_argument("--faiss-threads", type=int, default=0, help="FAISS threads, if not --threads")
    parser.add_argument("--faiss-gpu", action="store_true", help="search a copy of the index on GPU 0")
    parser.add_argument("--index", default="Flat", help="Flat, CodebookPQ, IVF<n>,CodebookPQ or a FAISS factory string")
    parser.add_argument("--search-params", default="", help="FAISS search parameters, e.g. nprobe=32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    if args.faiss_threads:  # a small IVF search need not compete with the model for every core
        faiss.omp_set_num_threads(args.faiss_threads)
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(janus_pro_1b_shaped()).to(args.device, DTYPES[args.dtype]).eval()
    model.generation_config.generation_kwargs = {"boi_token_id": 100016}
    model.generation_config.bos_token_id, model.generation_config.pad_token_id = 100000, 100015
    # Time only the first rows: every step costs about the same, and 576 steps of a 1B model on a laptop CPU
    # take minutes. Retrieval starts at row 1.
    backend = FirstRows(model, PromptProcessor(), "janus-pro-1b-shaped-random", args.rows)
    build_start = time.perf_counter()
    database = zipf_database(backend, args.entries, IndexConfig(args.index, search_params=args.search_params))
    if args.faiss_gpu:
        gpu_resources = faiss.StandardGpuResources()  # must outlive the index that uses it
        database.index = faiss.index_cpu_to_gpu(gpu_resources, 0, database.index)
    build_seconds = time.perf_counter() - build_start

    base = GenerationConfig()
    daid = GenerationConfig(method="daid", retrieval=RetrievalConfig(weight=0.3, k=args.k))
    without = seconds_per_step(backend, base, None)
    with_daid = seconds_per_step(backend, daid, database)
    retrieval_share = len(database.positions) / backend.grid.size
    result = {
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "entries": len(database),
        "k": args.k,
        "index": database.index_config.to_dict(),
        "steps_timed": backend.grid.size,
        "share_of_steps_with_retrieval": round(retrieval_share, 3),
        "seconds_per_step_without": round(without, 4),
        "seconds_per_step_with_daid": round(with_daid, 4),
        "overhead_ratio": round(with_daid / without, 4),
        "database_build_seconds": round(build_seconds, 1),
    }
    print(json.dumps(result))
    print("| device | dtype | entries | index | k | s/step base | s/step DAiD | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    index = f"{args.index} {args.search_params}".strip()
    print(
        f"| {args.device} | {args.dtype} | {len(database):,} | {index} | {args.k} | {without:.4f} | {with_daid:.4f} | "
        f"{with_daid / without:.3f} |"
    )


if __name__ == "__main__":
    main()
