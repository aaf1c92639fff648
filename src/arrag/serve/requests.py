"""The web app's work as pure functions: a request -> base and retrieval images with verdicts and provenance
maps; a click on a map -> the database patch its token came from; a database's calibrated DAiD setting; errors
as one line.

Nothing here imports Gradio (:mod:`arrag.serve.layout` wires these functions to the page). Everything a request
needs travels in its arguments; what requests share is a :class:`Library` of backends, databases and the world's
checker, loaded once and only read afterwards.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from threading import Lock

import numpy as np
from PIL import Image

from arrag.backends import Backend, load_backend, parse_name
from arrag.config import METHODS, GenerationConfig, Method, RetrievalConfig
from arrag.decoding.loop import GenerationOutput, generate
from arrag.decoding.weights import AdaptiveWeight
from arrag.evaluation.calibration.report import CALIBRATION_FILE
from arrag.evaluation.calibration.tuning import DaidSetting
from arrag.faid.blender import FaidAdapter
from arrag.faid.files import shipped_adapter
from arrag.images import save_image, to_pil
from arrag.metadata import Settings, image_metadata
from arrag.retrieval.database import PatchDatabase, read_manifest
from arrag.retrieval.grid import Grid
from arrag.retrieval.layout import DatabaseLayout
from arrag.serve.captions import parse_caption
from arrag.serve.provenance import (
    PatchSource,
    Provenance,
    SourceImages,
    cell_at,
    display_scale,
    heat_map,
    outlined,
    write_provenance,
)
from arrag.world.checker import WorldChecker
from arrag.world.report import load_checker
from arrag.world.scenes import SCENE_SIZE

logger = logging.getLogger(__name__)

MAX_PROMPTS = 8  # per request: a shared server serves everyone in turn
MAX_IMAGES = 4  # per prompt
METHOD_LABELS: dict[Method, str] = {"none": "none", "daid": "DAiD", "faid": "FAiD", "faid+daid": "FAiD+DAiD"}
WORLD_DATABASES = "world-db-*"  # the built-in world's databases in the cache folder
Progress = Callable[[float, str], None]  # (fraction done, what is being done)


# ---------------------------------------------------------------------------------------------------------
# Databases and their calibration


@dataclass(frozen=True)
class DatabaseChoice:
    """A patch database the page offers: its folder, the backend it was built for and its size."""

    path: Path
    backend: str
    images: int

    @classmethod
    def read(cls, path: Path) -> DatabaseChoice:
        """The database in ``path`` (FileNotFoundError / ValueError, with the fix, if it is none)."""
        manifest = read_manifest(path)
        return cls(Path(path), manifest["spec"]["backend"], int(manifest["counts"]["images"]))

    @property
    def label(self) -> str:
        return f"{self.path.name} ({self.backend}, {self.images} images)"


def find_databases(cache: Path, extra: Sequence[Path] = ()) -> tuple[DatabaseChoice, ...]:
    """The databases ``extra`` names, then the world databases cached in ``cache`` (``world-db-*`` folders holding
    a manifest)."""
    cached = [path for path in sorted(cache.glob(WORLD_DATABASES)) if DatabaseLayout(path).manifest.is_file()]
    found: list[DatabaseChoice] = []
    for path in cached:
        try:
            found.append(DatabaseChoice.read(path))
        except (OSError, ValueError) as error:  # a stale cache entry is skipped, not fatal
            logger.warning("skipping %s: %s", path, error)
    return (*(DatabaseChoice.read(path) for path in extra), *found)


def calibrated_retrieval(directory: Path) -> RetrievalConfig | None:
    """The DAiD setting ``calibration.json`` in a database folder chose (with its λ rule); None when the
    folder has none, when calibration chose the model alone, or when the file cannot be read (logged)."""
    path = Path(directory) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        setting = json.loads(path.read_text())["chosen"]["setting"]
        if setting is None:
            return None
        rule = AdaptiveWeight.from_dict(setting["weight"])
        return DaidSetting(
            setting["duplicates"], float(setting["temperature"]), int(setting["k"]), rule
        ).retrieval_config()
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring %s: %s", path, error)
        return None


def prefilled_retrieval(directory: str | Path | None) -> tuple[RetrievalConfig, str]:
    """The DAiD settings the page starts from for a database, and a line saying where they come from."""
    chosen = calibrated_retrieval(Path(directory)) if directory else None
    if chosen is None:
        return RetrievalConfig(), "DAiD settings: arrag's defaults (no calibration.json chose a setting)"
    return chosen, "DAiD settings: prefilled from the database's calibration.json"


# ---------------------------------------------------------------------------------------------------------
# Requests


def _whole(name: str, value: object, low: int, high: float = math.inf) -> int:
    """A whole number from the page (numbers arrive as floats or None) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {int(value)}")
    return int(value)


