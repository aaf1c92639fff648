"""The local-texture domain: the world's scenes with every digit's strokes filled from a crop of a real photo.

A textured scene is the world's scene — same prompt, glyph, size, place and colour, drawn from the same
generator — with each glyph's ink multiplied by the luminance of a photo crop, so a stroke keeps its caption's
hue (the checker's palette) and carries the photo's texture. The photos (:data:`PHOTOS`) are those shipped
inside the scikit-image, scikit-learn and matplotlib wheels, read from the installed packages. Two splits of
them into database and evaluation regions:

- ``photos``: disjoint photos (:data:`EVAL_PHOTOS` are held out): held-out strokes carry textures the
  database has never seen;
- ``library``: every photo in both, cut into a 2×2 checkerboard of quadrants, the database drawing from one
  diagonal and evaluation from the other: the two share photos but never a pixel.

The checker reads these strokes with :data:`arrag.world.checker.TEXTURED`; :func:`checker_report` measures it.

Shapes: S scene side (64 px); h, w a glyph's box.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from arrag.world.checker import TEXTURED, WorldChecker, judge
from arrag.world.digits import Glyphs, load_pool
from arrag.world.prompts import COLOURS, Clause, Prompt, sample_prompts
from arrag.world.report import EVAL_SEED, eval_scenes, per_category
from arrag.world.scenes import SceneObject, render_scene

Split = Literal["photos", "library"]
Pool = Literal["database", "eval"]
SPLITS: tuple[Split, ...] = ("photos", "library")

# name -> (package, file inside it): the real photos of the three wheels. Left out: icons and logos
# (matplotlib's Minduka_Present_Blue_Pack and logo2, skimage's logo), synthetic images (chessboard_GRAY,
# chessboard_RGB, color, phantom, horse: a silhouette), pages of text (page, text), a 102-px crop
# (microaneurysms), nearly blank or nearly black frames (cell, clock_motion, hubble_deep_field, retina) and
# motorcycle_right, the stereo twin of motorcycle_left.
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "brick": ("skimage", "data/brick.png"),
    "camera": ("skimage", "data/camera.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "coins": ("skimage", "data/coins.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
    "ihc": ("skimage", "data/ihc.png"),
    "moon": ("skimage", "data/moon.png"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}
# The photos split's held-out third, one of each kind: a surface, an animal, objects, a plant, a night scene.
EVAL_PHOTOS = ("brick", "chelsea", "coins", "flower", "rocket")
TEXTURE_SEED = 20260211
STROKE_FLOOR = 0.3  # a stroke's darkest texture keeps 30% of its tint: above the checker's ink threshold
SCALE = (2.0, 5.0)  # photo pixels per scene pixel of a crop
MIN_CONTRAST = 0.1  # a crop's luminance is stretched over at most 1 / MIN_CONTRAST of its own range


@dataclass(frozen=True)
class Region:
    """A part of a photo that crops are drawn from: ``box`` = x0, y0, x1, y1 (exclusive) in photo pixels."""

    photo: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class TexturedScene:
    """A textured scene: its prompt, (S, S, 3) uint8 image, objects, and the photo region each object's
    texture was cropped from (a :class:`Region` whose box is the crop)."""

    prompt: Prompt
    image: np.ndarray
    objects: tuple[SceneObject, ...]
    crops: tuple[Region, ...]


def photo_path(name: str) -> Path:
    """The file of one of :data:`PHOTOS` inside its installed package."""
    package, relative = PHOTOS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the texture domain reads the photos shipped in scikit-image, scikit-learn and matplotlib: "
            "pip install scikit-image scikit-learn matplotlib"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall {package}")
    return path


@cache
def photo_luminance(name: str) -> np.ndarray:
    """(H, W) float32 luminance of a photo in [0, 1]."""
    return np.asarray(Image.open(photo_path(name)).convert("L"), dtype=np.float32) / 255.0


@cache
def texture_pool(split: Split, pool: Pool) -> tuple[Region, ...]:
    """The regions one pool of one split draws its crops from."""
    if split not in SPLITS or pool not in ("database", "eval"):
        raise ValueError(f"split must be one of {SPLITS} and pool 'database' or 'eval', got {split!r}, {pool!r}")
    held_out = pool == "eval"
    regions = []
    for name in PHOTOS:
        h, w = photo_luminance(name).shape
        if split == "photos":
            regions += [Region(name, (0, 0, w, h))] if (name in EVAL_PHOTOS) == held_out else []
            continue
        xs, ys = (0, w // 2, w), (0, h // 2, h)
        for i in range(2):
            for j in range(2):
                if ((i + j) % 2 == 1) == held_out:
                    regions.append(Region(name, (xs[i], ys[j], xs[i + 1], ys[j + 1])))
    return tuple(regions)


def draw_crop(regions: tuple[Region, ...], shape: tuple[int, int], rng: np.random.Generator) -> Region:
    """A crop of a random region with the aspect of ``shape`` (h, w), at a random scale (:data:`SCALE`, less
    where the region is too small)."""
    region = regions[int(rng.integers(len(regions)))]
    x0, y0, x1, y1 = region.box
    h, w = shape
    scale = min(float(rng.uniform(*SCALE)), (x1 - x0) / w, (y1 - y0) / h)
    cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
    x, y = x0 + int(rng.integers(x1 - x0 - cw + 1)), y0 + int(rng.integers(y1 - y0 - ch + 1))
    return Region(region.photo, (x, y, x + cw, y + ch))


def crop_texture(crop: Region, shape: tuple[int, int]) -> np.ndarray:
    """A crop's luminance at ``shape`` (h, w), stretched so its 98th percentile is 1 and its 2nd is
    :data:`STROKE_FLOOR` (or higher, for crops of less than :data:`MIN_CONTRAST`) -> (h, w) float32."""
    x0, y0, x1, y1 = crop.box
    patch = Image.fromarray(photo_luminance(crop.photo)[y0:y1, x0:x1])
    luminance = np.asarray(patch.resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)
    low, high = np.percentile(luminance, [2, 98])
    lifted = np.clip(1.0 - (high - luminance) / max(float(high - low), MIN_CONTRAST), 0.0, 1.0)
    return STROKE_FLOOR + (1.0 - STROKE_FLOOR) * lifted


def texture_scene(
    image: np.ndarray, objects: list[SceneObject], regions: tuple[Region, ...], rng: np.random.Generator
) -> tuple[np.ndarray, tuple[Region, ...]]:
    """A world scene with each object's strokes textured from a crop of ``regions`` -> (image, the crops).

    A world scene's pixel is its glyph's ink times its tint; the textured pixel is that times the crop's
    luminance, so the hue stays the tint's and the stroke's shape the glyph's.
    """
    out = image.astype(np.float32)
    crops = []
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        crop = draw_crop(regions, (y1 - y0, x1 - x0), rng)
        out[y0:y1, x0:x1] *= crop_texture(crop, (y1 - y0, x1 - x0))[..., None]
        crops.append(crop)
    return out.round().astype(np.uint8), tuple(crops)


def textured_scenes(
    prompts: list[Prompt],
    glyphs: Glyphs,
    scene_rng: np.random.Generator,
    regions: tuple[Region, ...],
    seed: int,
    first: int = 0,
) -> list[TexturedScene]:
    """The world's scenes of ``prompts``, drawn from ``scene_rng`` exactly as
    :func:`arrag.world.scenes.render_scenes` draws them, scene ``i`` textured by a generator of its own,
    seeded ``[TEXTURE_SEED, seed, first + i]``."""
    scenes = []
    for i, prompt in enumerate(prompts):
        image, objects = render_scene(prompt, glyphs, scene_rng)
        texture_rng = np.random.default_rng([TEXTURE_SEED, seed, first + i])
        textured, crops = texture_scene(image, objects, regions, texture_rng)
        scenes.append(TexturedScene(prompt, textured, tuple(objects), crops))
    return scenes


def texture_database_scenes(start: int, count: int, seed: int, split: Split = "photos") -> list[TexturedScene]:
    """The world's database scenes of the batch seeded ``[seed, start]`` (as
    :func:`arrag.world.source.world_scenes` draws them), textured from ``split``'s database regions."""
    rng = np.random.default_rng([seed, start])
    prompts = sample_prompts(count, int(rng.integers(2**32)))
    return textured_scenes(prompts, load_pool("database"), rng, texture_pool(split, "database"), seed, start)


