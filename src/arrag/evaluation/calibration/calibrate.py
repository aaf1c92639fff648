"""``calibrate``: what a patch database tells a model, measured by held-out likelihood, and DAiD tuned by it.

The kNN-LM protocol: teacher-force held-out images, search the database once per eligible position with queries
made from the true tokens, and score the true next token under the model and under every DAiD setting of a
grid. Settings (fixed, gated or logistic λ) are chosen on the validation images and reported on the test
images, beside content-free controls mixed in the same way.

Shapes: N images, T tokens per image, P eligible positions per image, M = N·P.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from arrag.backends.base import Backend
from arrag.config import RetrievalConfig, SamplingConfig
from arrag.decoding.weights import AdaptiveWeight
from arrag.evaluation.calibration.controls import bucket_control, bucket_of, database_token_counts, frequency_control
from arrag.evaluation.calibration.grid import DUPLICATES
from arrag.evaluation.calibration.heldout import HeldOut, as_heldout
from arrag.evaluation.calibration.report import CalibrationReport, DistributionReport, Row, Split
from arrag.evaluation.calibration.retrieval import RetrievalMeasurements, TemperatureGrid, measure_retrieval
from arrag.evaluation.calibration.statistics import bootstrap_means, interval, relative_change
from arrag.evaluation.calibration.teacher import ModelScores, score_model
from arrag.evaluation.calibration.tuning import (
    DaidSetting,
    Evidence,
    GridTable,
    Setting,
    Tuned,
    best_logistic,
    cross_validate,
    describe,
    tune_controls,
)
from arrag.evaluation.statistics import Score
from arrag.retrieval.database import PatchDatabase

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
ONE_SIDED_95 = 1.645  # a mixture is chosen only if its validation gain is clear of zero


def _positive(name: str, values: Sequence[float], upper: float = math.inf) -> None:
    if not values or not all(0 < v <= upper and math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be a non-empty list of numbers in (0, {upper}], got {values}")


@dataclass(frozen=True)
class CalibrationConfig:
    """The grid, the split, the controls and the effort of a calibration.

    ``temperatures`` None places ``temperature_points`` τ geometrically from the lower ``temperature_quantiles`` of
    the queries' smallest positive distance gaps (d − d_min) to the upper one of their largest. The model alone (λ = 0)
    is always a candidate; ``reference`` (the shipped default setting) is always scored, its τ and k added to the
    grid. ``sampling`` None: the backend's own (top-k and top-p are not applied: they would give held-out tokens
    probability zero).
    """

    weights: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
    ks: tuple[int, ...] = (16, 128, 2048)
    temperatures: tuple[float, ...] | None = None
    temperature_points: int = 8
    temperature_quantiles: tuple[float, float] = (0.05, 0.95)
    sampling: SamplingConfig | None = None
    reference: RetrievalConfig = field(default_factory=RetrievalConfig)
    gate_quantiles: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    logistic_candidates: int = 3  # (rule, τ, k) cells, best by fixed λ, that get a fitted logistic λ
    logistic_max_weight: float = 0.99  # below 1: σ rounds to 1 in float64, which would drop the model's share
    logistic_steps: int = 200
    distance_buckets: int = 8
    validation_fraction: float = 0.5
    split_seed: int = 0
    resamples: int = 2000
    seed: int = 0
    batch_images: int = 32  # images per teacher-forced forward
    search_batch: int = 4096  # distinct queries per database search

    def __post_init__(self) -> None:
        _positive("weights", self.weights, 1.0)
        _positive("temperatures", self.temperatures if self.temperatures is not None else (1.0,))
        _positive("gate_quantiles", self.gate_quantiles, 1.0)
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            raise ValueError(f"ks must be a non-empty list of integers >= 1, got {self.ks}")
        low, high = self.temperature_quantiles
        if not 0 <= low <= high <= 1 or self.temperature_points < 1:
            raise ValueError("temperature_quantiles must be 0 <= low <= high <= 1, with temperature_points >= 1")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if not 0 < self.logistic_max_weight < 1:
            raise ValueError(f"logistic_max_weight must be in (0, 1), got {self.logistic_max_weight}")
        for name in ("logistic_steps", "resamples", "batch_images", "search_batch", "distance_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.logistic_candidates < 0:
            raise ValueError(f"logistic_candidates must be >= 0, got {self.logistic_candidates}")

    def neighbour_counts(self, entries: int) -> tuple[int, ...]:
        """The k grid for a database of ``entries`` entries (each k at most that), with the reference's k."""
        return tuple(sorted({min(k, entries) for k in (*self.ks, self.reference.k)}))

    def reference_setting(self, entries: int) -> DaidSetting:
        ref = self.reference
        return DaidSetting(ref.duplicates, ref.temperature, min(ref.k, entries), AdaptiveWeight("fixed", ref.weight))


