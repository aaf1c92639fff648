"""What calibration found, as data (``calibration.json``) and as a plain-text summary."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from arrag.evaluation.statistics import Score

CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class Row:
    """One setting scored on the test images (NLL in nats per token, change in % of the model alone's)."""

    name: str
    description: str
    setting: dict | None  # None: the model alone
    validation_nll: float  # on the validation images that chose it
    cross_validated_nll: float | None  # out of fold, for the kinds of rule calibration chooses among
    test_nll: Score
    change: Score


@dataclass(frozen=True)
class Split:
    """The chosen setting on the test positions of one tercile of a feature (edges fixed on validation)."""

    feature: str
    low: float
    high: float
    share: float  # of the test positions with retrieval
    model_nll: Score
    chosen_nll: Score
    change: Score


@dataclass(frozen=True)
class DistributionReport:
    """Calibration of DAiD against one of the model's distributions (``conditional`` or ``guided``)."""

    name: str
    guidance_scale: float
    rows: tuple[Row, ...]  # the model alone first
    chosen: str  # the name of the chosen row
    best_control: str  # the name of the best control's row
    beyond_control: Score  # chosen minus best control, test NLL in % of the model alone's
    informative: bool
    verdict: str
    split_setting: str  # the row the splits and p_ret's top-1 are of: the chosen one, or the best fixed mixture
    splits: tuple[Split, ...]
    top1: dict[str, float]  # accuracy on test positions with retrieval (and the model's on all tokens)
    missing: dict[str, float]  # k -> share of test positions whose true token no neighbour of the first k has
    validation_grid: list  # [rule][τ][k][λ] validation NLL per token of every fixed setting (λ > 0)

    def row(self, name: str) -> Row:
        return next(row for row in self.rows if row.name == name)


@dataclass(frozen=True)
class CalibrationReport:
    backend: str
    database: dict
    heldout: dict
    sampling: dict
    grid: dict
    distances: dict
    distributions: tuple[DistributionReport, ...]
    timings: dict

    @property
    def decoding(self) -> DistributionReport:
        """The report of the distribution DAiD mixes into when generating (the guided one, if guidance is on)."""
        return self.distributions[-1]

    def to_dict(self) -> dict:
        chosen = self.decoding.row(self.decoding.chosen)
        data = {
            "format": "arrag-calibration",
            "version": 1,
            "backend": self.backend,
            "database": self.database,
            "heldout": self.heldout,
            "sampling": self.sampling,
            "grid": self.grid,
            "distances": self.distances,
            "chosen": {
                "distribution": self.decoding.name,
                "setting": chosen.setting,
                "informative": self.decoding.informative,
            },
            "distributions": [_plain(d) for d in self.distributions],
            "timings": self.timings,
        }
        return _plain(data)

    def render(self) -> str:
        return render_report(self)


def _plain(value: object) -> object:
    """JSON-ready copy: dataclasses to dicts, tuples to lists, non-finite numbers to None."""
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(report: CalibrationReport, path: str | Path | None = None) -> Path:
    """Write ``calibration.json`` to ``path`` (a file or a folder), by default into the database's folder."""
    if path is None:
        if report.database.get("path") is None:
            raise ValueError("this database was not loaded from a folder; say where to write the report")
        path = report.database["path"]
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / CALIBRATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return path


def _score(score: Score, unit: str = "") -> str:
    return f"{score.mean:+.2f}{unit} [{score.low:+.2f}, {score.high:+.2f}]"


def _nll(score: Score) -> str:
    return f"{score.mean:.4f} [{score.low:.4f}, {score.high:.4f}]"


def render_report(report: CalibrationReport) -> str:
    """A readable summary: the verdict first, then the table, the controls, the splits and the distances."""
    database, heldout = report.database, report.heldout
    lines = [
        f"DAiD calibration: backend {report.backend}, database {database.get('path') or '(in memory)'} "
        f"({database['entries']:,} entries of {database['images']:,} images)",
        f"held out: {heldout['description']}: {heldout['images']} images ({heldout['validation']} validation, "
        f"{heldout['test']} test), {heldout['tokens_per_image']} tokens each, {heldout['positions_per_image']} with "
        f"retrieval; NLL in nats per token over all tokens, test images, 95% bootstrap intervals over images",
    ]
    for part in report.distributions:
        lines += [
            "",
            f"== {part.name} distribution (guidance {part.guidance_scale:g}, temperature "
            f"{report.sampling['temperature']:g}) ==",
            part.verdict,
            "",
        ]
        width = max(len(row.name) for row in part.rows)
        lines.append(f"  {'':<{width}}  test NLL                  change vs model alone     validation (out of fold)")
        for row in part.rows:
            mark = "*" if row.name == part.chosen else " "
            change = f"{_score(row.change, '%'):<24}" if row.setting is not None else " " * 24
            fold = "" if row.cross_validated_nll is None else f" ({row.cross_validated_nll:.4f})"
            validation = f"{row.validation_nll:.4f}{fold}"
            detail = "" if row.setting is None else f"  {row.description}"
            lines.append(f"{mark} {row.name:<{width}}  {_nll(row.test_nll)}  {change}  {validation:<17}{detail}")
        lines.append(f"  beyond the best control ({part.best_control}): {_score(part.beyond_control, '%')}")
        lines.append(f"  {part.split_setting} by tercile (test positions with retrieval; edges from validation):")
        for split in part.splits:
            lines.append(
                f"    {split.feature} in [{split.low:.3g}, {split.high:.3g}] ({split.share:.0%} of positions): "
                f"{split.model_nll.mean:.4f} -> {split.chosen_nll.mean:.4f}, {_score(split.change, '%')}"
            )
        lines.append("  top-1: " + ", ".join(f"{name} {value:.1%}" for name, value in part.top1.items()))
        lines.append(
            "  true token not among the first k neighbours' next tokens: "
            + ", ".join(f"k {k}: {value:.1%}" for k, value in part.missing.items())
        )
    lines += [
        "",
        "neighbour distances (squared L2) over held-out positions, quantiles "
        + ", ".join(f"{q:g}" for q in report.distances["quantiles"]),
    ]
    for name, values in report.distances["values"].items():
        lines.append(f"  {name}: " + ", ".join(f"{v:.3g}" for v in values))
    lines.append("τ grid: " + ", ".join(f"{t:.3g}" for t in report.grid["temperatures"]))
    lines.append("time: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in report.timings.items()))
    return "\n".join(lines)