def texture_eval_scenes(count: int, split: Split = "photos", seed: int = EVAL_SEED) -> list[TexturedScene]:
    """The world's first ``count`` held-out scenes (:func:`arrag.world.report.eval_scenes`), textured from
    ``split``'s evaluation regions; the first n of any longer run are the same."""
    prompts = sample_prompts(count, seed)
    rng = np.random.default_rng([seed, 1])
    return textured_scenes(prompts, load_pool("eval"), rng, texture_pool(split, "eval"), seed)


def texture_checker(checker: WorldChecker) -> WorldChecker:
    """The same classifier reading ink as textured strokes need (:data:`arrag.world.checker.TEXTURED`)."""
    return WorldChecker(checker.classifier, TEXTURED)


def wrong_prompts(prompt: Prompt, objects: tuple[SceneObject, ...]) -> dict[str, Prompt]:
    """Captions that the scene of ``objects`` contradicts, by kind: ``digit`` (the first clause names a digit
    absent from the scene), ``colour`` (a clause's colour that no object of its digit has), ``count`` (one
    more or one fewer of a counting prompt's digit) and ``position`` (the opposite relation)."""
    first = prompt.clauses[0]
    absent = next(d for d in range(10) if d not in {o.digit for o in objects})
    wrong = {"digit": _with_clause(prompt, 0, dataclasses.replace(first, digit=absent))}
    for index, clause in enumerate(prompt.clauses):
        if clause.colour is not None:
            shown = {o.colour for o in objects if o.digit == clause.digit}
            colour = next(c for c in COLOURS if c not in shown)
            wrong["colour"] = _with_clause(prompt, index, dataclasses.replace(clause, colour=colour))
            break
    if prompt.category == "counting":
        count = first.count + 1 if first.count < 4 else first.count - 1
        wrong["count"] = _with_clause(prompt, 0, dataclasses.replace(first, count=count))
    if prompt.relation is not None:
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        wrong["position"] = dataclasses.replace(prompt, relation=opposite[prompt.relation])
    return wrong


