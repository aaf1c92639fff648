"""Reading, preprocessing and writing images."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, PngImagePlugin

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

logger = logging.getLogger(__name__)

LONG_STRIP = 16  # resized images over this many squares are cropped before resampling


class ImageReadError(ValueError):
    """A file could not be read as an image; the message says why."""


def files_under(folder: Path) -> list[Path]:
    """Every file under ``folder``, recursively and sorted, following symlinked folders.

    Python 3.11's ``Path.rglob`` skips symlinked folders; following them needs each real folder entered once,
    so a symlink loop ends and a folder linked twice gives its files once.
    """
    found: list[Path] = []
    entered: set[Path] = set()
    pending = [folder]
    while pending:
        directory = pending.pop()
        real = directory.resolve()
        if real in entered:
            continue
        entered.add(real)
        try:
            entries = sorted(directory.iterdir())
        except PermissionError:  # skipped, as rglob does
            continue
        for entry in entries:
            if entry.is_dir():
                pending.append(entry)
            elif entry.is_file():
                found.append(entry)
    return sorted(found)


def drop_duplicate_files(paths: list[Path]) -> list[Path]:
    """``paths`` in order, keeping only the first of those that resolve to the same file; warns of the rest."""
    first: dict[Path, Path] = {}
    for path in paths:
        first.setdefault(path.resolve(), path)
    if len(first) < len(paths):
        logger.warning(
            "dropped %d duplicate input files (given twice, or reached through several folders or symlinks)",
            len(paths) - len(first),
        )
    return list(first.values())


def find_images(inputs: list[Path]) -> list[Path]:
    """Files given directly, plus image files found recursively under given folders, sorted per folder; each
    file once."""
    found: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found += [p for p in files_under(item) if p.suffix.lower() in IMAGE_SUFFIXES]
        elif item.exists():
            found.append(item)
        else:
            raise FileNotFoundError(f"{item} does not exist")
    return drop_duplicate_files(found)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. 16-bit integer images are scaled by 255/65535 (also mode "I" beyond 255), float
    images from [0, 1], or from their own min and max when outside it: PIL's own conversion clips them, turning
    a 16-bit gradient white and floats in [0, 1] black."""
    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float32)
    if image.mode == "F":
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        if low < 0 or high > 1:
            values = (values - low) / ((high - low) or 1.0)
        values = values * 255
    elif image.mode != "I" or values.max() > 255:  # mode "I" within [0, 255] is already 8-bit
        values = values * (255 / 65535)
    return Image.fromarray(np.nan_to_num(values).clip(0, 255).round().astype(np.uint8)).convert("RGB")


def read_image(source: Path | bytes) -> Image.Image:
    """Decode an image file or its bytes fully to RGB, or raise :class:`ImageReadError` with the reason."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(stream) as image:
            image.load()  # decode now: a truncated file fails here, not later
            return to_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        reason = str(error).replace(f" {stream!r}", "")  # PIL names an in-memory stream by its object address
        raise ImageReadError(f"{type(error).__name__}: {reason}") from error


Resample = Literal["bicubic", "bilinear", "lanczos"]
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocessing:
    """What a tokenizer takes: the shorter side resized to ``size``, the centre square cropped, RGB values
    mapped linearly from [0, 255] to ``value_range``. Databases record it in their manifest."""

    size: int
    resample: Resample = "bicubic"
    value_range: tuple[float, float] = (-1.0, 1.0)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be >= 1 pixel, got {self.size}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {list(_RESAMPLE)}, got {self.resample!r}")
        if not self.value_range[0] < self.value_range[1]:
            raise ValueError(f"value_range must be (low, high) with low < high, got {self.value_range}")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """A PIL image -> (3, size, size) float32 in ``value_range``."""
        size = self.size
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        left, top = (width - size) // 2, (height - size) // 2
        image, resample = to_rgb(image), _RESAMPLE[self.resample]
        if width * height <= LONG_STRIP * size * size:
            image = image.resize((width, height), resample).crop((left, top, left + size, top + size))
        else:  # resizing a long strip whole would take gigabytes (a 65000×1 PNG: 1.5 GB): resample the square only
            x_step, y_step = image.width / width, image.height / height
            box = (left * x_step, top * y_step, (left + size) * x_step, (top + size) * y_step)
            image = image.resize((size, size), resample, box=box)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))  # (S, S, 3) in [0, 255]
        low, high = self.value_range
        return pixels.permute(2, 0, 1) / (255.0 / (high - low)) + low  # (3, S, S); [-1, 1]: x / 127.5 - 1

    def to_dict(self) -> dict[str, object]:
        return {"size": self.size, "crop": "centre", "resample": self.resample, "value_range": list(self.value_range)}


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL image."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)


def save_image(image: torch.Tensor, path: Path, metadata: dict, sidecar: bool = True) -> None:
    """Write a PNG with its generation parameters in a text chunk and (``sidecar``) in a JSON file beside it."""
    text = json.dumps(metadata, indent=2)
    info = PngImagePlugin.PngInfo()
    info.add_text("arrag", text)
    to_pil(image).save(path, format="PNG", pnginfo=info)
    if sidecar:
        path.with_suffix(".json").write_text(text)


def read_metadata(path: Path) -> dict:
    """The generation parameters :func:`save_image` wrote into a PNG's text chunk ({} if there are none)."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}).get("arrag")
    return json.loads(text) if text else {}


def labelled_grid(rows: list[tuple[str, list[tuple[np.ndarray, str]]]], scale: int = 3) -> Image.Image:
    """A comparison sheet: one titled row per prompt, cells of (H, W, 3) uint8 images with a caption each."""
    cell_h, cell_w = (side * scale for side in rows[0][1][0][0].shape[:2])
    columns = max(len(cells) for _, cells in rows)
    sheet = Image.new("RGB", (columns * (cell_w + 8), len(rows) * (cell_h + 30)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for i, (title, cells) in enumerate(rows):
        top = i * (cell_h + 30)
        draw.text((4, top + 2), title, fill=(255, 255, 255))
        for j, (image, caption) in enumerate(cells):
            left = j * (cell_w + 8)
            big = Image.fromarray(image).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            sheet.paste(big, (left, top + 30))
            draw.text((left + 3, top + 16), caption, fill=(230, 230, 230))
    return sheet
