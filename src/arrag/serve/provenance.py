"""Provenance pictures: where the retrieved tokens of a generated image came from.

A generated image is an R×C grid of tokens. Per cell, :class:`arrag.decoding.loop.RetrievalRecords` say how much
of the sampled token's probability came from retrieval and which database patch fed it. This module draws that:
a heat map of the share over the image, a database image with its source patch outlined, and both in one
picture beside a generated PNG (``arrag generate --provenance``). Pure functions of arrays; no Gradio.

Shapes: (H, W, 3) uint8 images, (R, C) per-cell arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from threading import Lock

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from arrag.backends.base import Backend
from arrag.build.stages import read_token_shard
from arrag.decoding.loop import GenerationOutput, RetrievalRecords
from arrag.images import ImageReadError, read_image, to_pil
from arrag.retrieval.database import PatchDatabase
from arrag.retrieval.grid import Grid

DISPLAY = 256  # px: smaller images are enlarged (nearest neighbour) to at least this width
# Viridis at 0, ¼, ½, ¾ and 1: dark blue (nothing from retrieval) to yellow (all of it).
COLOURS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32)
NOT_RETRIEVED = (96, 96, 96)  # cells without a search (the neighbourhood falls off the grid) or without neighbours
SELECTED = (255, 64, 255)  # outline of the selected patch and of its source
Cell = tuple[int, int]  # (row, col) on the token grid
SourceLookup = Callable[[int], np.ndarray | None]  # database image id -> (H, W, 3) uint8, None if unavailable


def colour(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> their colours, (..., 3) uint8."""
    scaled = np.clip(values, 0.0, 1.0) * (len(COLOURS) - 1)
    low = np.minimum(np.floor(scaled).astype(int), len(COLOURS) - 2)
    fraction = (scaled - low)[..., None]
    return np.round(COLOURS[low] * (1 - fraction) + COLOURS[low + 1] * fraction).astype(np.uint8)


def display_scale(width: int) -> int:
    """The whole-number enlargement that shows an image ``width`` px wide at least :data:`DISPLAY` px wide."""
    return max(1, math.ceil(DISPLAY / width))


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """(H, W, 3) -> (H·scale, W·scale, 3), every pixel a square: token cells stay sharp."""
    return image.repeat(scale, axis=0).repeat(scale, axis=1)


@dataclass(frozen=True)
class PatchSource:
    """What one cell's token came from. ``share`` is None where nothing was retrieved; ``image_id``,
    ``source_cell`` and ``distance`` are None where no retrieved neighbour had the sampled token."""

    cell: Cell
    share: float | None
    image_id: int | None
    source_cell: Cell | None
    distance: float | None

    def describe(self) -> str:
        """One line for a person: the cell, its share, and its source."""
        where = f"patch (row {self.cell[0]}, col {self.cell[1]})"
        if self.share is None:
            return f"{where}: nothing was retrieved here (its neighbourhood falls off the grid, or no neighbours)"
        share = f"{self.share:.0%} of its token's probability came from retrieval"
        if self.image_id is None:
            return f"{where}: {share}; no retrieved neighbour was followed by this token"
        row, col = self.source_cell or (0, 0)
        return (
            f"{where}: {share}; source: database image {self.image_id}, patch (row {row}, col {col}), "
            f"squared distance {self.distance:.3g}"
        )


@dataclass(frozen=True)
class Provenance:
    """One generated image's provenance on its token grid."""

    grid: Grid
    share: np.ndarray  # (R, C) retrieval share in [0, 1]; NaN where nothing was retrieved
    image_ids: np.ndarray  # (R, C) database image of each token's source; -1 where none
    positions: np.ndarray  # (R, C) raster position of the source in that image; -1 where none
    distances: np.ndarray  # (R, C) squared distance of the source; NaN where none

    def __post_init__(self) -> None:
        shape = (self.grid.rows, self.grid.cols)
        for name in ("share", "image_ids", "positions", "distances"):
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(f"{name} must be {shape} for a {shape[0]}×{shape[1]} grid")

    @classmethod
    def of(cls, records: RetrievalRecords, row: int, grid: Grid) -> Provenance:
        """Row ``row`` of a generation's records."""

        def cells(values: torch.Tensor) -> np.ndarray:
            return values[row].cpu().numpy().reshape(grid.rows, grid.cols)

        return cls(
            grid,
            cells(records.retrieval_share),
            cells(records.image_ids),
            cells(records.positions),
            cells(records.distances),
        )

    def source(self, cell: Cell) -> PatchSource:
        """Where the token at ``cell`` came from."""
        r, c = cell
        if not (0 <= r < self.grid.rows and 0 <= c < self.grid.cols):
            raise ValueError(f"cell {cell} is outside the {self.grid.rows}×{self.grid.cols} token grid")
        share, image_id = float(self.share[r, c]), int(self.image_ids[r, c])
        if image_id < 0:
            return PatchSource(cell, None if math.isnan(share) else share, None, None, None)
        source_cell = self.grid.cell(int(self.positions[r, c]))
        return PatchSource(
            cell, None if math.isnan(share) else share, image_id, source_cell, float(self.distances[r, c])
        )

    def top(self, count: int) -> list[Cell]:
        """The ``count`` cells with a source that took the most from retrieval (ties: the nearest source)."""
        rows, cols = np.nonzero(self.image_ids >= 0)
        share = np.nan_to_num(self.share[rows, cols], nan=0.0)
        order = np.lexsort((self.distances[rows, cols], -share))[:count]
        return [(int(rows[i]), int(cols[i])) for i in order]


