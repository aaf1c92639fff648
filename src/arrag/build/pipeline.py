"""Building and growing patch databases from image collections, resumably, on either build engine.

A build plans its inputs into shards (:mod:`arrag.build.sources`), writes the plan to ``DB/build/plan.json``,
then runs :mod:`arrag.build.stages` over the shards on an engine (:mod:`arrag.build.engines`):

1. tokenize every shard into ``DB/tokens/shard-*.parquet``;
2. number the images (shard by shard, so ids do not depend on the engine or on interruptions);
3. train the index on a sample of keys, if it needs training, into ``DB/build/trained.faiss``;
4. turn every token shard into an index shard;
5. merge the index shards (in memory, or into on-disk inverted lists) and save the database.

Every shard's output is written atomically, so a build killed at any point and run again with ``resume``
skips the finished shards and ends with exactly the entries of an uninterrupted build. ``DB/build`` is
removed when the database is complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm import tqdm

from arrag.backends import Backend, BackendRef
from arrag.build.engines import ENGINES, EngineName, LocalEngine, RayEngine, make_engine
from arrag.build.sources import Plan, ShardSpec, SourceConfig, plan_shards
from arrag.build.stages import (
    STATE_DIR,
    TOKENS_DIR,
    IndexJob,
    IndexStage,
    TokenizeJob,
    TokenizeStage,
    TokenShard,
    index_shard_file,
    read_token_shard,
    shard_entries,
    token_file,
    tokenize_batch,
    tokenized_record,
    write_atomically,
    write_json,
)
from arrag.retrieval import indexes
from arrag.retrieval.database import (
    INDEX_FILE,
    MANIFEST_FILE,
    MANIFEST_VERSION,
    NEXT_TOKENS_FILE,
    PLAN_FILE,
    SOURCES_FILE,
    TEMPLATE_FILE,
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

logger = logging.getLogger(__name__)

REPORT_FILE = "build-report.json"
BASE_FILE = "index.base.faiss"  # the database's index before an add, kept until the add is complete
PREVIOUS_DIR = "previous"  # under STATE_DIR: the database an --overwrite build replaces, kept until it completes
SHARED_SETTINGS = ("sources", "batch_size", "engine", "address")  # what `db add` takes from its own arguments
TRAIN_SHARDS = 64  # training keys are sampled from at most this many shards

ShardCallback = Callable[[str, dict], None]


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
            raise ValueError("a CodebookPQ index holds codebook keys; use --key-source codebook or another index")
        if "x4fs" in self.index.description and self.index.on_disk:
            raise ValueError(f"{self.index.description}: fast-scan lists cannot be kept on disk; drop --on-disk")


@dataclass
class BuildReport:
    images_added: int = 0
    entries: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}: items that could not be read
    ignored: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}: files in folders not read
    seconds: float = 0.0
    shards: int = 0
    shards_resumed: int = 0  # shards an earlier, interrupted run had already tokenized
    engine: str = "local"
    index: str = ""
    bytes_per_entry: float = 0.0  # index files on disk / entries in the database
    stage_seconds: dict[str, float] = field(default_factory=dict)


def add_images(database: PatchDatabase, backend: Backend, images: torch.Tensor, names: list[str]) -> None:
    """Tokenize (N, 3, H, W) images in [-1, 1] and add their patches to an in-memory database."""
    tokens, vectors = tokenize_batch(backend, images, database.spec.key_source)
    database.add(tokens, vectors, names)


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
        overwrite: replace a database (or an interrupted build) in ``out``.
        resume: finish the interrupted build in ``out``: the same inputs and settings, no finished shard redone.
        on_shard_done: called with (stage name, shard record) after every shard.
    """
    config = config or BuildConfig()
    out = Path(out)
    with _exclusive(out, create=True):
        loaded = backend.load() if isinstance(backend, BackendRef) else backend
        spec = DatabaseSpec.for_backend(loaded, config.neighbourhood, config.key_source)
        inputs = [str(item) for item in inputs]
        plan_path = out / STATE_DIR / PLAN_FILE
        if resume and plan_path.exists():
            plan = json.loads(plan_path.read_text())
            _check_resumable(plan, "build", inputs, spec, config)
        elif resume:
            raise FileNotFoundError(f"{out} holds no interrupted build to resume (no {STATE_DIR}/{PLAN_FILE})")
        else:
            _check_out(out, overwrite)
            _check_index(spec, config.index, loaded)
            sources = plan_shards(inputs, config.sources)
            if not sources.shards:
                raise _nothing_to_read(inputs, sources.ignored)
            if overwrite:
                _set_aside(out)
            plan = _plan("build", inputs, spec, config, loaded, sources, 0, "index.ivfdata", [])
            write_json(plan_path, plan)
        return _run(out, plan, loaded, backend, config, on_shard_done)


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
    """
    directory = Path(directory)
    with _exclusive(directory, create=False):
        manifest = read_manifest(directory)
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
        plan_path = directory / STATE_DIR / PLAN_FILE
        if plan_path.exists():
            if not resume:
                raise FileExistsError(
                    f"{directory} holds an interrupted build or add; pass --resume to finish it first"
                )
            plan = json.loads(plan_path.read_text())
            _check_resumable(plan, "add", inputs, spec, config)
            return _run(directory, plan, loaded, backend, config, on_shard_done)
        if resume:
            raise FileNotFoundError(f"{directory} holds no interrupted add to resume (no {STATE_DIR}/{PLAN_FILE})")
        (directory / BASE_FILE).unlink(missing_ok=True)  # left by an add killed after it completed
        base_shards = manifest.get("token_shards", [])
        first_shard = 1 + max((_shard_number(s["file"]) for s in base_shards), default=-1)
        sources = plan_shards(inputs, config.sources, first_index=first_shard)
        if not sources.shards:
            raise _nothing_to_read(inputs, sources.ignored)
        first_image = manifest["counts"]["images"]
        plan = _plan(
            "add", inputs, spec, config, loaded, sources, first_image, f"index-{first_shard:06d}.ivfdata", base_shards
        )
        write_json(plan_path, plan)
        return _run(directory, plan, loaded, backend, config, on_shard_done)


def clear_database(directory: Path) -> None:
    """Remove a database's files and any build state in ``directory``."""
    for path in [*_database_files(directory), directory / STATE_DIR]:
        _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _database_files(directory: Path) -> list[Path]:
    """The files and folders of the database in ``directory``, the manifest first (so that a database half
    removed or moved never loads)."""
    names = (
        MANIFEST_FILE,
        INDEX_FILE,
        NEXT_TOKENS_FILE,
        BASE_FILE,
        SOURCES_FILE,
        TEMPLATE_FILE,
        REPORT_FILE,
        TOKENS_DIR,
    )
    return [directory / name for name in names if (directory / name).exists()] + sorted(directory.glob("*.ivfdata"))


