"""Building a patch database from image files through a backend's tokenizer."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from arrag.backends.base import Backend
from arrag.database import MANIFEST_FILE, DatabaseSpec, PatchDatabase
from arrag.grid import Neighbourhood
from arrag.images import ImageReadError, find_images, read_image
from arrag.keys import KeySource

logger = logging.getLogger(__name__)

REPORT_FILE = "build-report.json"


@dataclass
class BuildReport:
    images_added: int = 0
    entries: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"} per unreadable file
    seconds: float = 0.0


def add_images(database: PatchDatabase, backend: Backend, images: torch.Tensor, names: list[str]) -> None:
    """Tokenize (N, 3, H, W) images in [-1, 1] and add their patches to the database."""
    tokens = backend.encode(images)  # (N, R·C)
    if database.spec.key_source == "codebook":
        vectors = backend.code_vectors(tokens)  # (N, R·C, d)
    else:
        vectors = backend.encode_latents(images)
    database.add(tokens.cpu(), vectors.float().cpu(), names)


def _batches(
    paths: list[Path], backend: Backend, size: int, report: BuildReport
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Preprocessed (N, 3, H, W) batches of the readable images; unreadable ones go to the report."""
    images: list[torch.Tensor] = []
    names: list[str] = []
    for path in paths:
        try:
            images.append(backend.preprocess(read_image(path)))
            names.append(str(path))
        except ImageReadError as error:
            logger.warning("skipping %s: %s", path, error)
            report.skipped.append({"path": str(path), "reason": str(error)})
        if len(images) == size:
            yield torch.stack(images), names
            images, names = [], []
    if images:
        yield torch.stack(images), names


def build_database(
    backend: Backend,
    inputs: list[Path],
    out: Path,
    neighbourhood: Neighbourhood | None = None,
    key_source: KeySource = "codebook",
    batch_size: int = 32,
    overwrite: bool = False,
) -> BuildReport:
    """Tokenize every image under ``inputs``, write a database to ``out`` and a report beside it."""
    if (out / MANIFEST_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a patch database; choose another --out or pass --overwrite")
    start = time.perf_counter()
    paths = find_images(inputs)
    if not paths:
        raise ValueError(f"no image files found in {', '.join(map(str, inputs))}")
    database = PatchDatabase(DatabaseSpec.for_backend(backend, neighbourhood, key_source))
    report = BuildReport()
    with tqdm(total=len(paths), desc="tokenizing", unit="img") as progress:
        for images, names in _batches(paths, backend, batch_size, report):
            add_images(database, backend, images, names)
            progress.update(database.num_images + len(report.skipped) - progress.n)
        progress.update(len(paths) - progress.n)
    if database.num_images == 0:
        raise ValueError(f"none of the {len(paths)} files could be read as an image; see the warnings above")
    report.images_added, report.entries = database.num_images, len(database)
    report.seconds = round(time.perf_counter() - start, 3)
    database.save(out)
    (out / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2))
    return report
