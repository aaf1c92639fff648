"""Rendering scenes: tinted, scaled handwritten digits placed without overlap on a black background.

Shapes: S scene side (64 px).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from arrag.world.digits import Glyphs
from arrag.world.prompts import COLOURS, PALETTE, Prompt, Relation

SCENE_SIZE = 64
GAP = 4  # px between boxes: broken strokes of one digit may merge in the checker, two digits never do
POSITION_THRESHOLD = 0.1  # GenEval's: centre offsets are reduced by 10% of the boxes' summed sizes


@dataclass(frozen=True)
class SceneObject:
    digit: int
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    glyph: int  # index into the pool


def relations(a: tuple[float, ...], b: tuple[float, ...]) -> set[str]:
    """GenEval's relative position of box a to box b (x0, y0, x1, y1) from their centres."""
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    centre_a, centre_b = (a_arr[:2] + a_arr[2:]) / 2, (b_arr[:2] + b_arr[2:]) / 2
    size_a, size_b = a_arr[2:] - a_arr[:2], b_arr[2:] - b_arr[:2]
    offset = centre_a - centre_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


def _glyph_image(pixels: np.ndarray, height: int) -> np.ndarray:
    """Crop a 28×28 glyph to its ink and scale it to ``height`` px tall -> (h, w) float in [0, 1]."""
    rows, cols = np.flatnonzero(pixels.max(1) > 0), np.flatnonzero(pixels.max(0) > 0)
    ink = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    width = max(2, round(ink.shape[1] * height / ink.shape[0]))
    scaled = Image.fromarray(ink).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(scaled, dtype=np.float32) / 255.0


def _boxes_apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _place(
    shapes: list[tuple[int, int]], rng: np.random.Generator, relation: Relation | None
) -> list[tuple[int, int, int, int]] | None:
    """Random non-overlapping boxes for (h, w) shapes; with a relation, box 0 stands in it to box 1."""
    for _ in range(200):
        boxes: list[tuple[int, int, int, int]] = []
        for h, w in shapes:
            x, y = int(rng.integers(0, SCENE_SIZE - w + 1)), int(rng.integers(0, SCENE_SIZE - h + 1))
            box = (x, y, x + w, y + h)
            if not all(_boxes_apart(box, other) for other in boxes):
                break
            boxes.append(box)
        else:
            if relation is None or relations(boxes[0], boxes[1]) == {relation}:
                return boxes
    return None


def render_scene(prompt: Prompt, glyphs: Glyphs, rng: np.random.Generator) -> tuple[np.ndarray, list[SceneObject]]:
    """A scene showing exactly what ``prompt`` describes -> ((S, S, 3) uint8, its objects)."""
    wanted = [(clause.digit, clause.colour) for clause in prompt.clauses for _ in range(clause.count)]
    max_height = 30 if len(wanted) <= 2 else 24
    while True:
        heights = rng.integers(18, max_height + 1, size=len(wanted))
        chosen = [int(rng.choice(np.flatnonzero(glyphs.labels == digit))) for digit, _ in wanted]
        images = [_glyph_image(glyphs.pixels[g], int(h)) for g, h in zip(chosen, heights, strict=True)]
        boxes = _place([im.shape for im in images], rng, prompt.relation)
        if boxes is not None:
            break
    canvas = np.zeros((SCENE_SIZE, SCENE_SIZE, 3), dtype=np.float32)
    objects = []
    for (digit, colour), glyph, image, box in zip(wanted, chosen, images, boxes, strict=True):
        colour = colour or str(rng.choice(COLOURS))
        x0, y0, x1, y1 = box
        tinted = image[..., None] * np.asarray(PALETTE[colour], dtype=np.float32)  # (h, w, 3)
        canvas[y0:y1, x0:x1] = np.maximum(canvas[y0:y1, x0:x1], tinted)
        objects.append(SceneObject(digit, colour, box, glyph))
    return canvas.round().astype(np.uint8), objects


def render_scenes(prompts: list[Prompt], glyphs: Glyphs, rng: np.random.Generator) -> np.ndarray:
    """One scene per prompt -> (N, S, S, 3) uint8."""
    return np.stack([render_scene(prompt, glyphs, rng)[0] for prompt in prompts])


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float in [-1, 1], what tokenizers take."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_backend_input(images: np.ndarray, preprocess) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> a backend's input through its own ``preprocess`` (resize, crop, value range)."""
    return torch.stack([preprocess(Image.fromarray(image)) for image in images])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, S, S) in [0, 1] (what backends decode to) -> (N, S, S, 3) uint8, what the checker reads."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