def _with_clause(prompt: Prompt, index: int, clause: Clause) -> Prompt:
    return dataclasses.replace(prompt, clauses=(*prompt.clauses[:index], clause, *prompt.clauses[index + 1 :]))


def _rejected(checker: WorldChecker, scenes: list[tuple[Prompt, np.ndarray, tuple[SceneObject, ...]]]):
    """The share of each kind of wrong caption (:func:`wrong_prompts`) that ``checker`` rejects."""
    rejected: dict[str, list[bool]] = {}
    for prompt, image, objects in scenes:
        found = checker.detect(image)
        for kind, wrong in wrong_prompts(prompt, objects).items():
            rejected.setdefault(kind, []).append(not judge(wrong, found))
    return {kind: float(np.mean(verdicts)) for kind, verdicts in sorted(rejected.items())}


def checker_report(checker: WorldChecker, scenes: int = 600) -> dict[str, object]:
    """The checker on held-out scenes, plain and textured (each split): the share of ground truth judged
    correct per category and the share of wrong captions rejected by kind. Plain scenes are read by
    ``checker`` as given, textured ones by :func:`texture_checker` (and, for comparison, as given)."""
    textured = texture_checker(checker)
    prompts, images = eval_scenes(scenes)
    objects = [scene.objects for scene in texture_eval_scenes(scenes)]  # the plain scenes' objects too
    plain = list(zip(prompts, images, objects, strict=True))
    report: dict[str, object] = {
        "scenes": scenes,
        "plain": per_category(prompts, [checker.judge(p, image) for p, image, _ in plain]),
        "plain_wrong_rejected": _rejected(checker, plain),
    }
    for split in SPLITS:
        held_out = [(s.prompt, s.image, s.objects) for s in texture_eval_scenes(scenes, split)]
        report[f"textured_{split}"] = per_category(prompts, [textured.judge(p, image) for p, image, _ in held_out])
        report[f"textured_{split}_flat_reading"] = per_category(
            prompts, [checker.judge(p, image) for p, image, _ in held_out]
        )
        report[f"textured_{split}_wrong_rejected"] = _rejected(textured, held_out)
    return report