def calibrate(
    backend: Backend,
    database: PatchDatabase | str | Path,
    heldout: HeldOut | Sequence[tuple[str | None, torch.Tensor | Image.Image]],
    config: CalibrationConfig | None = None,
    description: str = "held-out images",
) -> CalibrationReport:
    """Measure what ``database`` tells ``backend``'s model about ``heldout`` and tune DAiD by likelihood.

    Args:
        database: a database, or the folder of one (the report's default home, see :func:`write_report`).
        heldout: (caption or None, (T,) tokens or a PIL image) pairs, or a :class:`HeldOut`.
    """
    config = config or CalibrationConfig()
    started, cpu_started = time.perf_counter(), time.process_time()
    path = None
    if not isinstance(database, PatchDatabase):
        path = Path(database)
        database = PatchDatabase.load(path)
    database.check_backend(backend)
    if not len(database):
        raise ValueError("the patch database is empty; add images to it with arrag db add")
    heldout = as_heldout(backend, heldout, description)
    if heldout.tokens.shape[1] != backend.grid.size:
        raise ValueError(f"held-out token grids have {heldout.tokens.shape[1]} tokens, the backend {backend.grid.size}")
    timings = {"tokenize": time.perf_counter() - started}
    sampling = config.sampling or backend.sampling
    validation = heldout.split(config.validation_fraction, config.split_seed)  # (N,)

    model = score_model(backend, heldout, sampling, config.batch_images)
    timings["teacher forcing"] = time.perf_counter() - started - timings["tokenize"]

    reference = config.reference_setting(len(database))
    with _torch_threads(1):  # many small ops beside FAISS's threads: one torch thread stalls far less under load
        measured = measure_retrieval(
            backend,
            database,
            heldout.tokens,
            validation,
            config.neighbour_counts(len(database)),
            TemperatureGrid(
                config.temperatures, config.temperature_points, config.temperature_quantiles, (reference.temperature,)
            ),
            config.distance_buckets,
            config.search_batch,
            config.seed,
        )
        timings["search"], timings["grid"] = measured.search_seconds, measured.grid_seconds
        tuning = time.perf_counter()
        reports = [
            _assess(name, evidence, model[name], measured.positions, sampling, reference, config)
            for name, evidence in _evidence(database, heldout, model, measured, validation).items()
        ]
        timings["tuning"] = time.perf_counter() - tuning
    timings["total"] = time.perf_counter() - started
    timings["cpu, all threads"] = time.process_time() - cpu_started
    return CalibrationReport(
        backend=backend.name,
        database={
            "path": None if path is None else str(path),
            "images": database.num_images,
            "entries": len(database),
            "index": database.index_config.description,
            "neighbourhood": database.spec.neighbourhood.name,
        },
        heldout={
            "description": heldout.description,
            "images": len(heldout),
            "validation": int(validation.sum()),
            "test": int((~validation).sum()),
            "captioned": sum(c is not None for c in heldout.captions),
            "tokens_per_image": int(heldout.tokens.shape[1]),
            "positions_per_image": len(measured.positions),
            "distinct_queries": measured.unique_queries,
            "searches": measured.searches,
        },
        sampling={
            "guidance_scale": sampling.guidance_scale,
            "temperature": sampling.temperature,
            "not_applied": {"top_k": sampling.top_k, "top_p": sampling.top_p},
        },
        grid={
            "duplicates": list(DUPLICATES),
            "temperatures": list(measured.temperatures),
            "ks": list(measured.ks),
            "weights": list(config.weights),
            "gate_quantiles": list(config.gate_quantiles),
            "reference": reference.to_dict(),
        },
        distances=_distances(measured),
        distributions=tuple(reports),
        timings=timings,
    )


