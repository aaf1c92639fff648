"""Building and growing patch databases from image collections, resumably, on either build engine.

A build plans its inputs into shards (:mod:`arrag.build.sources`), writes the plan to ``DB/build/plan.json``
(:mod:`arrag.build.plan`), then runs :mod:`arrag.build.stages` over the shards on an engine
(:mod:`arrag.build.engines`):

1. tokenize every shard into ``DB/tokens/shard-*.parquet``;
2. number the images (shard by shard, so ids do not depend on the engine or on interruptions);
3. train the index on a sample of keys, if it needs training, into ``DB/build/trained.faiss``;
4. turn every token shard into an index shard;
5. merge the index shards (in memory, or into on-disk inverted lists) and save the database.

Every shard's output is written atomically, so a build killed at any point and run again with ``resume``
skips the finished shards and ends with exactly the entries of an uninterrupted build. All of it runs
inside :mod:`arrag.build.transaction`: one build at a time in a folder, and the folder as it was if the
build fails (but for tokenized shards worth resuming, which it says), or is abandoned with
:func:`arrag.build.transaction.rollback`. ``DB/build`` is removed when the database is complete, and
``DB/build-report.json`` gains the run.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import faiss
import numpy as np
from tqdm import tqdm

from arrag.backends import Backend, BackendRef
from arrag.build import transaction
from arrag.build.engines import ENGINES, EngineName, LocalEngine, RayEngine, make_engine
from arrag.build.plan import BuildPlan, PlanKind
from arrag.build.sources import ShardSpec, SourceConfig, SourcePlan, plan_shards
from arrag.build.stages import (
    IndexJob,
    IndexStage,
    IndexTask,
    TokenizedShard,
    TokenizeJob,
    TokenizeStage,
    TokenShard,
    read_token_shard,
    shard_entries,
)
from arrag.retrieval import indexes
from arrag.retrieval.database import (
    DatabaseSpec,
    PatchDatabase,
    index_bytes,
    load_next_tokens,
    next_tokens,
    read_manifest,
)
from arrag.retrieval.grid import Neighbourhood
from arrag.retrieval.indexes import IndexConfig
from arrag.retrieval.keys import KEY_SOURCES, KeySource, code_table, unit_codebook
from arrag.retrieval.layout import DatabaseLayout, write_atomically, write_json

logger = logging.getLogger(__name__)

SHARED_SETTINGS = ("sources", "batch_size", "engine", "address")  # what `db add` takes from its own arguments
TRAIN_SHARDS = 64  # training keys are sampled from at most this many shards

ShardCallback = Callable[[str, dict], None]
Task = TypeVar("Task", ShardSpec, IndexTask)


@dataclass(frozen=True)
class BuildConfig:
    """How a database is built.

    Attributes:
        neighbourhood, key_source: what a key is made of (see :mod:`arrag.retrieval.keys`).
        index: the FAISS index (see :mod:`arrag.retrieval.indexes`).
        sources: shard size and Parquet columns (see :mod:`arrag.build.sources`).
        batch_size: images per tokenizer call.
        engine: ``local`` (this process) or ``ray`` (Ray Data).
        address: the Ray cluster to join; None starts Ray inside this process.
        seed: of the training sample and k-means.
    """

    neighbourhood: Neighbourhood = field(default_factory=Neighbourhood)
    key_source: KeySource = "codebook"
    index: IndexConfig = field(default_factory=IndexConfig)
    sources: SourceConfig = field(default_factory=SourceConfig)
    batch_size: int = 32
    engine: EngineName = "local"
    address: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.key_source not in KEY_SOURCES:
            raise ValueError(f"key_source must be one of {KEY_SOURCES}, got {self.key_source!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.index.codebook_codes and self.key_source != "codebook":
            raise ValueError("a CodebookPQ index holds codebook keys; use key_source='codebook' or another index")
        if "x4fs" in self.index.description and self.index.on_disk:
            raise ValueError(f"{self.index.description}: fast-scan lists cannot be kept on disk; use on_disk=False")


@dataclass(frozen=True)
class BuildReport:
    """What one build or add did; ``DB/build-report.json`` holds the report of every run (``runs``) and, at
    its top, their counts and lists all together."""

    images_added: int = 0
    entries: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}: items that could not be read
    ignored: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}: files in folders not read
    duplicates: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}: in the database already
    seconds: float = 0.0
    shards: int = 0
    shards_resumed: int = 0  # shards an earlier, interrupted run had already tokenized
    engine: str = "local"
    index: str = ""
    bytes_per_entry: float = 0.0  # index files on disk / entries in the database
    stage_seconds: dict[str, float] = field(default_factory=dict)


def build_database(
    backend: Backend | BackendRef,
    inputs: Sequence[str | Path],
    out: str | Path,
    config: BuildConfig | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    on_shard_done: ShardCallback | None = None,
) -> BuildReport:
    """Build a database in ``out`` from ``inputs`` (image files, folders, tar and Parquet files, ``world:N``).

    Args:
        backend: the tokenizer; a :class:`BackendRef` lets Ray workers load their own copy.
        inputs: what to read (see :func:`arrag.build.sources.plan_shards`).
        out: the database folder.
        config: index, neighbourhood, engine, ...
        overwrite: replace a database (or an unfinished build) in ``out``.
        resume: finish the unfinished build in ``out``: the same inputs and settings, no finished shard redone.
        on_shard_done: called with (stage name, shard record) after every shard.

    A build that fails leaves ``out`` as it found it, unless it failed after tokenizing while it can be
    resumed (its error says so); :func:`arrag.build.transaction.rollback` abandons an unfinished build.
    """
    config = config or BuildConfig()
    layout = DatabaseLayout(out)
    with transaction.locked(layout, create=True):
        loaded = backend.load() if isinstance(backend, BackendRef) else backend
        spec = DatabaseSpec.for_backend(loaded, config.neighbourhood, config.key_source)
        inputs = [str(item) for item in inputs]
        if resume:
            plan = _unfinished(layout, "build", inputs, spec, config)
        else:
            _check_out(layout, overwrite)
            _check_index(spec, config.index, loaded)
            sources = _plan_sources(inputs, config.sources, 0)
            if overwrite:
                transaction.set_aside(layout)
            plan = _new_plan(layout, "build", inputs, spec, config, loaded, sources, 0, layout.ivfdata_name(), [])
        return _run(layout, plan, loaded, backend, config, on_shard_done, resume)


def add_to_database(
    backend: Backend | BackendRef,
    inputs: Sequence[str | Path],
    directory: str | Path,
    config: BuildConfig | None = None,
    *,
    resume: bool = False,
    on_shard_done: ShardCallback | None = None,
) -> BuildReport:
    """Append the images of ``inputs`` to the database in ``directory`` (``arrag db add``).

    The database's own neighbourhood, key source and trained index are used; of ``config`` only the
    engine, sources and batch size matter. New images get the next ids; entries already there are kept.
    Images the database holds already (the same source name, or the same bytes) are not added again: the
    report lists them as ``duplicates``, and an add of nothing new changes nothing.
    """
    layout = DatabaseLayout(directory)
    with transaction.locked(layout, create=False):
        manifest = read_manifest(layout.root)
        loaded = backend.load() if isinstance(backend, BackendRef) else backend
        spec = DatabaseSpec.from_dict(manifest["spec"])
        spec.check_serves(DatabaseSpec.for_backend(loaded, spec.neighbourhood, spec.key_source))
        config = BuildConfig(
            **{
                **{name: getattr(config or BuildConfig(), name) for name in SHARED_SETTINGS},
                "neighbourhood": spec.neighbourhood,
                "key_source": spec.key_source,
                "index": IndexConfig.from_dict(manifest["index"]),
            }
        )
        inputs = [str(item) for item in inputs]
        if layout.plan.exists() and not resume:
            raise FileExistsError(layout.unfinished_message())
        if resume:
            plan = _unfinished(layout, "add", inputs, spec, config)
        else:
            layout.base_index.unlink(missing_ok=True)  # left by an add killed after it completed
            base_shards = manifest.get("token_shards", [])
            first_shard = 1 + max((layout.shard_of(shard["file"]) for shard in base_shards), default=-1)
            sources = _plan_sources(inputs, config.sources, first_shard)
            first_image = manifest["counts"]["images"]
            ivfdata = layout.ivfdata_name(first_shard)
            plan = _new_plan(layout, "add", inputs, spec, config, loaded, sources, first_image, ivfdata, base_shards)
        return _run(layout, plan, loaded, backend, config, on_shard_done, resume)


def _unfinished(
    layout: DatabaseLayout, kind: PlanKind, inputs: list[str], spec: DatabaseSpec, config: BuildConfig
) -> BuildPlan:
    """The plan of the unfinished build or add to resume in ``layout``, checked against the settings now."""
    if not layout.plan.exists():
        where = layout.plan.relative_to(layout.root)
        raise FileNotFoundError(f"{layout.root} holds no unfinished {kind} to resume (no {where})")
    plan = BuildPlan.read(layout.plan)
    plan.check_resumes(kind, inputs, spec, config.index, config.sources)
    return plan


def _plan_sources(inputs: list[str], config: SourceConfig, first_shard: int) -> SourcePlan:
    """The inputs' shards; inputs that hold no image file are refused, with why the first file was ignored."""
    sources = plan_shards(inputs, config, first_index=first_shard)
    if not sources.shards:
        ignored = sources.ignored
        why = f"; ignored {len(ignored)} files, e.g. {ignored[0]['path']}: {ignored[0]['reason']}" if ignored else ""
        raise ValueError(f"no image files found in {', '.join(inputs)}{why}")
    return sources