@contextlib.contextmanager
def _exclusive(directory: Path, create: bool) -> Iterator[None]:
    """Hold a lock on ``directory`` while a build or add runs in it: a second one there is refused. A folder
    made here (``create``) is removed again if the build leaves it empty (it was refused)."""
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file; choose a folder")
    made = create and not directory.exists()
    if made:
        directory.mkdir(parents=True)
    elif not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a patch database (no such folder); build one with arrag db build")
    handle = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"another arrag build or add is running in {directory}; let it finish") from None
        _recover(directory)
        yield
    finally:
        os.close(handle)  # releases the lock
        if made and not any(directory.iterdir()):
            directory.rmdir()


def _plan(
    kind: str,
    inputs: list[str],
    spec: DatabaseSpec,
    config: BuildConfig,
    backend: Backend,
    sources: Plan,
    first_image: int,
    ivfdata: str,
    base_token_shards: list[dict],
) -> dict:
    """What a build or add will do, written before it starts: resuming reads it back and checks it."""
    return {
        "kind": kind,
        "version": MANIFEST_VERSION,
        "inputs": inputs,
        "spec": spec.to_dict(),
        "index": config.index.to_dict(),
        "sources": asdict(config.sources),
        "preprocessing": backend.preprocessing.to_dict(),
        "seed": config.seed,
        "first_image": first_image,
        "ivfdata": ivfdata,
        "base_token_shards": base_token_shards,
        "shards": [shard.to_dict() for shard in sources.shards],
        "ignored": sources.ignored,
    }


