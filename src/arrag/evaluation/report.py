"""Writing an evaluation out: results.json, report.md, the λ sweep plot and a sample sheet."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot state, no display needed

from arrag.evaluation.statistics import Score
from arrag.images import labelled_grid
from arrag.world.prompts import CATEGORIES

SAMPLE_ROWS = 12


def _plain(value: object) -> object:
    """JSON-ready copy: dataclasses to dicts, paths to strings, arrays dropped by the caller."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def plot_sweep(sweep: dict[str, dict[str, float]], path: Path) -> None:
    """Validation overall score against λ, one line per retrieval kind."""
    figure = Figure(figsize=(5, 3.5), dpi=120)
    axis = figure.subplots()
    for name, points in sweep.items():
        weights = sorted(points, key=float)
        axis.plot([float(w) for w in weights], [points[w] for w in weights], marker="o", label=name)
    axis.set_xlabel("retrieval weight λ")
    axis.set_ylabel("overall score (validation)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)


def _score_table(methods: dict[str, dict]) -> list[str]:
    categories = [c for c in CATEGORIES if c in next(iter(methods.values()))["scores"]]
    lines = [
        "| method | " + " | ".join(categories) + " | overall [95% CI] | overall per seed |",
        "|---" * (len(categories) + 3) + "|",
    ]
    for entry in methods.values():
        scores: dict[str, Score] = entry["scores"]
        cells = [f"{scores[c].mean:.3f}" for c in categories]
        seeds = ", ".join(f"{s:.3f}" for s in entry["overall_per_seed"])
        lines.append(f"| {entry['name']} | " + " | ".join(cells) + f" | **{scores['overall']}** | {seeds} |")
    return lines


def _other_tables(results: dict) -> list[str]:
    methods = results["methods"]
    lines = ["| method | near-copy rate | median relative distance to the nearest database image |"]
    quality_names = list(next(iter(methods.values())).get("quality", {}))
    lines[0] += "".join(f" {name} |" for name in quality_names)
    lines.append("|---" * (3 + len(quality_names)) + "|")
    for entry in methods.values():
        quality = entry.get("quality", {})
        row = f"| {entry['name']} | {entry['copy_rate']:.3f} | {entry['median_nearest_database_distance']:.4f} |"
        lines.append(row + "".join(f" {quality[name]:.4g} |" for name in quality_names))
    threshold = results["copy_threshold"]
    lines += [
        "",
        f"Near-copy threshold: relative squared pixel difference ‖x − y‖² / (‖x‖² + ‖y‖²) ≤ "
        f"{threshold['distance']:.4f} to the nearest database "
        f"image, the {threshold['false_positive_rate']:.0%} quantile of {threshold['calibration_images']} real "
        f"held-out scenes (reconstructed by the tokenizer, as generated images are); those real scenes are "
        f"flagged at {results['real_scene_copy_rate']:.3f}.",
    ]
    return lines


def write_report(results: dict, out: Path, command: str) -> Path:
    """Write every artefact into ``out``; returns the Markdown report's path."""
    out.mkdir(parents=True, exist_ok=True)
    plot_sweep(results["validation"]["sweep"], out / "sweep.png")
    rows = []
    for i, text in enumerate(results["test_prompts"][:SAMPLE_ROWS]):
        cells = [(results["real_samples"][i], "real scene")]
        cells += [(samples[i], key) for key, samples in results["samples"].items()]
        rows.append((text, cells))
    labelled_grid(rows, scale=2).save(out / "samples.png")
    plain = {k: v for k, v in results.items() if k not in ("samples", "real_samples")}
    (out / "results.json").write_text(json.dumps(_plain({**plain, "command": command}), indent=2))
    config = results["config"]
    lines = [
        "# Does retrieval help the built-in model?",
        "",
        f"Command: `{command}` — {results['seconds']['total'] / 60:.1f} min in all "
        f"({results['seconds']['validation'] / 60:.1f} min choosing settings on validation prompts).",
        "",
        f"Test set: {config['test_prompts']} held-out prompts × {config['images_per_prompt']} images × "
        f"{len(config['seeds'])} seed(s), judged by the world's checker with GenEval's rules. Intervals: 95% "
        "stratified bootstrap over prompts.",
        "",
        f"Sampling (the built-in model's own, for every method): `{json.dumps(results.get('sampling'))}`.",
        "",
        "## Compositional score",
        "",
        *_score_table(results["methods"]),
        "",
        "## Copying and image quality",
        "",
        *_other_tables(results),
        "",
        "## Settings chosen on validation prompts",
        "",
        *[f"- {entry['name']}: `{json.dumps(_plain(entry['settings']))}`" for entry in results["methods"].values()],
        *[
            f"- On validation, the best {name} setting {'beat' if won else 'did NOT beat'} the base model."
            for name, won in results["validation"]["retrieval_beat_base"].items()
        ],
        "",
        "![score against λ](sweep.png)",
        "",
        "## Samples (first test prompts, seed 0)",
        "",
        "![samples](samples.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