def _new_plan(
    layout: DatabaseLayout,
    kind: PlanKind,
    inputs: list[str],
    spec: DatabaseSpec,
    config: BuildConfig,
    backend: Backend,
    sources: SourcePlan,
    first_image: int,
    ivfdata: str,
    base_token_shards: list[dict],
) -> BuildPlan:
    """The plan of a build or add about to start, written before anything it makes."""
    plan = BuildPlan(
        kind=kind,
        inputs=tuple(inputs),
        spec=spec,
        index=config.index,
        sources=config.sources,
        preprocessing=backend.preprocessing.to_dict(),
        seed=config.seed,
        first_image=first_image,
        ivfdata=ivfdata,
        base_token_shards=tuple(base_token_shards),
        shards=tuple(sources.shards),
        ignored=tuple(sources.ignored),
    )
    plan.write(layout.plan)
    return plan


def _check_out(layout: DatabaseLayout, overwrite: bool) -> None:
    """Refuse an ``out`` folder that a new build would clash with, before anything is read or removed."""
    out, unfinished, holds_database = layout.root, layout.plan.exists(), layout.manifest.exists()
    if holds_database and not overwrite:
        raise FileExistsError(f"{out} already holds a patch database; choose another folder or pass overwrite=True")
    if unfinished and not overwrite:
        raise FileExistsError(layout.unfinished_message(restart=True))
    if out.is_dir() and any(out.iterdir()) and not holds_database and not unfinished:
        raise FileExistsError(f"{out} is not empty and holds no patch database; choose a new or empty folder")


