"""``arrag eval``: does retrieval help? The base model, DAiD, FAiD and image-level retrieval on held-out prompts."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from arrag.cli.options import Commands, command, command_line, on_interrupt, shown
from arrag.evaluation.experiment import EvalConfig, evaluate
from arrag.outputs import check_out, fresh_run_folder

REPORT = "results.json"  # what an earlier evaluation left in its folder


def register(commands: Commands) -> None:
    full, quick = EvalConfig(), EvalConfig.quick()

    def defaults(name: str) -> str:
        return f"default: {shown(getattr(full, name))}; --quick: {shown(getattr(quick, name))}"

    parser = command(commands, "eval", "does retrieval help? base model, DAiD, FAiD and image-level retrieval compared")
    parser.add_argument("--quick", action="store_true", help="small prompt sets, one seed: a few minutes")
    parser.add_argument(
        "--out", type=Path, help=f"report folder (default: a new run-NNNN in {full.out}; --quick: in {quick.out})"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation's report in --out")
    parser.add_argument("--test-prompts", type=int, help=f"held-out test prompts ({defaults('test_prompts')})")
    parser.add_argument(
        "--num-images", type=int, help=f"images per test prompt and seed ({defaults('images_per_prompt')})"
    )
    parser.add_argument("--seeds", type=int, nargs="+", help=f"test seeds ({defaults('seeds')})")
    parser.add_argument("--faid", type=Path, help="FAiD adapter folder (default: the shipped one, if any)")
    parser.set_defaults(handler=run)


def holds_report(folder: Path) -> bool:
    return (folder / REPORT).exists()


def run(args: argparse.Namespace) -> int:
    if args.out is not None:  # refused before an hour of work
        check_out(args.out, args.overwrite, holds_report)
    given = {
        "test_prompts": args.test_prompts,
        "images_per_prompt": args.num_images,
        "seeds": None if args.seeds is None else tuple(args.seeds),
        "faid": args.faid,
    }
    config = EvalConfig.quick() if args.quick else EvalConfig()
    config = replace(config, **{name: value for name, value in given.items() if value is not None})
    with on_interrupt(lambda: "nothing was written: the report is written when the evaluation is done"):
        results = evaluate(config)
    from arrag.evaluation.report import write_report  # matplotlib: evaluate checked that it is installed

    report = write_report(results, args.out or fresh_run_folder(config.out), command_line(args))
    for entry in results["methods"].values():
        print(f"{entry['name']:42s} overall {entry['scores']['overall']}  near-copies {entry['copy_rate']:.3f}")
    print(f"report: {report}")
    return 0
