"""What an embedded Ray costs a build before and after its work: the fixed seconds the ``ray`` engine adds.

Times, one after another as the ``ray`` engine meets them: ``import ray``; the engine's start (``ray.init``,
``import ray.data``); a first trivial task on every worker; the workers' import of arrag's stages (torch, FAISS);
the first Ray Data pass of trivial tasks like the engine's (``from_items`` + ``map_batches``, one task per item),
which starts Ray Data's own actors, and a second one; the engine's stop (``ray.shutdown``). Run it on an
otherwise idle machine.

    python benchmarks/ray_overhead.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MEASURE = r"""
import json, os, time
from arrag.build.engines import RayEngine  # a build's driver has arrag (and torch) imported before it starts Ray
clock = time.perf_counter()
seconds = {}

def lap(name):
    global clock
    now = time.perf_counter()
    seconds[name] = round(now - clock, 2)
    clock = now

import ray
lap("import ray")
engine = RayEngine().__enter__()
lap("start: ray.init, import ray.data")
workers = int(ray.cluster_resources()["CPU"])

@ray.remote(num_cpus=1)
def touch(_):
    return os.getpid()

@ray.remote(num_cpus=1)
def import_stages(_):
    import arrag.build.stages  # noqa: F401
    return os.getpid()

ray.get([touch.remote(i) for i in range(workers)])
lap("first task per worker")
ray.get([import_stages.remote(i) for i in range(workers)])
lap("workers import arrag.build.stages")

def identity(batch):
    return batch

def data_pass():
    ray.data.from_items([{"i": i} for i in range(workers)], override_num_blocks=workers).map_batches(
        identity, batch_size=1, concurrency=workers, num_cpus=1
    ).take_all()

data_pass()
lap("first Ray Data pass")
data_pass()
lap("second Ray Data pass")
engine.__exit__(None, None, None)
lap("stop: ray.shutdown")
print(json.dumps(seconds))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeats):  # a fresh interpreter each time, as a build command starts one
        result = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, check=True)
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    print(f"\n{os.cpu_count()} CPUs, {args.repeats} runs\n")
    print("| step | " + " | ".join(f"run {i + 1} s" for i in range(len(runs))) + " |")
    print("|---|" + "---|" * len(runs))
    for step in runs[0]:
        print(f"| {step} | " + " | ".join(str(run[step]) for run in runs) + " |")
    totals = [round(sum(run.values()), 2) for run in runs]
    print("| total | " + " | ".join(map(str, totals)) + " |")


if __name__ == "__main__":
    main()