def _nothing_to_read(inputs: list[str], ignored: list[dict[str, str]]) -> ValueError:
    """The error for inputs that hold no image file, with why the first of the files they hold was ignored."""
    why = f"; ignored {len(ignored)} files, e.g. {ignored[0]['path']}: {ignored[0]['reason']}" if ignored else ""
    return ValueError(f"no image files found in {', '.join(inputs)}{why}")


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that a new build would clash with, before anything is read or removed."""
    interrupted = (out / STATE_DIR / PLAN_FILE).exists()
    if (out / MANIFEST_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a patch database; choose another --out or pass --overwrite")
    if interrupted and not overwrite:
        raise FileExistsError(
            f"{out} holds an interrupted build; pass --resume to finish it or --overwrite to start again"
        )
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).exists() and not interrupted:
        raise FileExistsError(f"{out} is not empty and holds no patch database; choose a new or empty folder")


def _check_index(spec: DatabaseSpec, config: IndexConfig, backend: Backend) -> None:
    """Make the index and apply its search parameters once, so that a bad setting fails before the tokenizing."""
    if config.nlist is not None and config.nlist > config.train_size:
        raise ValueError(
            f"{config.description} trains {config.nlist} lists on {config.train_size} keys (--train-size); "
            f"raise --train-size to at least {config.nlist} (40 keys a list is better) or choose fewer lists"
        )
    codes = code_table(backend) if spec.key_source == "codebook" else None
    indexes.set_search_params(_empty_index(spec, config, codes), config.search_params)


def _empty_index(spec: DatabaseSpec, config: IndexConfig, codes: np.ndarray | None) -> faiss.Index:
    """The untrained index of a build; ``codes``: the (V, d) code vectors, for codebook keys."""
    return spec.empty_index(config, unit_codebook(codes) if codes is not None else None)


def _set_aside(directory: Path) -> None:
    """For ``--overwrite``: move the database in ``directory`` into the build's state folder, where it stays
    until the new build is complete, and comes back if the build fails; an interrupted build is removed."""
    if (directory / STATE_DIR / PREVIOUS_DIR).exists():  # an interrupted --overwrite: its database comes back first
        _restore_previous(directory)
    if not (directory / MANIFEST_FILE).exists():
        clear_database(directory)
        return
    shutil.rmtree(directory / STATE_DIR, ignore_errors=True)
    partial = directory / STATE_DIR / f"{PREVIOUS_DIR}.partial"  # renamed once every file is in
    partial.mkdir(parents=True)
    for path in _database_files(directory):  # the manifest first: a half-moved database does not load
        path.rename(partial / path.name)
    partial.rename(directory / STATE_DIR / PREVIOUS_DIR)


def _restore_previous(directory: Path) -> None:
    """Put back the database an ``--overwrite`` build set aside, removing what that build wrote."""
    for path in _database_files(directory):
        _remove(path)
    restoring = directory / STATE_DIR / f"{PREVIOUS_DIR}.restoring"  # what the build wrote is gone
    (directory / STATE_DIR / PREVIOUS_DIR).rename(restoring)
    _move_back(restoring)
    logger.warning("the database that was in %s is back in place", directory)


def _move_back(held: Path) -> None:
    """Move a set-aside database's files back into the database folder, the manifest last; end its build."""
    directory = held.parent.parent
    for path in sorted(held.iterdir(), key=lambda path: path.name == MANIFEST_FILE):
        path.rename(directory / path.name)
    shutil.rmtree(directory / STATE_DIR)


