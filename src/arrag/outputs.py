"""Where a run's output goes, never over an earlier run's: fresh numbered run folders, image names, :func:`save`.

A command given no folder writes into a fresh ``run-NNNN`` (numbered after the highest there); a folder given
that holds an earlier run's output is refused unless ``overwrite``. Generated images are written as they are
finished: a PNG (its metadata in the ``arrag`` text chunk) and a JSON sidecar each, named by the prompt's index,
a slug of the prompt and the image's number, ``003-a-red-7-image01.png``.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from arrag.images import read_metadata, save_image
from arrag.metadata import Settings, image_metadata

if TYPE_CHECKING:
    import torch

    from arrag.decoding.loop import GenerationOutput
    from arrag.retrieval.database import PatchDatabase

SAMPLES = Path("samples")  # where generated images go by default, one run folder each
RUN_FOLDER = re.compile(r"run-(\d+)")
SLUG_LENGTH = 40


def fresh_run_folder(parent: Path) -> Path:
    """Make and return ``parent/run-NNNN``, numbered after the highest run there: a number is never reused."""
    parent.mkdir(parents=True, exist_ok=True)
    numbers = [int(match[1]) for entry in parent.iterdir() if (match := RUN_FOLDER.fullmatch(entry.name))]
    number = max(numbers, default=0) + 1
    while True:
        folder = parent / f"run-{number:04d}"
        try:
            folder.mkdir()
        except FileExistsError:  # a run started at the same moment took it
            number += 1
        else:
            return folder


def check_folder(path: Path) -> None:
    """Refuse a folder to write into that is a file."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a folder; write to a folder (out=DIR)")


def check_out(out: Path, overwrite: bool, earlier: Callable[[Path], bool]) -> None:
    """Refuse, before any work, an ``out`` that is a file, or that holds an earlier run (``earlier(out)``) unless
    ``overwrite``."""
    check_folder(out)
    if not overwrite and out.is_dir() and earlier(out):
        raise FileExistsError(
            f"{out} holds an earlier run's output; pass overwrite=True to replace it, or write to another folder "
            "(out=DIR)"
        )


def made_by_arrag(path: Path) -> bool:
    """Whether ``path`` is a PNG that carries arrag's metadata."""
    try:
        return bool(read_metadata(path))
    except (OSError, ValueError):  # not a readable PNG, or a text chunk that is not arrag's JSON
        return False


def holds_images(folder: Path) -> bool:
    """Whether ``folder`` holds images arrag made."""
    return any(made_by_arrag(path) for path in folder.glob("*.png"))


def slug(prompt: str, length: int = SLUG_LENGTH) -> str:
    """A short file-name form of ``prompt``: its ASCII letters and digits, lower case, words joined by '-'."""
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode().lower()
    text = "-".join(re.findall(r"[a-z0-9]+", text))
    if len(text) > length:  # cut at a word's end where there is one
        cut = text[: length + 1]
        text = cut.rsplit("-", 1)[0] if "-" in cut else text[:length]
    return text or "prompt"


def write_image(image: torch.Tensor, path: Path, metadata: dict) -> None:
    """A PNG and its JSON sidecar, each written under a hidden name and renamed into place (sidecar first): an
    interrupted write leaves no half-written file, and a PNG that is there has its sidecar."""
    partial_png, partial_json = (path.with_name(f".{path.name}.partial{suffix}") for suffix in ("", ".json"))
    try:
        save_image(image, partial_png, metadata, sidecar=False)
        partial_json.write_text(json.dumps(metadata, indent=2))
        os.replace(partial_json, path.with_suffix(".json"))
        os.replace(partial_png, path)
    except BaseException:  # Ctrl-C included
        partial_png.unlink(missing_ok=True)
        partial_json.unlink(missing_ok=True)
        raise


class ImageWriter:
    """Writes one request's images into a folder as its batches are finished.

    ``rows``: the request's number of images (names are padded so that they sort in request order).
    ``out``: the folder, refused here if it is a file, or holds images arrag made and not ``overwrite`` (then they
    and their sidecars are removed at the first write); None: a fresh run folder under ``runs``. The folder is
    made at the first write, so a request that fails before leaves nothing behind.
    """

    def __init__(
        self,
        settings: Settings,
        rows: int,
        out: Path | None = None,
        database: PatchDatabase | None = None,
        overwrite: bool = False,
        runs: Path = SAMPLES,
    ):
        if out is None:
            check_folder(runs)
        else:
            check_out(out, overwrite, holds_images)
        self.settings, self.rows, self.out, self.database = settings, rows, out, database
        self.overwrite, self.runs = overwrite, runs
        self.folder: Path | None = None  # where the images are, once the first is written
        self.written = 0
        n = settings.config.num_images_per_prompt
        self._widths = (max(3, len(str(max(rows // n - 1, 0)))), max(2, len(str(n - 1))))

    def name(self, row: int, prompt: str) -> str:
        """The file name of the request's row ``row``: prompt index, slug, image number."""
        prompt_index, image = divmod(row, self.settings.config.num_images_per_prompt)
        width, image_width = self._widths
        return f"{prompt_index:0{width}d}-{slug(prompt)}-image{image:0{image_width}d}.png"

    def write(self, output: GenerationOutput) -> list[Path]:
        """Write ``output``'s images, the request's next rows; returns their paths."""
        if self.written + len(output.prompts) > self.rows:
            raise ValueError(f"the request has {self.rows} images; {self.written + len(output.prompts)} were given")
        folder = self.folder or self._open()
        paths = []
        for row in range(len(output.prompts)):
            path = folder / self.name(self.written, output.prompts[row])
            write_image(output.images[row], path, image_metadata(output, row, self.settings, self.database))
            self.written += 1
            paths.append(path)
        return paths

    def _open(self) -> Path:
        if self.out is None:
            self.folder = fresh_run_folder(self.runs)
            return self.folder
        self.out.mkdir(parents=True, exist_ok=True)
        if self.overwrite:  # the earlier run's images go: the folder holds one run's
            for path in filter(made_by_arrag, self.out.glob("*.png")):
                path.unlink()
                path.with_suffix(".json").unlink(missing_ok=True)
        self.folder = self.out
        return self.folder


def save(
    output: GenerationOutput,
    settings: Settings,
    folder: Path | str | None = None,
    database: PatchDatabase | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write a :func:`arrag.generate` output's images as ``arrag generate`` does: a PNG with its metadata (prompt,
    seed, ``settings``, tokens, and the provenance of each token in ``database``) and a JSON sidecar each.

    ``folder``: refused if it holds images arrag made, unless ``overwrite`` (which replaces them); None: a fresh
    run folder under ``samples``. Returns the PNGs' paths.
    """
    writer = ImageWriter(settings, len(output.prompts), None if folder is None else Path(folder), database, overwrite)
    return writer.write(output)
