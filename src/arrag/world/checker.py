"""The world's checker: find digits in a scene, read their colour and value, judge a prompt (GenEval's rules).

Objects are connected components of the ink (after a one-pixel dilation that rejoins broken strokes;
scenes keep digits at least 4 px apart). A component's colour is the nearest palette colour of its
brightest pixels; its digit comes from a small CNN trained on the train pool's glyphs. How ink is read is an
:class:`InkReading`: ``FLAT`` (the default) for the world's flat-tinted strokes, ``TEXTURED`` for strokes whose
brightness a texture modulates (:mod:`arrag.world.texture`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from scipy import ndimage
from torch import nn

from arrag.world.prompts import PALETTE, Prompt
from arrag.world.scenes import relations

INK_THRESHOLD = 0.25  # fraction of full intensity that counts as ink
MIN_AREA = 12  # px: smaller components are noise
CLASSIFIER_SIZE = 28


@dataclass(frozen=True)
class InkReading:
    """How the checker reads ink.

    Attributes:
        threshold: fraction of full intensity a pixel needs to be ink.
        faint: with a value, pixels above it that touch ink (8-connected, through other such pixels) are ink
            too (hysteresis): a textured stroke's dark stretches stay joined to its bright ones.
        window: the classifier reads each pixel's intensity divided by the maximum of its ``window``×``window``
            neighbourhood, which undoes a texture's modulation of the stroke (1: raw intensity).
    """

    threshold: float = INK_THRESHOLD
    faint: float | None = None
    window: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1 or (self.faint is not None and not 0 < self.faint < self.threshold):
            raise ValueError(f"need 0 < faint < threshold < 1, got faint={self.faint}, threshold={self.threshold}")
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"window must be an odd number >= 1, got {self.window}")

    def ink(self, intensity: np.ndarray) -> np.ndarray:
        """(S, S) intensity in [0, 1] -> (S, S) bool ink."""
        ink = intensity > self.threshold
        if self.faint is None:
            return ink
        labels, count = ndimage.label(intensity > self.faint, structure=np.ones((3, 3)))
        touching = np.zeros(count + 1, dtype=bool)
        touching[labels[ink]] = True
        touching[0] = False
        return touching[labels]

    def reading(self, intensity: np.ndarray) -> np.ndarray:
        """(S, S) intensity -> (S, S) what the classifier reads."""
        if self.window == 1:
            return intensity
        local = ndimage.maximum_filter(intensity, size=self.window)
        return np.clip(intensity / np.maximum(local, 1e-3), 0.0, 1.0)


FLAT = InkReading()
TEXTURED = InkReading(faint=0.1, window=3)  # measured on arrag.world.texture's scenes (docs/world.md)


@dataclass(frozen=True)
class Detection:
    digit: int
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    confidence: float


def classifier_input(intensity: np.ndarray) -> np.ndarray:
    """An ink crop (h, w) in [0, 1] -> MNIST-like (28, 28): longer side scaled to 20 px, centred."""
    h, w = intensity.shape
    scale = 20 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    scaled = np.asarray(Image.fromarray((intensity * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR))
    out = np.zeros((CLASSIFIER_SIZE, CLASSIFIER_SIZE), dtype=np.float32)
    top, left = (CLASSIFIER_SIZE - size[1]) // 2, (CLASSIFIER_SIZE - size[0]) // 2
    out[top : top + size[1], left : left + size[0]] = scaled / 255.0
    return out


def nearest_colour(rgb: np.ndarray) -> str:
    """Palette name nearest to an RGB colour, compared after scaling both to a maximum channel of 1."""
    rgb = rgb / max(float(rgb.max()), 1e-6)
    names = list(PALETTE)
    palette = np.array([PALETTE[n] for n in names], dtype=np.float32)
    palette /= palette.max(axis=1, keepdims=True)
    return names[int(((palette - rgb) ** 2).sum(axis=1).argmin())]


class DigitClassifier(nn.Module):
    """A small CNN over 28×28 ink crops."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, 1, 28, 28) -> (N, 10) logits

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) -> (N, 128): the penultimate activations, what the last layer reads."""
        return self.head[:-1](self.features(x))


def find_components(
    image: np.ndarray, reading: InkReading = FLAT
) -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
    """(S, S, 3) uint8 scene -> [(ink mask of one object, its box)] for every object-sized component."""
    intensity = image.max(axis=2).astype(np.float32) / 255.0
    ink = reading.ink(intensity)
    labels, count = ndimage.label(ndimage.binary_dilation(ink), structure=np.ones((3, 3)))
    found = []
    for label in range(1, count + 1):
        mask = (labels == label) & ink
        if mask.sum() < MIN_AREA:
            continue
        ys, xs = np.nonzero(mask)
        found.append((mask, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
    return found


def object_crops(
    image: np.ndarray,
    components: list[tuple[np.ndarray, tuple[int, int, int, int]]] | None = None,
    reading: InkReading = FLAT,
) -> np.ndarray:
    """(S, S, 3) uint8 scene -> (n, 28, 28) classifier inputs, one per object (``find_components`` by default)."""
    components = find_components(image, reading) if components is None else components
    intensity = reading.reading(image.max(axis=2).astype(np.float32) / 255.0)
    crops = [classifier_input(np.where(mask, intensity, 0.0)[y0:y1, x0:x1]) for mask, (x0, y0, x1, y1) in components]
    return np.stack(crops) if crops else np.zeros((0, CLASSIFIER_SIZE, CLASSIFIER_SIZE), dtype=np.float32)


class WorldChecker:
    """Detects digits in scenes and judges prompts, reading ink as ``reading`` says."""

    def __init__(self, classifier: DigitClassifier, reading: InkReading = FLAT):
        self.classifier = classifier.eval()
        self.reading = reading

    @classmethod
    def load(cls, path: str | Path, reading: InkReading = FLAT) -> WorldChecker:
        classifier = DigitClassifier()
        classifier.load_state_dict(load_file(str(path)))
        return cls(classifier, reading)

    @torch.no_grad()
    def detect(self, image: np.ndarray) -> list[Detection]:
        """(S, S, 3) uint8 -> the digits in it."""
        components = find_components(image, self.reading)
        if not components:
            return []
        intensity = image.max(axis=2).astype(np.float32) / 255.0
        colours = []
        for mask, _ in components:
            bright = mask & (intensity >= 0.6 * intensity[mask].max())
            colours.append(nearest_colour(image[bright].astype(np.float32).mean(axis=0)))
        crops = object_crops(image, components, self.reading)
        probs = F.softmax(self.classifier(torch.from_numpy(crops)[:, None]), dim=-1)  # (N, 10)
        confidence, digits = probs.max(dim=-1)
        return [
            Detection(int(d), c, box, float(p))
            for d, p, c, (_, box) in zip(digits, confidence, colours, components, strict=True)
        ]

    def judge(self, prompt: Prompt, image: np.ndarray) -> bool:
        return judge(prompt, self.detect(image))


def judge(prompt: Prompt, detections: list[Detection]) -> bool:
    """GenEval's verdict: every clause is present in number (exactly, for counting), colour and position."""
    matches = []
    for clause in prompt.clauses:
        found = [d for d in detections if d.digit == clause.digit and clause.colour in (None, d.colour)]
        if len(found) < clause.count or (prompt.category == "counting" and len(found) != clause.count):
            return False
        matches.append(found)
    if prompt.relation is not None:
        return any(prompt.relation in relations(a.box, b.box) for a in matches[0] for b in matches[1])
    return True
