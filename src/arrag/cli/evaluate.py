"""``arrag eval``: does retrieval help? The base model, DAiD, FAiD and image-level retrieval on held-out prompts."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from arrag.cli.options import Commands, command, command_line, shown
from arrag.evaluation.experiment import EvalConfig, evaluate
from arrag.evaluation.report import write_report


def register(commands: Commands) -> None:
    full, quick = EvalConfig(), EvalConfig.quick()

    def defaults(name: str) -> str:
        return f"default: {shown(getattr(full, name))}; --quick: {shown(getattr(quick, name))}"

    parser = command(commands, "eval", "does retrieval help? base model, DAiD, FAiD and image-level retrieval compared")
    parser.add_argument("--quick", action="store_true", help="small prompt sets, one seed: a few minutes")
    parser.add_argument("--out", type=Path, help=f"report folder ({defaults('out')})")
    parser.add_argument("--test-prompts", type=int, help=f"held-out test prompts ({defaults('test_prompts')})")
    parser.add_argument(
        "--num-images", type=int, help=f"images per test prompt and seed ({defaults('images_per_prompt')})"
    )
    parser.add_argument("--seeds", type=int, nargs="+", help=f"test seeds ({defaults('seeds')})")
    parser.add_argument("--faid", type=Path, help="FAiD adapter folder (default: the shipped one, if any)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    given = {
        "out": args.out,
        "test_prompts": args.test_prompts,
        "images_per_prompt": args.num_images,
        "seeds": None if args.seeds is None else tuple(args.seeds),
        "faid": args.faid,
    }
    config = EvalConfig.quick() if args.quick else EvalConfig()
    config = replace(config, **{name: value for name, value in given.items() if value is not None})
    results = evaluate(config)
    report = write_report(results, config.out, command_line(args))
    for entry in results["methods"].values():
        print(f"{entry['name']:42s} overall {entry['scores']['overall']}  near-copies {entry['copy_rate']:.3f}")
    print(f"report: {report}")
    return 0
