"""Progress bars of generated images, on stderr: images per second, moved position by position."""

from __future__ import annotations

import math

from tqdm import tqdm

COUNTED = "{l_bar}{bar}| {images}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"
UNCOUNTED = "{desc}: {images} images [{elapsed}, {rate_fmt}]"


class ImageBar(tqdm):
    """A bar of ``total`` images (None: unknown) whose ``update`` takes fractions of an image; it shows the whole
    images finished (tqdm would print the fraction, "0.0625/4")."""

    def __init__(self, total: int | None, desc: str):
        super().__init__(total=total, desc=desc, unit="image", bar_format=COUNTED if total else UNCOUNTED)

    @property
    def format_dict(self) -> dict:
        return {**super().format_dict, "images": math.floor(self.n + 1e-6)}  # sums of fractions fall just short
