"""The local-texture domain: photo pools, textured scenes, their sources, and the checker on them."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from PIL import Image

from arrag.build import build_database
from arrag.build.sources import plan_shards, read_shard, source_kind, source_schemes
from arrag.retrieval.database import PatchDatabase
from arrag.world.checker import FLAT, TEXTURED, InkReading, find_components, judge
from arrag.world.prompts import PALETTE, Clause, Prompt
from arrag.world.report import eval_scenes, per_category
from arrag.world.source import DATABASE_SEED, TEXTURE_SCHEMES, world_scenes
from arrag.world.texture import (
    EVAL_PHOTOS,
    PHOTOS,
    SPLITS,
    STROKE_FLOOR,
    photo_path,
    texture_checker,
    texture_database_scenes,
    texture_eval_scenes,
    texture_pool,
    wrong_prompts,
)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _inside(inner: tuple[int, int, int, int], outer: tuple[int, int, int, int]) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def test_the_photos_are_real_photos_shipped_in_the_wheels():
    for name in PHOTOS:
        with Image.open(photo_path(name)) as photo:
            assert min(photo.size) >= 256, name  # no icons or thumbnails
            assert photo.mode in ("RGB", "L"), name  # no transparent logos
    assert set(EVAL_PHOTOS) < set(PHOTOS)


def test_the_photos_split_holds_out_whole_photos():
    database, held_out = texture_pool("photos", "database"), texture_pool("photos", "eval")
    assert {r.photo for r in database}.isdisjoint({r.photo for r in held_out})
    assert {r.photo for r in database} | {r.photo for r in held_out} == set(PHOTOS)
    assert {r.photo for r in held_out} == set(EVAL_PHOTOS)
    for region in database + held_out:
        with Image.open(photo_path(region.photo)) as photo:
            assert region.box == (0, 0, *photo.size)


def test_the_library_split_shares_photos_but_never_a_pixel():
    database, held_out = texture_pool("library", "database"), texture_pool("library", "eval")
    assert {r.photo for r in database} == {r.photo for r in held_out} == set(PHOTOS)
    for name in PHOTOS:
        mine = [r.box for r in database if r.photo == name]
        theirs = [r.box for r in held_out if r.photo == name]
        assert not any(_overlap(a, b) for a in mine for b in theirs)
        with Image.open(photo_path(name)) as photo:
            w, h = photo.size
        assert sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in mine + theirs) == w * h  # the quadrants tile it


@pytest.mark.parametrize("split", SPLITS)
def test_crops_come_from_their_pools_regions(split):
    used = {}
    for pool, scenes in [
        ("database", texture_database_scenes(0, 60, DATABASE_SEED, split)),
        ("eval", texture_eval_scenes(60, split)),
    ]:
        regions = texture_pool(split, pool)
        used[pool] = [crop for scene in scenes for crop in scene.crops]
        for crop in used[pool]:
            assert any(r.photo == crop.photo and _inside(crop.box, r.box) for r in regions), crop
    assert not any(a.photo == b.photo and _overlap(a.box, b.box) for a in used["database"] for b in used["eval"])


def test_textured_scenes_are_the_worlds_scenes_with_photo_textured_strokes():
    prompts, plain = world_scenes(100, 40)
    textured = texture_database_scenes(100, 40, DATABASE_SEED)
    assert [s.prompt for s in textured] == prompts
    held_out, plain_held_out = texture_eval_scenes(40), eval_scenes(40)
    assert [s.prompt for s in held_out] == plain_held_out[0]
    spread = []  # of each stroke's luminance: texture
    for scenes, images in [(textured, plain), (held_out, plain_held_out[1])]:
        for scene, image in zip(scenes, images, strict=True):
            assert np.all(scene.image <= image)  # ink times a luminance in [STROKE_FLOOR, 1]
            for obj in scene.objects:
                x0, y0, x1, y1 = obj.box
                before = image[y0:y1, x0:x1].astype(np.float32)
                after = scene.image[y0:y1, x0:x1].astype(np.float32)
                core = before.max(axis=2) >= 128
                ratio = after.max(axis=2)[core] / before.max(axis=2)[core]
                assert ratio.min() >= STROKE_FLOOR - 0.02
                spread.append(ratio.std())
                hue = after[core] / np.maximum(after[core].max(axis=1, keepdims=True), 1)
                tint = np.asarray(PALETTE[obj.colour], dtype=np.float32)
                tint /= tint.max()
                assert np.abs(hue - tint).max() < 0.08  # the caption's colour, darker or lighter
    assert np.median(spread) > 0.12  # strokes textured, not flat (a crop of sky or wall is nearly flat)


def test_scenes_are_deterministic_per_seed_and_index():
    first = texture_eval_scenes(30, "library")
    again = texture_eval_scenes(30, "library")
    assert all(np.array_equal(a.image, b.image) and a.crops == b.crops for a, b in zip(first, again, strict=True))
    prefix = texture_eval_scenes(10, "library")
    assert all(np.array_equal(a.image, b.image) for a, b in zip(prefix, first, strict=False))
    other = texture_eval_scenes(10, "library", seed=8)
    assert not all(np.array_equal(a.image, b.image) for a, b in zip(other, prefix, strict=True))
    photos = texture_eval_scenes(10, "photos")  # the same scene, other textures
    assert all(a.objects == b.objects and a.crops != b.crops for a, b in zip(photos, prefix, strict=True))
    batch = texture_database_scenes(100, 100, DATABASE_SEED)
    assert np.array_equal(batch[5].image, texture_database_scenes(100, 100, DATABASE_SEED)[5].image)


@pytest.mark.parametrize("split", SPLITS)
def test_the_sources_are_registered_and_caption_their_scenes(split):
    database, held_out = TEXTURE_SCHEMES[split]
    assert {database, held_out} <= set(source_schemes())
    assert source_kind(database) is not source_kind(held_out)
    plan = plan_shards([f"{database}:130", f"{held_out}:12"], first_index=2).shards
    assert [(s.index, s.kind, s.start, s.count) for s in plan] == [
        (2, database, 0, 100),
        (3, database, 100, 30),
        (4, held_out, 0, 12),
    ]
    items = list(read_shard(plan[2]))
    scenes = texture_eval_scenes(12, split)
    assert [i.name for i in items] == [f"{database}-eval-scene-{k}: {s.prompt.text}" for k, s in enumerate(scenes)]
    assert [i.caption for i in items] == [s.prompt.text for s in scenes]
    assert all(np.array_equal(np.asarray(i.image), s.image) for i, s in zip(items, scenes, strict=True))
    items = list(read_shard(plan[1]))
    scenes = texture_database_scenes(100, 30, DATABASE_SEED, split)
    assert items[0].name == f"{database}-database-scene-100: {scenes[0].prompt.text}"
    assert all(np.array_equal(np.asarray(i.image), s.image) for i, s in zip(items, scenes, strict=True))
    with pytest.raises(ValueError, match=f"{held_out}:ten: the {held_out} source takes a number of scenes"):
        plan_shards([f"{held_out}:ten"])


def test_the_texture_sources_build_databases(backend, tmp_path):
    assert build_database(backend, ["world-texture:20"], tmp_path / "db").images_added == 20
    database = PatchDatabase.load(tmp_path / "db")
    assert database.sources[0] == f"world-texture-database-scene-0: {texture_database_scenes(0, 1, 1)[0].prompt.text}"
    built = build_database(backend, ["world-texture-library-eval:5"], tmp_path / "held-out")
    assert built.images_added == 5


def test_ink_reading_joins_faint_stroke_parts_and_undoes_texture():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[10:30, 10:13] = 200  # bright half of a stroke
    image[30:50, 10:13] = 40  # its dark half: below the ink threshold, above the faint one
    image[50:60, 40:43] = 40  # a faint mark touching no ink
    (flat,) = find_components(image, FLAT)
    assert flat[1] == (10, 10, 13, 30)
    (textured,) = find_components(image, TEXTURED)
    assert textured[1] == (10, 10, 13, 50)
    reading = TEXTURED.reading(image.max(axis=2) / 255.0)
    assert np.allclose(reading[35:45, 10:13], 1.0)
    assert np.allclose(reading[10:28, 10:13], 1.0)
    assert [box for _, box in find_components(image)] == [flat[1]]  # FLAT is the default
    with pytest.raises(ValueError, match="faint < threshold"):
        InkReading(faint=0.3)
    with pytest.raises(ValueError, match="odd"):
        InkReading(window=2)


@pytest.fixture(scope="module")
def checker():
    from arrag.world.report import load_checker

    return load_checker()


@pytest.mark.parametrize("split", SPLITS)
def test_checker_accepts_textured_ground_truth_and_rejects_wrong_captions(checker, split):
    """Measured on 600 scenes (docs/world.md): 0.96 of ground truth for both splits, like the plain world."""
    textured = texture_checker(checker)
    scenes = texture_eval_scenes(120, split, seed=11)
    prompts = [s.prompt for s in scenes]
    detections = [textured.detect(s.image) for s in scenes]
    accuracy = per_category(prompts, [judge(p, found) for p, found in zip(prompts, detections, strict=True)])
    assert accuracy["overall"] >= 0.93
    assert min(accuracy.values()) >= 0.8
    rejected: dict[str, list[bool]] = {}
    for scene, found in zip(scenes, detections, strict=True):
        for kind, wrong in wrong_prompts(scene.prompt, scene.objects).items():
            rejected.setdefault(kind, []).append(not judge(wrong, found))
    assert set(rejected) == {"digit", "colour", "count", "position"}
    for kind, verdicts in rejected.items():  # a misread digit can make one more or one fewer look right
        assert np.mean(verdicts) >= (0.85 if kind == "count" else 0.97), kind


def test_wrong_prompts_contradict_the_scene():
    scene = next(s for s in texture_eval_scenes(60) if s.prompt.category == "color_attr")
    wrong = wrong_prompts(scene.prompt, scene.objects)
    assert set(wrong) == {"digit", "colour"}
    assert wrong["digit"].clauses[0].digit not in {o.digit for o in scene.objects}
    (changed,) = [c for c in wrong["colour"].clauses if c not in scene.prompt.clauses]
    assert changed.colour not in {o.colour for o in scene.objects if o.digit == changed.digit}
    counting = Prompt("counting", (Clause(2, count=4),))
    assert wrong_prompts(counting, ())["count"].clauses[0].count == 3
    position = Prompt("position", (Clause(4), Clause(1)), "above")
    assert wrong_prompts(position, ())["position"].relation == "below"


def test_checker_rejects_a_retinted_digit_and_a_removed_one(checker):
    textured = texture_checker(checker)
    scenes = [s for s in texture_eval_scenes(120, "library") if textured.judge(s.prompt, s.image)]
    colours = next(s for s in scenes if s.prompt.category == "colors")
    x0, y0, x1, y1 = colours.objects[0].box
    other = next(c for c in PALETTE if c != colours.objects[0].colour)
    retinted = colours.image.copy()
    ink = retinted[y0:y1, x0:x1].max(axis=2, keepdims=True).astype(np.float32) / 255
    retinted[y0:y1, x0:x1] = (ink * np.asarray(PALETTE[other], dtype=np.float32)).round().astype(np.uint8)
    assert not textured.judge(colours.prompt, retinted)  # the texture kept, the colour changed
    counting = next(s for s in scenes if s.prompt.category == "counting")
    x0, y0, x1, y1 = counting.objects[0].box
    one_less = counting.image.copy()
    one_less[y0:y1, x0:x1] = 0
    assert not textured.judge(counting.prompt, one_less)
