"""Time DAiD calibration on the built-in world and print its headline numbers.

The built-in model, the world database ``arrag demo`` builds (Flat, 420k entries; built on first use, ~15 s, not
timed) and the world's held-out scenes with their captions. Target: at most 5 minutes for 400 scenes on 2 CPU cores.

    python benchmarks/calibration_speed.py [--scenes 400] [--threads 2] [--out runs/calibration]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from arrag.backends.builtin import builtin_backend
from arrag.evaluation.calibration import CalibrationConfig, calibrate, world_heldout, write_report
from arrag.world.database import CACHE_DIR, world_database, world_database_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="where to write calibration.json (default: not written)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backend = builtin_backend()
    directory = world_database_dir(CACHE_DIR, backend)
    world_database(backend, directory)  # build it first if needed: not part of the timing
    start = time.perf_counter()
    captions, images = world_heldout(args.scenes)
    report = calibrate(
        backend,
        directory,
        list(zip(captions, images, strict=True)),
        CalibrationConfig(),
        f"{args.scenes} world eval scenes",
    )
    seconds = time.perf_counter() - start
    print(report.render())
    if args.out is not None:
        print(f"wrote {write_report(report, args.out)}")
    guided = report.decoding
    chosen, default = guided.row(guided.chosen), guided.row("shipped default")
    print(
        f"\n{args.scenes} scenes in {seconds:.0f} s (target 300 s): model alone {guided.rows[0].test_nll.mean:.4f} "
        f"nats/token; chosen {chosen.description} {chosen.change.mean:+.2f}%; shipped default "
        f"{default.change.mean:+.2f}%; beyond the best control {guided.beyond_control.mean:+.2f}%"
    )


if __name__ == "__main__":
    main()