def _check_index(spec: DatabaseSpec, config: IndexConfig, backend: Backend) -> None:
    """Make the index and apply its search parameters once, so that a bad setting fails before the tokenizing."""
    if config.nlist is not None and config.nlist > config.train_size:
        raise ValueError(
            f"{config.description} trains {config.nlist} lists on {config.train_size} keys (train_size); "
            f"raise train_size to at least {config.nlist} (40 keys a list is better) or choose fewer lists"
        )
    codes = code_table(backend) if spec.key_source == "codebook" else None
    indexes.set_search_params(_empty_index(spec, config, codes), config.search_params)


def _empty_index(spec: DatabaseSpec, config: IndexConfig, codes: np.ndarray | None) -> faiss.Index:
    """The untrained index of a build; ``codes``: the (V, d) code vectors, for codebook keys."""
    return spec.empty_index(config, unit_codebook(codes) if codes is not None else None)


def _run(
    layout: DatabaseLayout,
    plan: BuildPlan,
    loaded: Backend,
    backend: Backend | BackendRef,
    config: BuildConfig,
    on_shard_done: ShardCallback | None,
    resuming: bool,
) -> BuildReport:
    """Run the planned build or add to its end: stages, training, merge. If it fails, the folder is left as
    it was found (as it was, when ``resuming``), or with the tokenized shards, when worth resuming."""
    start = time.perf_counter()
    spec = plan.spec
    resumed = sum(layout.tokenized(shard.index).exists() for shard in plan.shards)
    codes = code_table(loaded) if spec.key_source == "codebook" else None
    stage_seconds: dict[str, float] = {}

    def report(records: list[TokenizedShard], entries: int, bytes_per_entry: float) -> BuildReport:
        return BuildReport(
            images_added=sum(record.images for record in records),
            entries=entries,
            skipped=[skip for record in records for skip in record.skipped],
            ignored=list(plan.ignored),
            duplicates=[duplicate for record in records for duplicate in record.duplicates],
            seconds=round(time.perf_counter() - start, 3),
            shards=len(plan.shards),
            shards_resumed=resumed,
            engine=config.engine,
            index=plan.index.description + (" (on disk)" if plan.index.on_disk else ""),
            bytes_per_entry=bytes_per_entry,
            stage_seconds=stage_seconds,
        )

    step = "tokenize"
    try:
        with make_engine(config.engine, config.address) as engine:
            clock = time.perf_counter()
            tokenizer = loaded if isinstance(engine, LocalEngine) or not isinstance(backend, BackendRef) else backend
            job = TokenizeJob(str(layout.root), config.batch_size, spec.key_source, plan.first_image)
            stage = TokenizeStage(tokenizer, job)
            _run_stage(engine, stage, list(plan.shards), lambda shard: layout.tokenized(shard.index), on_shard_done)
            records = [TokenizedShard.read(layout.tokenized(shard.index)) for shard in plan.shards]
            stage_seconds["tokenize"] = round(time.perf_counter() - clock, 3)
            tokenized = report(records, 0, 0.0)
            if tokenized.images_added == 0 and tokenized.duplicates:
                transaction.undo(layout, plan, keep=False)
                logger.warning("%s holds every image of %s already; nothing added", layout.root, " ".join(plan.inputs))
                return tokenized
            if tokenized.images_added == 0:
                raise ValueError(
                    f"none of the {len(tokenized.skipped)} items could be read as an image; see the warnings above"
                    if tokenized.skipped
                    else f"the inputs hold no images: {', '.join(plan.inputs)}"
                )
            firsts = np.cumsum([plan.first_image] + [record.images for record in records])[:-1].tolist()
            step, clock = "train", time.perf_counter()
            template = _template(layout, plan, codes, records)
            stage_seconds["train"] = round(time.perf_counter() - clock, 3)
            job = IndexJob(str(layout.root), spec, plan.index, str(template), codes)
            tasks = [IndexTask(r.shard, first) for r, first in zip(records, firsts, strict=True) if r.images]
            step, clock = "index", time.perf_counter()
            _run_stage(engine, IndexStage(job), tasks, lambda task: layout.index_shard(task.shard), on_shard_done)
            stage_seconds["index"] = round(time.perf_counter() - clock, 3)
        step, clock = "merge", time.perf_counter()
        database = _merge(layout, plan, template, records, firsts)
    except Exception as error:
        worth_resuming = step != "train" and _tokenized_images(layout, plan)
        if transaction.undo(layout, plan, keep=resuming or (worth_resuming and not layout.previous.exists())):
            error.add_note(f"the tokenized shards are kept: {layout.unfinished_message()}")
        raise
    stage_seconds["merge"] = round(time.perf_counter() - clock, 3)
    entries = len(database) - plan.first_image * len(spec.neighbourhood.eligible(spec.grid))
    done = report(records, entries, round(index_bytes(layout.root) / max(len(database), 1), 3))
    if done.duplicates:
        example = done.duplicates[0]
        logger.warning(
            "%d images are in %s already and were not added again, e.g. %s (%s)",
            len(done.duplicates),
            layout.root,
            example["path"],
            example["reason"],
        )
    write_json(layout.report, _history(layout, plan, done))
    transaction.commit(layout, plan)
    logger.info("%s: %d images, %d entries in %.1f s", layout.root, done.images_added, entries, done.seconds)
    return done