def cell_at(x: float, y: float, size: tuple[int, int], grid: Grid) -> Cell:
    """The token cell under pixel (x, y) of a picture of ``size`` (width, height) showing the whole grid."""
    width, height = size
    row = min(grid.rows - 1, max(0, int(y * grid.rows / height)))
    col = min(grid.cols - 1, max(0, int(x * grid.cols / width)))
    return row, col


def cell_box(cell: Cell, grid: Grid, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of ``cell`` in a picture of ``size`` (width, height), edges inclusive."""
    width, height = size
    r, c = cell
    return (
        c * width // grid.cols,
        r * height // grid.rows,
        (c + 1) * width // grid.cols - 1,
        (r + 1) * height // grid.rows - 1,
    )


def _outline(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:
    """A two-tone outline readable on dark and light pixels."""
    x0, y0, x1, y1 = box
    draw.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), outline=(0, 0, 0), width=1)
    draw.rectangle(box, outline=colour, width=2)


def heat_map(image: np.ndarray, provenance: Provenance, selected: Cell | None = None) -> Image.Image:
    """The image enlarged, each token cell tinted by its retrieval share (grey: nothing retrieved), cell edges
    drawn, and ``selected`` outlined. A pixel (x, y) of it lies in cell :func:`cell_at` (x, y, its size)."""
    grid, scale = provenance.grid, display_scale(image.shape[1])
    big = enlarge(image, scale).astype(np.float32)
    height, width = big.shape[:2]
    rows = np.arange(height) * grid.rows // height
    cols = np.arange(width) * grid.cols // width
    share = provenance.share[rows[:, None], cols[None, :]]  # (H', W')
    tint = np.where(np.isnan(share)[..., None], np.float32(NOT_RETRIEVED), colour(np.nan_to_num(share)))
    picture = Image.fromarray(np.round(0.35 * big + 0.65 * tint).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for r in range(1, grid.rows):
        draw.line((0, r * height // grid.rows, width, r * height // grid.rows), fill=(0, 0, 0))
    for c in range(1, grid.cols):
        draw.line((c * width // grid.cols, 0, c * width // grid.cols, height), fill=(0, 0, 0))
    if selected is not None:
        _outline(draw, cell_box(selected, grid, picture.size), SELECTED)
    return picture


def outlined(image: np.ndarray, cell: Cell, grid: Grid, size: int | None = None) -> Image.Image:
    """A database image enlarged (to ``size`` px wide if given), with the patch at ``cell`` outlined."""
    picture = Image.fromarray(enlarge(image, display_scale(image.shape[1])))
    if size is not None:
        picture = picture.resize((size, round(size * picture.height / picture.width)), Image.Resampling.LANCZOS)
    _outline(ImageDraw.Draw(picture), cell_box(cell, grid, picture.size), SELECTED)
    return picture


def colour_bar(width: int, height: int = 12) -> Image.Image:
    """The heat map's scale, 0 (left) to 1 (right)."""
    return Image.fromarray(np.repeat(colour(np.linspace(0, 1, width))[None], height, axis=0))


class SourceImages:
    """A database's images by id, as the database holds them: decoded from its token shards, or (a database
    without token shards) read from their source file; None where neither is available. Thread-safe."""

    def __init__(self, database: PatchDatabase, backend: Backend, directory: Path | None):
        self.database, self.backend, self.directory = database, backend, directory
        self._lock = Lock()
        self._shard = lru_cache(maxsize=4)(self._read_shard)

    def _read_shard(self, file: str) -> np.ndarray:
        assert self.directory is not None
        return read_token_shard(self.directory / file, self.backend.cell_dim, ("tokens",)).tokens

    def tokens(self, image_id: int) -> np.ndarray | None:
        """(R·C,) the tokens of database image ``image_id`` from its token shard; None without one."""
        if self.directory is None:
            return None
        for shard in self.database.token_shards:
            first = int(shard["first_image"])
            if first <= image_id < first + int(shard["images"]):
                with self._lock:
                    return self._shard(shard["file"])[image_id - first]
        return None

    def __call__(self, image_id: int) -> np.ndarray | None:
        if not 0 <= image_id < self.database.num_images:
            return None
        tokens = self.tokens(image_id)
        if tokens is not None:
            pixels = self.backend.decode(torch.from_numpy(tokens)[None])[0]  # (3, H, W) in [0, 1]
            return np.asarray(to_pil(pixels.float().cpu()))
        path = Path(self.database.sources[image_id])
        if not path.is_file():
            return None
        try:
            pixels = self.backend.preprocess(read_image(path))  # (3, S, S) in the preprocessing's value range
        except ImageReadError:
            return None
        low, high = self.backend.preprocessing.value_range
        return np.asarray(to_pil((pixels - low) / (high - low)))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def provenance_picture(image: np.ndarray, provenance: Provenance, sources: SourceLookup, top: int = 4) -> Image.Image:
    """The generated image, its heat map with the ``top`` cells that took most from retrieval numbered, and
    each of those cells' source: the database image with the source patch outlined, its distance and share."""
    cells = provenance.top(top)
    chart = heat_map(image, provenance)
    draw = ImageDraw.Draw(chart)
    for number, cell in enumerate(cells, 1):
        box = cell_box(cell, provenance.grid, chart.size)
        _outline(draw, box, SELECTED)
        draw.text(
            (box[0] + 3, box[1] + 1),
            str(number),
            fill=(255, 255, 255),
            font=_font(12),
            stroke_width=2,
            stroke_fill=(0, 0, 0),
        )
    side, thumb, gap, title, caption = chart.width, chart.width // 2, 14, 24, 32
    columns = max(1, math.ceil(len(cells) / 2))
    width = gap + 2 * (side + gap) + columns * (thumb + gap)
    height = title + max(side + 36, 2 * (thumb + caption))
    sheet = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    left = [gap, gap + side + gap, gap + 2 * (side + gap)]
    sheet.paste(Image.fromarray(enlarge(image, display_scale(image.shape[1]))), (left[0], title))
    sheet.paste(chart, (left[1], title))
    sheet.paste(colour_bar(side), (left[1], title + side + 6))
    grey, light = (200, 200, 200), (235, 235, 235)
    draw.text((left[1], title + side + 20), "0: model", fill=grey, font=_font(12))
    draw.text((left[1] + side, title + side + 20), "1: retrieval", fill=grey, font=_font(12), anchor="ra")
    heading = "top source patches" if cells else "no token came from a database patch"
    for x, label in zip(left, ("generated image", "retrieval share per patch", heading), strict=True):
        draw.text((x, 4), label, fill=light, font=_font(14))
    for number, cell in enumerate(cells, 1):
        found = provenance.source(cell)
        x = left[2] + (number - 1) % columns * (thumb + gap)
        y = title + (number - 1) // columns * (thumb + caption)
        pixels = sources(found.image_id) if found.image_id is not None else None
        if pixels is not None and found.source_cell is not None:
            sheet.paste(outlined(pixels, found.source_cell, provenance.grid, thumb), (x, y))
        else:
            draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), outline=(90, 90, 90))
            draw.text((x + 4, y + 4), "not stored", fill=(160, 160, 160), font=_font(11))
        share = f"{found.share:.0%} retrieved" if found.share is not None else "not retrieved"
        lines = f"{number}: database image {found.image_id}\nd {found.distance:.2g} · {share}"
        draw.multiline_text((x, y + thumb + 2), lines, fill=grey, font=_font(11), spacing=2)
    return sheet


def write_provenance(output: GenerationOutput, paths: Sequence[Path], grid: Grid, sources: SourceLookup) -> list[Path]:
    """Beside each image ``paths[row]`` of ``output``, its :func:`provenance_picture` as ``NAME-provenance.png``."""
    written = []
    for row, path in enumerate(paths):
        image = np.asarray(to_pil(output.images[row]))
        target = path.with_name(f"{path.stem}-provenance.png")
        provenance_picture(image, Provenance.of(output.records, row, grid), sources).save(target)
        written.append(target)
    return written