def _recover(directory: Path) -> None:
    """Finish what a kill interrupted while a database was being set aside or put back."""
    state = directory / STATE_DIR
    for unfinished in (state / f"{PREVIOUS_DIR}.partial", state / f"{PREVIOUS_DIR}.restoring"):
        if unfinished.exists():  # only the old database's files were moving: move the rest back
            _move_back(unfinished)
    if (state / PREVIOUS_DIR).exists() and not (state / PLAN_FILE).exists():  # set aside, the build not begun
        _restore_previous(directory)


def _undo(directory: Path, plan: dict, merging: bool) -> None:
    """After a failed build or add: put back the database an --overwrite build replaced; forget an add that
    failed before its merge (its token shards and state), so the database takes further adds."""
    if (directory / STATE_DIR / PREVIOUS_DIR).exists():
        _restore_previous(directory)
    elif plan["kind"] == "add" and not merging and not (directory / BASE_FILE).exists():  # no merge begun, ever
        for shard in plan["shards"]:
            (directory / token_file(shard["index"])).unlink(missing_ok=True)
        shutil.rmtree(directory / STATE_DIR)


def _shard_number(file: str) -> int:
    return int(Path(file).stem.rsplit("-", 1)[1])


def _check_resumable(plan: dict, kind: str, inputs: list[str], spec: DatabaseSpec, config: BuildConfig) -> None:
    """Refuse to resume a plan made for other inputs or settings: the result would be neither build."""
    differences = [
        name
        for name, planned, now in (
            ("arrag database format", plan.get("version"), MANIFEST_VERSION),  # a build from an older arrag
            ("operation", plan["kind"], kind),
            ("inputs", plan["inputs"], inputs),
            ("tokenizer, grid or neighbourhood", plan["spec"], spec.to_dict()),
            ("index", plan["index"], config.index.to_dict()),
            ("shard size or Parquet columns", plan["sources"], asdict(config.sources)),
        )
        if planned != now
    ]
    if differences:
        raise ValueError(
            f"the interrupted {plan['kind']} was started with other {', '.join(differences)}; resume it with the "
            f"same command (inputs: {' '.join(plan['inputs'])}; index: {plan['index']['description']}; shard size: "
            f"{plan['sources']['shard_size']}) or start again with --overwrite"
        )


def _run(
    directory: Path,
    plan: dict,
    loaded: Backend,
    backend: Backend | BackendRef,
    config: BuildConfig,
    on_shard_done: ShardCallback | None,
) -> BuildReport:
    start = time.perf_counter()
    spec = DatabaseSpec.from_dict(plan["spec"])
    index_config = IndexConfig.from_dict(plan["index"])
    shards = [ShardSpec.from_dict(shard) for shard in plan["shards"]]
    resumed = sum(tokenized_record(directory, shard.index).exists() for shard in shards)
    report = BuildReport(shards=len(shards), shards_resumed=resumed, engine=config.engine, ignored=plan["ignored"])
    codes = code_table(loaded) if spec.key_source == "codebook" else None

    def tokenized_path(task: dict) -> Path:
        return tokenized_record(directory, task["index"])

    merging = False
    try:
        with make_engine(config.engine, config.address) as engine:
            clock = time.perf_counter()
            tokenizer = loaded if isinstance(engine, LocalEngine) or not isinstance(backend, BackendRef) else backend
            stage = TokenizeStage(tokenizer, TokenizeJob(str(directory), config.batch_size, spec.key_source))
            _run_stage(engine, stage, [shard.to_dict() for shard in shards], tokenized_path, on_shard_done)
            records = [json.loads(tokenized_path(shard.to_dict()).read_text()) for shard in shards]
            report.stage_seconds["tokenize"] = round(time.perf_counter() - clock, 3)
            report.images_added = sum(record["images"] for record in records)
            report.skipped = [skip for record in records for skip in record["skipped"]]
            if report.images_added == 0:
                if plan["kind"] == "build" and not (directory / STATE_DIR / PREVIOUS_DIR).exists():
                    clear_database(directory)  # nothing worth resuming was made
                raise ValueError(
                    f"none of the {len(report.skipped)} items could be read as an image; see the warnings above"
                    if report.skipped
                    else f"the inputs hold no images: {', '.join(plan['inputs'])}"
                )
            firsts = np.cumsum([plan["first_image"]] + [record["images"] for record in records])[:-1].tolist()
            clock = time.perf_counter()
            template = _template(directory, plan, spec, index_config, codes, records)
            report.stage_seconds["train"] = round(time.perf_counter() - clock, 3)
            job = IndexJob(str(directory), spec, index_config, str(template), codes)
            tasks = [
                {"shard": r["shard"], "first_image": f} for r, f in zip(records, firsts, strict=True) if r["images"]
            ]
            clock = time.perf_counter()
            _run_stage(
                engine, IndexStage(job), tasks, lambda task: index_shard_file(directory, task["shard"]), on_shard_done
            )
            report.stage_seconds["index"] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()
        merging = True
        database = _merge(directory, plan, spec, index_config, template, records, firsts)
    except Exception:
        _undo(directory, plan, merging)
        raise
    report.entries = len(database) - plan["first_image"] * len(spec.neighbourhood.eligible(spec.grid))
    report.stage_seconds["merge"] = round(time.perf_counter() - clock, 3)
    report.seconds = round(time.perf_counter() - start, 3)
    report.index = index_config.description + (" (on disk)" if index_config.on_disk else "")
    report.bytes_per_entry = round(index_bytes(directory) / max(len(database), 1), 3)
    write_json(directory / REPORT_FILE, asdict(report))
    shutil.rmtree(directory / STATE_DIR)  # the database is complete: from here on, resuming has nothing to do
    _remove_leftovers(directory, plan)
    logger.info("%s: %d images, %d entries in %.1f s", directory, report.images_added, report.entries, report.seconds)
    return report