def _tokenized_images(layout: DatabaseLayout, plan: BuildPlan) -> bool:
    """Whether the tokenize stage has made what an unfinished build or add can go on from: a shard of images."""
    paths = (layout.tokenized(shard.index) for shard in plan.shards)
    return any(TokenizedShard.read(path).images for path in paths if path.exists())


def _history(layout: DatabaseLayout, plan: BuildPlan, report: BuildReport) -> dict[str, object]:
    """The database's build report with ``report``'s run: a build's first, an add's after the earlier runs
    (a report written before runs were kept is one run); at its top, what all runs added, skipped, ignored
    and found already there."""
    runs: list[dict] = []
    if plan.kind == "add" and layout.report.exists():
        saved = json.loads(layout.report.read_text())
        # an add killed after it wrote the report was recorded: it is this run
        runs = [run for run in saved.get("runs", [saved]) if run.get("first_image", 0) != plan.first_image]
    finished = datetime.now(UTC).isoformat(timespec="seconds")
    runs.append(
        {
            "kind": plan.kind,
            "inputs": list(plan.inputs),
            "first_image": plan.first_image,
            "finished": finished,
            **asdict(report),
        }
    )
    lists = ("skipped", "ignored", "duplicates")
    return {
        "images_added": sum(run["images_added"] for run in runs),
        "entries": sum(run["entries"] for run in runs),
        **{name: [item for run in runs for item in run.get(name, [])] for name in lists},
        "runs": runs,
    }