def _evidence(
    database: PatchDatabase,
    heldout: HeldOut,
    model: dict[str, ModelScores],
    measured: RetrievalMeasurements,
    validation: torch.Tensor,
) -> dict[str, Evidence]:
    """Each model distribution's evidence, with its controls."""
    positions = measured.positions
    targets = heldout.tokens[:, positions].flatten()  # (M,)
    buckets = bucket_of(measured.scores.nearest, measured.bucket_edges)  # (M,)
    controls = {
        "frequency": frequency_control(database_token_counts(database), targets),
        "bucket-frequency": bucket_control(measured.bucket_counts, buckets, targets),
    }
    evidence = {}
    for name, scores in model.items():
        unguided = {"conditional": model["conditional"].log_target[:, positions].flatten()} if name == "guided" else {}
        evidence[name] = Evidence(
            log_model=scores.log_target[:, positions].flatten(),
            model_entropy=scores.entropy[:, positions].flatten(),
            retrieval=measured.scores,
            temperatures=measured.temperatures,
            ks=measured.ks,
            controls=controls | unguided,
            images=torch.arange(len(heldout)).repeat_interleave(len(positions)),
            validation=validation,
        )
    return evidence


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Run torch's CPU ops on ``count`` threads for a while."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _distances(measured: RetrievalMeasurements) -> dict:
    """Quantiles of the nearest and k-th neighbour distances over the held-out positions with neighbours."""
    scores = measured.scores
    values = {"nearest": scores.nearest}
    values |= {f"{k}-th": scores.kth[:, q] for q, k in enumerate(measured.ks)}
    gaps = {f"{k}-th − nearest": scores.kth[:, q] - scores.nearest for q, k in enumerate(measured.ks)}
    quantiles = {}
    for name, column in (values | gaps).items():
        finite = column[torch.isfinite(column)].numpy()
        quantiles[name] = np.quantile(finite, QUANTILES).tolist() if len(finite) else []
    return {"quantiles": list(QUANTILES), "values": quantiles}