@dataclass(frozen=True)
class Request:
    """One press of Generate: the prompts, each drawn ``images_per_prompt`` times with the model alone and with
    ``method``, the same seeds for both (image i of the request is seeded ``seed + i``)."""

    prompts: tuple[str, ...]
    backend: str
    database: Path | None = None
    method: Method = "daid"
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    seed: int = 0
    images_per_prompt: int = 1

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("no prompts given; type one per line")
        if any(not prompt.strip() for prompt in self.prompts):
            raise ValueError("a prompt is empty; give every image a description")
        if len(self.prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts a request, got {len(self.prompts)}")
        if not self.backend:
            raise ValueError("choose a backend")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method != "none" and self.database is None:
            raise ValueError(f"method {self.method!r} needs a patch database (build one with arrag db build)")
        if not isinstance(self.retrieval, RetrievalConfig):
            raise ValueError(f"retrieval must be a RetrievalConfig, got {type(self.retrieval).__name__}")
        _whole("the seed", self.seed, 0)
        _whole("images per prompt", self.images_per_prompt, 1, MAX_IMAGES)

    @classmethod
    def from_form(
        cls,
        prompts: str,
        backend: str,
        database: str | None,
        method: str,
        weight: float | None,
        tau: float | None,
        k: float | None,
        duplicates: str,
        seed: float | None,
        images: float | None,
    ) -> Request:
        """The request the page's fields describe (prompts one per line; blank lines are ignored)."""
        return cls(
            prompts=tuple(line.strip() for line in (prompts or "").splitlines() if line.strip()),
            backend=(backend or "").strip(),
            database=Path(database) if database else None,
            method=method,  # type: ignore[arg-type]
            retrieval=RetrievalConfig(weight, tau, _whole("k", k, 1), duplicates),  # type: ignore[arg-type]
            seed=_whole("the seed", seed, 0),
            images_per_prompt=_whole("images per prompt", images, 1, MAX_IMAGES),
        )

    def config(self, method: Method) -> GenerationConfig:
        """The generation config of one column: ``none`` (the model alone) or the request's method."""
        return GenerationConfig(
            method=method, retrieval=self.retrieval, num_images_per_prompt=self.images_per_prompt, seed=self.seed
        )


# ---------------------------------------------------------------------------------------------------------
# What requests share


class Library:
    """Backends by name, databases by folder (with their images for thumbnails), FAiD adapters and the world's
    checker: loaded on first use, then only read. A backend generates for one request at a time (FAiD attaches
    its hooks to the backend's layers for a call)."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._lock = Lock()
        self._backends: dict[str, Backend] = {}
        self._databases: dict[Path, PatchDatabase] = {}
        self._sources: dict[tuple[Path, str], SourceImages] = {}
        self._adapters: dict[str, FaidAdapter | None] = {}
        self._generating: dict[str, Lock] = {}
        self._checker: WorldChecker | None = None

    def backend(self, name: str) -> Backend:
        with self._lock:
            if name not in self._backends:
                backend = load_backend(name, self.device)
                self._backends[name] = self._backends[backend.name] = backend
            return self._backends[name]

    def database(self, path: Path) -> PatchDatabase:
        path = Path(path).resolve()
        with self._lock:
            if path not in self._databases:
                self._databases[path] = PatchDatabase.load(path)
            return self._databases[path]

    def sources(self, path: Path, backend: Backend) -> SourceImages:
        database = self.database(path)
        with self._lock:
            key = (Path(path).resolve(), backend.name)
            if key not in self._sources:
                self._sources[key] = SourceImages(database, backend, Path(path))
            return self._sources[key]

    def adapter(self, backend: Backend) -> FaidAdapter:
        with self._lock:
            if backend.name not in self._adapters:
                self._adapters[backend.name] = shipped_adapter(backend)
            adapter = self._adapters[backend.name]
        if adapter is None:
            raise ValueError(f"FAiD needs an adapter and none is shipped for backend {backend.name!r}; use DAiD")
        return adapter

    def checker(self) -> WorldChecker:
        with self._lock:
            if self._checker is None:
                self._checker = load_checker()
            return self._checker

    def generating(self, backend: Backend) -> Lock:
        with self._lock:
            return self._generating.setdefault(backend.name, Lock())


def verdict(library: Library, backend: Backend, prompt: str, image: np.ndarray) -> bool | None:
    """The world checker's verdict on an (H, W, 3) uint8 image of ``prompt``; None where it does not apply: a
    prompt that is no world caption, or an image that is no 64×64 scene of the built-in world's model."""
    caption = parse_caption(prompt)
    world_scene = parse_name(backend.name)[0] == "builtin" and image.shape[:2] == (SCENE_SIZE, SCENE_SIZE)
    return library.checker().judge(caption, image) if caption is not None and world_scene else None


# ---------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Picture:
    """One generated image as the page shows it."""

    prompt: str
    seed: int
    image: np.ndarray  # (H, W, 3) uint8
    verdict: bool | None  # the world checker's; None where it does not apply

    @property
    def caption(self) -> str:
        judged = {True: "✓ correct · ", False: "✗ wrong · ", None: ""}[self.verdict]  # first: long prompts are cut
        return f"{judged}seed {self.seed} · {self.prompt}"


@dataclass(frozen=True)
class Column:
    """The images of one method for every row of the request, with what made them."""

    method: Method
    output: GenerationOutput
    settings: Settings
    pictures: tuple[Picture, ...]


def column_title(method: Method) -> str:
    """How progress names a column: the model alone, or with the method."""
    return "model alone" if method == "none" else f"with {METHOD_LABELS[method]}"


@dataclass(frozen=True)
class Result:
    """A served request: the model alone and, unless the method is ``none``, with retrieval; same seeds."""

    request: Request
    backend: str  # the backend's name
    grid: Grid
    base: Column
    retrieval: Column | None

    def provenance(self, row: int) -> Provenance:
        if self.retrieval is None:
            raise ValueError("this request used no retrieval (method none): there is no provenance to show")
        if not 0 <= row < len(self.retrieval.pictures):
            raise ValueError(f"image {row + 1} does not exist; this request made {len(self.retrieval.pictures)}")
        return Provenance.of(self.retrieval.output.records, row, self.grid)


def _rows_done(progress: Progress | None, label: str, before: int, total: int, grid: Grid) -> Callable[[], None]:
    """``generate``'s on_step for one column of a request: tells ``progress`` each time a token row is done."""
    steps = itertools.count(1)

    def step() -> None:
        done = next(steps)
        if progress is not None and done % grid.cols == 0:
            progress((before + done) / total, f"{label}: row {done // grid.cols} of {grid.rows}")

    return step


def _column(
    library: Library,
    backend: Backend,
    request: Request,
    method: Method,
    database: PatchDatabase | None,
    faid: FaidAdapter | None,
    on_step: Callable[[], None],
) -> Column:
    """Generate the request's rows with ``method`` (``none``: the model alone) and judge them."""
    config = request.config(method)
    retrieving = method != "none"
    output = generate(
        backend, list(request.prompts), config, database if retrieving else None, faid=faid, on_step=on_step
    )
    name = str(request.database) if retrieving else None
    settings = Settings(backend.name, config, name, "shipped" if faid is not None else None)
    pictures = []
    for row, (prompt, seed) in enumerate(zip(output.prompts, output.seeds, strict=True)):
        image = np.asarray(to_pil(output.images[row]))
        pictures.append(Picture(prompt, seed, image, verdict(library, backend, prompt, image)))
    return Column(method, output, settings, tuple(pictures))


def run(library: Library, request: Request, progress: Progress | None = None) -> Result:
    """Serve one request: its images with the model alone and with the request's method, and their verdicts;
    ``progress`` hears of every token row done."""
    backend = library.backend(request.backend)
    database = None
    if request.method != "none":
        database = library.database(request.database)  # type: ignore[arg-type]
        database.check_backend(backend)
    faid = library.adapter(backend) if request.config(request.method).uses_faid else None
    methods: list[Method] = ["none"] if request.method == "none" else ["none", request.method]
    positions = backend.grid.size
    columns = []
    with library.generating(backend):
        for i, method in enumerate(methods):
            on_step = _rows_done(progress, column_title(method), i * positions, len(methods) * positions, backend.grid)
            uses_faid = request.config(method).uses_faid
            columns.append(_column(library, backend, request, method, database, faid if uses_faid else None, on_step))
    return Result(request, backend.name, backend.grid, columns[0], columns[1] if len(columns) > 1 else None)


# ---------------------------------------------------------------------------------------------------------
# Provenance in the page


@dataclass(frozen=True)
class PatchView:
    """What the page shows for a selected patch: the map with it outlined, the database image its token came
    from with the source patch outlined (None where there is none to show), and a line about it."""

    patch: PatchSource
    map: Image.Image
    source: Image.Image | None
    text: str


def provenance_map(result: Result, row: int) -> Image.Image:
    """Retrieval image ``row``'s heat map of the retrieval share per patch."""
    return heat_map(result.retrieval.pictures[row].image, result.provenance(row))  # type: ignore[union-attr]


def select_patch(library: Library, result: Result, row: int, x: float, y: float) -> PatchView:
    """The patch under pixel (x, y) of retrieval image ``row``'s heat map, and where its token came from."""
    provenance = result.provenance(row)
    image = result.retrieval.pictures[row].image  # type: ignore[union-attr]
    scale = display_scale(image.shape[1])
    cell = cell_at(x, y, (image.shape[1] * scale, image.shape[0] * scale), result.grid)
    patch = provenance.source(cell)
    text, source = patch.describe(), None
    if patch.image_id is not None and patch.source_cell is not None:
        database = library.database(result.request.database)  # type: ignore[arg-type]
        name = database.sources[patch.image_id]
        pixels = library.sources(result.request.database, library.backend(result.backend))(patch.image_id)  # type: ignore[arg-type]
        if pixels is None:
            text += f" ({name}: the database keeps neither its tokens nor a readable file)"
        else:
            source, text = outlined(pixels, patch.source_cell, result.grid), f"{text} ({name})"
    return PatchView(patch, heat_map(image, provenance, cell), source, text)


def save_result(library: Library, result: Result, folder: Path) -> list[Path]:
    """Write every image as a PNG with its JSON sidecar (``arrag.metadata``), and beside each retrieval image its
    provenance picture; the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    n, written = result.request.images_per_prompt, []
    for column in (result.base, result.retrieval):
        if column is None:
            continue
        database = None if column.method == "none" else library.database(result.request.database)  # type: ignore[arg-type]
        method = column.method.replace("+", "-")
        paths = [
            folder / f"prompt{row // n:03d}-image{row % n:02d}-{method}.png" for row in range(len(column.pictures))
        ]
        for row, path in enumerate(paths):
            save_image(column.output.images[row], path, image_metadata(column.output, row, column.settings, database))
            written += [path, path.with_suffix(".json")]
        if database is not None:
            sources = library.sources(result.request.database, library.backend(result.backend))  # type: ignore[arg-type]
            written += write_provenance(column.output, paths, result.grid, sources)
    return written


def error_message(error: BaseException, wording: Callable[[str], str] = str) -> str:
    """An error as one line for the page, worded by ``wording`` (the CLI's :func:`arrag.cli.cli_message`)."""
    return " ".join(wording(str(error)).split())