def _run_stage(
    engine: LocalEngine | RayEngine,
    stage: TokenizeStage | IndexStage,
    tasks: list[Task],
    output: Callable[[Task], Path],
    on_shard_done: ShardCallback | None,
) -> None:
    """Run ``stage`` on the tasks whose ``output`` file does not exist yet, with a progress bar."""
    pending = [task.to_dict() for task in tasks if not output(task).exists()]
    unit = "img" if stage.name == "tokenize" else "entry"
    done, clock = 0, time.perf_counter()
    with tqdm(total=len(tasks), initial=len(tasks) - len(pending), desc=stage.name, unit="shard") as progress:
        for record in engine.run(stage, pending):
            done += record.get("images", record.get("entries", 0))
            progress.update(1)
            progress.set_postfix_str(f"{done / max(time.perf_counter() - clock, 1e-9):,.0f} {unit}/s")
            if on_shard_done is not None:
                on_shard_done(stage.name, record)


def _copy_atomically(source: Path, target: Path) -> None:
    write_atomically(target, lambda tmp: shutil.copyfile(source, tmp))


def _template(layout: DatabaseLayout, plan: BuildPlan, codes: np.ndarray | None, records: list[TokenizedShard]) -> Path:
    """The trained empty index, made once per build (an add reuses the database's own)."""
    path = layout.state_trained
    if path.exists():
        return path
    if plan.kind == "add" and layout.trained.exists():
        _copy_atomically(layout.trained, path)
        return path
    index = _empty_index(plan.spec, plan.index, codes)
    if not index.is_trained:
        if plan.kind == "add":
            raise ValueError(f"{layout.root} has no {layout.trained.name} to add to its {plan.index.description} index")
        job = IndexJob(str(layout.root), plan.spec, plan.index, "", codes)
        sample = _training_sample(layout, job, records, plan.index.train_size, plan.seed)
        logger.info("training %s on %d keys", plan.index.description, len(sample))
        indexes.train(index, plan.index, sample, plan.seed)
    write_atomically(path, lambda tmp: faiss.write_index(index, str(tmp)))
    return path