def _assess(
    name: str,
    evidence: Evidence,
    scores: ModelScores,
    positions: np.ndarray,
    sampling: SamplingConfig,
    reference: DaidSetting,
    config: CalibrationConfig,
) -> DistributionReport:
    """Tune on validation, score on test, against the model alone and the controls."""
    images, validation = evidence.images, evidence.validation
    table = GridTable.build(evidence, config.weights, config.gate_quantiles)
    tuned, held_out = _tune(evidence, table, _folds(validation), config)
    chosen = _choose(held_out, images, validation)
    controls = tune_controls(evidence, config.weights)
    best_control = f"control: {min(controls, key=lambda key: controls[key].objective)}"
    settings: dict[str, Setting] = {key: t.setting for key, t in tuned.items()}
    settings |= {
        f"best fixed, {rule}": table.best_fixed(evidence, validation, r).setting for r, rule in enumerate(DUPLICATES)
    }
    settings["shipped default"] = reference
    settings |= {f"control: {key}": control.setting for key, control in controls.items()}

    names = list(settings)
    base = -scores.log_target.sum(1).numpy()  # (N,) each image's NLL under the model alone
    sums = np.stack([base + _per_image(evidence.nll_change(settings[key]), images, len(base)) for key in names], 1)
    tokens = np.full(len(base), scores.log_target.shape[1])  # (N,)
    test = ~validation.numpy()
    means, draws = bootstrap_means(sums[test], tokens[test], config.resamples, config.seed)
    valid_nll = sums[~test].sum(0) / tokens[~test].sum()  # (measures,)
    out_of_fold = {key: valid_nll[0] + changes.sum().item() / tokens[~test].sum() for key, changes in held_out.items()}
    rows = tuple(
        Row(key, describe(settings[key]), _to_dict(settings[key]), float(valid_nll[i]), out_of_fold.get(key),
            interval(means[i], draws[:, i]), relative_change(means, draws, i, 0))
        for i, key in enumerate(names)
    )  # fmt: skip
    beyond = relative_change(means, draws, names.index(chosen), names.index(best_control), base=0)
    split_setting = chosen if settings[chosen] is not None else "best fixed"  # where retrieval helps or hurts
    informative = settings[chosen] is not None and beyond.high < 0
    return DistributionReport(
        name=name,
        guidance_scale=sampling.guidance_scale if name == "guided" else 1.0,
        rows=rows,
        chosen=chosen,
        best_control=best_control,
        beyond_control=beyond,
        informative=informative,
        verdict=_verdict(rows[names.index(chosen)], best_control, beyond, informative),
        split_setting=split_setting,
        splits=_splits(evidence, settings[split_setting], images, len(base), config),
        top1=_top1(evidence, scores, positions, validation, settings[split_setting]),
        missing={
            str(k): float(evidence.retrieval.missing[~evidence.on_validation, q].double().mean())
            for q, k in enumerate(evidence.ks)
        },
        validation_grid=(valid_nll[0] + table.fixed[validation].sum(0).numpy() / tokens[~test].sum()).tolist(),
    )


def _tune(
    evidence: Evidence, table: GridTable, folds: torch.Tensor, config: CalibrationConfig
) -> tuple[dict[str, Tuned], dict[str, torch.Tensor]]:
    """Each kind of rule tuned on the validation images -> ({kind: tuned}, {kind: (M,) out-of-fold NLL changes}),
    the model alone first."""
    tuners = {
        "best fixed": partial(table.best_fixed, evidence),
        "best gated": partial(table.best_gated, evidence),
        "best logistic": partial(
            best_logistic,
            evidence,
            table,
            candidates=config.logistic_candidates,
            max_weight=config.logistic_max_weight,
            steps=config.logistic_steps,
        ),
    }
    tuned: dict[str, Tuned] = {"model alone": Tuned(None, 0.0)}
    held_out: dict[str, torch.Tensor] = {}
    for key, tune in tuners.items():
        setting, changes = cross_validate(tune, evidence, folds)
        if setting is not None:
            tuned[key], held_out[key] = setting, changes
    return tuned, held_out


def _top1(
    evidence: Evidence, scores: ModelScores, positions: np.ndarray, validation: torch.Tensor, shown: DaidSetting
) -> dict[str, float]:
    """Top-1 accuracy on the test positions with neighbours: the model's, the nearest neighbour's token's and p_ret's
    at ``shown``'s (rule, τ, k); and the model's on all test tokens."""
    found = ~evidence.on_validation & evidence.retrieval.found[:, 0]
    r, s, q = evidence.index(shown)
    return {
        "model (all tokens)": float(scores.top1[~validation].double().mean()),
        "model": float(scores.top1[:, positions].flatten()[found].double().mean()),
        "nearest neighbour's token": float(evidence.retrieval.top1[found, 0, 0, 0].double().mean()),
        f"p_ret ({shown.duplicates}, τ {shown.temperature:.3g}, k {shown.k})": float(
            evidence.retrieval.top1[found, r, s, q].double().mean()
        ),
    }