def _run_stage(
    engine: LocalEngine | RayEngine,
    stage: TokenizeStage | IndexStage,
    tasks: list[dict],
    output: Callable[[dict], Path],
    on_shard_done: ShardCallback | None,
) -> None:
    """Run ``stage`` on the tasks whose ``output`` file does not exist yet, with a progress bar."""
    pending = [task for task in tasks if not output(task).exists()]
    unit = "img" if stage.name == "tokenize" else "entry"
    done, clock = 0, time.perf_counter()
    with tqdm(total=len(tasks), initial=len(tasks) - len(pending), desc=stage.name, unit="shard") as progress:
        for record in engine.run(stage, pending):
            done += record.get("images", record.get("entries", 0))
            progress.update(1)
            progress.set_postfix_str(f"{done / max(time.perf_counter() - clock, 1e-9):,.0f} {unit}/s")
            if on_shard_done is not None:
                on_shard_done(stage.name, record)


def _template(
    directory: Path,
    plan: dict,
    spec: DatabaseSpec,
    config: IndexConfig,
    codes: np.ndarray | None,
    records: list[dict],
) -> Path:
    """The trained empty index, made once per build (an add reuses the database's own)."""
    path = directory / STATE_DIR / TEMPLATE_FILE
    if path.exists():
        return path
    existing = directory / TEMPLATE_FILE
    if plan["kind"] == "add" and existing.exists():
        write_atomically(path, lambda tmp: shutil.copyfile(existing, tmp))
        return path
    index = _empty_index(spec, config, codes)
    if not index.is_trained:
        if plan["kind"] == "add":
            raise ValueError(f"{directory} has no {TEMPLATE_FILE} to add to its {config.description} index")
        job = IndexJob(str(directory), spec, config, "", codes)
        sample = _training_sample(directory, job, records, config.train_size, plan["seed"])
        logger.info("training %s on %d keys", config.description, len(sample))
        indexes.train(index, config, sample, plan["seed"])
    write_atomically(path, lambda tmp: faiss.write_index(index, str(tmp)))
    return path