def _training_sample(
    layout: DatabaseLayout, job: IndexJob, records: list[TokenizedShard], size: int, seed: int
) -> np.ndarray:
    """(≤ size, D) keys of random images from up to ``TRAIN_SHARDS`` random shards."""
    rng = np.random.default_rng(seed)
    filled = [record for record in records if record.images]
    chosen = [filled[i] for i in sorted(rng.permutation(len(filled))[:TRAIN_SHARDS])]
    per_image = len(job.spec.neighbourhood.eligible(job.spec.grid))
    take = math.ceil(math.ceil(size / per_image) / len(chosen))
    keys = []
    for record in chosen:
        shard = read_token_shard(layout.root / record.file, job.spec.cell_dim, ("tokens", "latents"))
        pick = np.sort(rng.choice(len(shard.tokens), min(take, len(shard.tokens)), replace=False))
        latents = shard.latents[pick] if shard.latents is not None else None
        keys += [entries.keys for entries in shard_entries(job, TokenShard([], shard.tokens[pick], latents), 0)]
    sample = np.concatenate(keys)
    return sample[np.sort(rng.choice(len(sample), size, replace=False))] if len(sample) > size else sample


def _merge(
    layout: DatabaseLayout, plan: BuildPlan, template: Path, records: list[TokenizedShard], firsts: list[int]
) -> PatchDatabase:
    """Merge the index shards (after the database's own index, for an add) and save the database."""
    spec, config = plan.spec, plan.index
    parts = [layout.index_shard(record.shard) for record in records if record.images]
    base_sources: list[str] = []
    entry_tokens: list[np.ndarray] = []  # next tokens, base then shard by shard (indexes without ids)
    if plan.kind == "add":
        if not layout.base_index.exists():  # the index before this add; a killed merge may have replaced the index
            _copy_atomically(layout.index, layout.base_index)
        parts.insert(0, layout.base_index)
        base_sources = json.loads(layout.sources.read_text())[: plan.first_image]
        base_tokens = load_next_tokens(layout.root)
        if base_tokens is not None:
            entry_tokens.append(base_tokens[: plan.first_image * len(spec.neighbourhood.eligible(spec.grid))])
    if config.on_disk:
        ivfdata = layout.root / plan.ivfdata
        ivfdata.unlink(missing_ok=True)  # left by a merge that was killed
        base_index = indexes.read_index(parts.pop(0)) if plan.kind == "add" else None
        index = indexes.merge_on_disk(indexes.read_index(template), parts, ivfdata, base_index)
    else:
        index = indexes.read_index(parts.pop(0) if plan.kind == "add" else template)
        for part in tqdm(parts, desc="merge", unit="shard"):
            indexes.merge_into(index, indexes.read_index(part))
    sources = list(base_sources)
    token_shards = list(plan.base_token_shards)
    ids_carry_tokens = indexes.stores_ids(index)
    for record, first in zip(records, firsts, strict=True):
        if record.images:
            columns = ("source",) if ids_carry_tokens else ("source", "tokens")
            shard = read_token_shard(layout.root / record.file, spec.cell_dim, columns)
            sources += shard.names
            if not ids_carry_tokens:
                entry_tokens.append(next_tokens(spec, shard.tokens))
            token_shards.append({"file": record.file, "first_image": first, "images": record.images})
        else:
            (layout.root / record.file).unlink(missing_ok=True)
    database = PatchDatabase(
        spec,
        index,
        sources,
        config,
        token_shards=token_shards,
        preprocessing=plan.preprocessing,
        next_tokens=np.concatenate(entry_tokens) if entry_tokens else None,
    )
    database.save(layout.root)
    if not layout.trained.exists():
        _copy_atomically(template, layout.trained)
    return database
