"""Wall time of the same database build on the local engine and on Ray Data (embedded ``ray.init``).

The input is a folder of PNG files: by default the built-in world's first N database scenes, written once
to --workdir. Both builds read the same files with the same backend, shard size and index; the Ray time
includes starting and stopping Ray. Run it on an otherwise idle machine.

    python benchmarks/engine_benchmark.py --images 2000 --backend builtin --shard-size 250

The last lines are a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from arrag.backends import BackendRef
from arrag.build import BuildConfig, build_database
from arrag.build.sources import ShardSpec, SourceConfig, read_shard
from arrag.retrieval.indexes import IndexConfig


def write_world_pngs(folder: Path, images: int) -> None:
    """The world's first ``images`` database scenes as PNG files (kept between runs)."""
    if len(list(folder.glob("*.png"))) == images:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for start in range(0, images, 100):
        for i, item in enumerate(read_shard(ShardSpec(0, "world", start=start, count=min(100, images - start)))):
            item.image.save(folder / f"scene{start + i:06d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--input", type=Path, help="an image folder to build from instead of world scenes")
    parser.add_argument("--backend", default="builtin")
    parser.add_argument("--index", default="Flat")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--engines", nargs="+", default=["local", "ray"])
    parser.add_argument("--workdir", type=Path, default=Path("runs/engine-benchmark"))
    args = parser.parse_args()
    folder = args.input or args.workdir / f"world-{args.images}"
    if args.input is None:
        write_world_pngs(folder, args.images)
    rows = []
    for engine in args.engines:
        config = BuildConfig(
            index=IndexConfig(args.index),
            sources=SourceConfig(shard_size=args.shard_size),
            batch_size=args.batch_size,
            engine=engine,
        )
        out = args.workdir / f"db-{engine}"
        start = time.perf_counter()
        report = build_database(BackendRef(args.backend), [folder], out, config, overwrite=True)
        wall = time.perf_counter() - start
        rows.append(
            {
                "engine": engine,
                "wall_s": round(wall, 1),
                **report.stage_seconds,
                "images": report.images_added,
                "entries": report.entries,
                "img_per_s": round(report.images_added / wall, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{os.cpu_count()} CPUs, backend {args.backend}, {args.index}, shards of {args.shard_size}\n")
    print("| engine | wall s | tokenize s | train s | index s | merge s | images/s | × local |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['engine']} | {r['wall_s']} | {r['tokenize']} | {r['train']} | {r['index']} | {r['merge']} | "
            f"{r['img_per_s']} | {r['wall_s'] / rows[0]['wall_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