def _training_sample(directory: Path, job: IndexJob, records: list[dict], size: int, seed: int) -> np.ndarray:
    """(≤ size, D) keys of random images from up to ``TRAIN_SHARDS`` random shards."""
    rng = np.random.default_rng(seed)
    filled = [record for record in records if record["images"]]
    chosen = [filled[i] for i in sorted(rng.permutation(len(filled))[:TRAIN_SHARDS])]
    per_image = len(job.spec.neighbourhood.eligible(job.spec.grid))
    take = math.ceil(math.ceil(size / per_image) / len(chosen))
    keys = []
    for record in chosen:
        shard = read_token_shard(directory / record["file"], job.spec.cell_dim, ("tokens", "latents"))
        pick = np.sort(rng.choice(len(shard.tokens), min(take, len(shard.tokens)), replace=False))
        latents = shard.latents[pick] if shard.latents is not None else None
        keys += [entries.keys for entries in shard_entries(job, TokenShard([], shard.tokens[pick], latents), 0)]
    sample = np.concatenate(keys)
    return sample[np.sort(rng.choice(len(sample), size, replace=False))] if len(sample) > size else sample


def _merge(
    directory: Path,
    plan: dict,
    spec: DatabaseSpec,
    config: IndexConfig,
    template: Path,
    records: list[dict],
    firsts: list[int],
) -> PatchDatabase:
    """Merge the index shards (after the database's own index, for an add) and save the database."""
    parts = [index_shard_file(directory, record["shard"]) for record in records if record["images"]]
    base_sources: list[str] = []
    entry_tokens: list[np.ndarray] = []  # next tokens, base then shard by shard (indexes without ids)
    if plan["kind"] == "add":
        base = directory / BASE_FILE
        if not base.exists():  # the index before this add; a killed merge may already have replaced INDEX_FILE
            write_atomically(base, lambda tmp: shutil.copyfile(directory / INDEX_FILE, tmp))
        parts.insert(0, base)
        base_sources = json.loads((directory / SOURCES_FILE).read_text())[: plan["first_image"]]
        base_tokens = load_next_tokens(directory)
        if base_tokens is not None:
            entry_tokens.append(base_tokens[: plan["first_image"] * len(spec.neighbourhood.eligible(spec.grid))])
    if config.on_disk:
        ivfdata = directory / plan["ivfdata"]
        ivfdata.unlink(missing_ok=True)  # left by a merge that was killed
        base_index = indexes.read_index(parts.pop(0)) if plan["kind"] == "add" else None
        index = indexes.merge_on_disk(indexes.read_index(template), parts, ivfdata, base_index)
    else:
        index = indexes.read_index(parts.pop(0) if plan["kind"] == "add" else template)
        for part in tqdm(parts, desc="merge", unit="shard"):
            indexes.merge_into(index, indexes.read_index(part))
    sources = list(base_sources)
    token_shards = list(plan["base_token_shards"])
    ids_carry_tokens = indexes.stores_ids(index)
    for record, first in zip(records, firsts, strict=True):
        if record["images"]:
            columns = ("source",) if ids_carry_tokens else ("source", "tokens")
            shard = read_token_shard(directory / record["file"], spec.cell_dim, columns)
            sources += shard.names
            if not ids_carry_tokens:
                entry_tokens.append(next_tokens(spec, shard.tokens))
            token_shards.append({"file": record["file"], "first_image": first, "images": record["images"]})
        else:
            (directory / record["file"]).unlink(missing_ok=True)
    database = PatchDatabase(
        spec,
        index,
        sources,
        config,
        token_shards=token_shards,
        preprocessing=plan["preprocessing"],
        next_tokens=np.concatenate(entry_tokens) if entry_tokens else None,
    )
    database.save(directory)
    if not (directory / TEMPLATE_FILE).exists():
        write_atomically(directory / TEMPLATE_FILE, lambda tmp: shutil.copyfile(template, tmp))
    return database


def _remove_leftovers(directory: Path, plan: dict) -> None:
    """After a complete add: the index before it and inverted-list files no index refers to any more."""
    (directory / BASE_FILE).unlink(missing_ok=True)
    for stale in directory.glob("*.ivfdata"):
        if stale.name != plan["ivfdata"]:
            stale.unlink()