def _choose(held_out: dict[str, torch.Tensor], images: torch.Tensor, validation: torch.Tensor) -> str:
    """The kind with the lowest out-of-fold NLL change if that change is clear of zero, else the model alone."""
    if not held_out:
        return "model alone"
    best = min(held_out, key=lambda key: float(held_out[key].sum()))
    per_image = _per_image(held_out[best], images, len(validation))[validation.numpy()]  # (validation images,)
    spread = per_image.std(ddof=1) / math.sqrt(len(per_image)) if len(per_image) > 1 else 0.0
    return best if per_image.mean() + ONE_SIDED_95 * spread < 0 else "model alone"


def _folds(validation: torch.Tensor, count: int = 2) -> torch.Tensor:
    """(N,) each image's fold: the validation images dealt in turn into ``count`` folds (test images: 0, unused)."""
    folds = torch.zeros(len(validation), dtype=torch.long)
    folds[validation] = torch.arange(int(validation.sum())) % count
    return folds


def _per_image(values: torch.Tensor, images: torch.Tensor, count: int) -> np.ndarray:
    """(M,) per-position values -> (N,) per-image sums."""
    return np.bincount(images.numpy(), weights=values.double().numpy(), minlength=count)


def _to_dict(setting: Setting) -> dict | None:
    return None if setting is None else setting.to_dict()


def _verdict(chosen: Row, control: str, beyond: Score, informative: bool) -> str:
    """One plain sentence: does this database inform this model, and by how much beyond the best control."""
    if chosen.setting is None:
        return (
            "This database does not inform this model: no mixture's gain over the model alone is clear of zero on "
            "validation (out of fold), so the model alone (λ = 0) is chosen."
        )
    change = f"changes test NLL by {_percent(chosen.change)}"
    if not informative:
        relation = "worse than the control" if beyond.low > 0 else "not clear of zero"
        return (
            f"This database does not inform this model: the chosen setting ({chosen.description}) {change}, but its "
            f"difference from the best control ({control}) is {_percent(beyond)}: {relation}."
        )
    return (
        f"This database informs this model: {chosen.description} {change}, {_percent(beyond)} beyond the best "
        f"control ({control})."
    )


def _percent(score: Score) -> str:
    return f"{score.mean:+.2f}% [{score.low:+.2f}, {score.high:+.2f}]"


def _splits(
    evidence: Evidence, setting: Setting, images: torch.Tensor, count: int, config: CalibrationConfig
) -> tuple[Split, ...]:
    """The chosen setting by tercile of the model's entropy and of the nearest distance (edges from validation)."""
    test = ~evidence.on_validation & evidence.retrieval.found[:, 0]
    model_nll, chosen_nll = -evidence.log_model, -evidence.log_mixture(setting)
    splits = []
    for feature, values in (
        ("model entropy", evidence.model_entropy),
        ("nearest distance", evidence.retrieval.nearest),
    ):
        reference = values[evidence.on_validation & torch.isfinite(values)].numpy()
        if not len(reference):
            continue
        edges = np.quantile(reference, [1 / 3, 2 / 3])
        tercile = torch.from_numpy(np.searchsorted(edges, values.numpy(), side="left"))  # (M,)
        for t in range(3):
            inside = test & (tercile == t)
            if not bool(inside.any()):
                continue
            sums = np.stack(
                [_per_image(torch.where(inside, v, 0.0), images, count) for v in (model_nll, chosen_nll)], 1
            )
            counts = _per_image(inside.double(), images, count)
            keep = counts > 0
            means, draws = bootstrap_means(sums[keep], counts[keep], config.resamples, config.seed)
            splits.append(
                Split(
                    feature=feature,
                    low=float(values[inside].min()),
                    high=float(values[inside].max()),
                    share=float(inside.sum() / test.sum()),
                    model_nll=interval(means[0], draws[:, 0]),
                    chosen_nll=interval(means[1], draws[:, 1]),
                    change=relative_change(means, draws, 1, 0),
                )
            )
    return tuple(splits)
