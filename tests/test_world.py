import numpy as np
import pytest

from arrag.world.checker import Detection, judge
from arrag.world.digits import POOL_FRACTIONS, load_pool
from arrag.world.prompts import CATEGORIES, PALETTE, Clause, Prompt, sample_prompt, sample_prompts
from arrag.world.scenes import SCENE_SIZE, relations, render_scene


def test_pools_are_disjoint_stratified_and_cover_the_subset():
    pools = {name: load_pool(name) for name in POOL_FRACTIONS}
    rows = [set(p.source_rows.tolist()) for p in pools.values()]
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    assert sum(len(r) for r in rows) == 5000
    for name, pool in pools.items():
        assert np.bincount(pool.labels).tolist() == [round(500 * POOL_FRACTIONS[name])] * 10


@pytest.mark.parametrize("category", CATEGORIES)
def test_scenes_are_deterministic_and_show_what_the_prompt_says(category):
    glyphs = load_pool("eval")
    prompt = sample_prompt(category, np.random.default_rng(3))
    first, objects = render_scene(prompt, glyphs, np.random.default_rng(5))
    again, _ = render_scene(prompt, glyphs, np.random.default_rng(5))
    other, _ = render_scene(prompt, glyphs, np.random.default_rng(6))
    assert first.shape == (SCENE_SIZE, SCENE_SIZE, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    wanted = sorted(c.digit for c in prompt.clauses for _ in range(c.count))
    assert sorted(o.digit for o in objects) == wanted
    assert all(glyphs.labels[o.glyph] == o.digit for o in objects)  # glyphs come from the given pool
    for clause in prompt.clauses:
        if clause.colour:
            assert any(o.digit == clause.digit and o.colour == clause.colour for o in objects)
    if prompt.relation:
        assert prompt.relation in relations(objects[0].box, objects[1].box)


def test_captions_follow_genevals_templates():
    assert Prompt("counting", (Clause(2, count=3),)).text == "three 2s"
    assert Prompt("position", (Clause(4), Clause(1)), "left of").text == "a 4 left of a 1"
    assert Prompt("color_attr", (Clause(6, colour="red"), Clause(8, colour="white"))).text == "a red 6 and a white 8"
    assert Prompt("single_object", (Clause(8),)).text == "an 8"
    assert [p.category for p in sample_prompts(12, 0)] == list(CATEGORIES) * 2


def test_relations_use_box_centres_with_genevals_threshold():
    left, right = (0, 20, 10, 30), (30, 22, 40, 32)
    assert relations(left, right) == {"left of"}
    assert relations(right, left) == {"right of"}
    assert relations((0, 0, 10, 10), (2, 30, 12, 40)) == {"above"}
    assert relations((0, 0, 10, 10), (1, 1, 11, 11)) == set()  # too close to tell


def test_judge_applies_genevals_rules():
    def d(digit, colour="red", x=0):
        return Detection(digit, colour, (x, 10, x + 10, 20), 1.0)

    three_twos = [d(2, x=0), d(2, x=20), d(2, x=40)]
    assert judge(Prompt("counting", (Clause(2, count=3),)), three_twos)
    assert not judge(Prompt("counting", (Clause(2, count=2),)), three_twos)  # exactly, not at least
    assert not judge(Prompt("counting", (Clause(2, count=4),)), three_twos)
    assert judge(Prompt("colors", (Clause(2, colour="red"),)), three_twos)
    assert not judge(Prompt("colors", (Clause(2, colour="blue"),)), three_twos)
    pair = [d(4, x=0), d(1, "blue", x=40)]
    assert judge(Prompt("position", (Clause(4), Clause(1)), "left of"), pair)
    assert not judge(Prompt("position", (Clause(4), Clause(1)), "right of"), pair)
    assert judge(Prompt("two_object", (Clause(4), Clause(1))), pair)
    assert not judge(Prompt("two_object", (Clause(4), Clause(7))), pair)
    assert not judge(Prompt("color_attr", (Clause(4, colour="red"), Clause(1, colour="red"))), pair)


@pytest.fixture(scope="module")
def checker():
    from arrag.world.report import load_checker

    return load_checker()


def test_checker_accepts_ground_truth_scenes(checker):
    from arrag.world.report import eval_scenes

    prompts, images = eval_scenes(120, seed=11)
    correct = [checker.judge(p, image) for p, image in zip(prompts, images, strict=True)]
    assert np.mean(correct) >= 0.95


def _tint(image: np.ndarray, box: tuple[int, int, int, int], colour: str) -> np.ndarray:
    x0, y0, x1, y1 = box
    out = image.copy()
    ink = image[y0:y1, x0:x1].max(axis=2, keepdims=True).astype(np.float32) / 255.0
    out[y0:y1, x0:x1] = (ink * np.asarray(PALETTE[colour], dtype=np.float32)).round().astype(np.uint8)
    return out


def test_checker_rejects_wrong_colour_count_digit_and_position(checker):
    glyphs = load_pool("eval")
    rng = np.random.default_rng(0)
    colour_prompt = Prompt("colors", (Clause(3, colour="red"),))
    image, objects = render_scene(colour_prompt, glyphs, rng)
    assert checker.judge(colour_prompt, image)
    assert not checker.judge(colour_prompt, _tint(image, objects[0].box, "green"))  # wrong colour
    assert not checker.judge(Prompt("single_object", (Clause(7),)), image)  # wrong digit

    count_prompt = Prompt("counting", (Clause(0, count=3),))
    image, objects = render_scene(count_prompt, glyphs, rng)
    assert checker.judge(count_prompt, image)
    x0, y0, x1, y1 = objects[0].box
    one_less = image.copy()
    one_less[y0:y1, x0:x1] = 0
    assert not checker.judge(count_prompt, one_less)  # wrong count

    position_prompt = Prompt("position", (Clause(4), Clause(1)), "left of")
    image, _ = render_scene(position_prompt, glyphs, rng)
    assert checker.judge(position_prompt, image)
    assert not checker.judge(position_prompt, image[:, ::-1].copy())  # mirrored: the 4 is now right of the 1


def test_world_database_is_built_once_then_loaded_from_its_cache(backend, tmp_path):
    from arrag.world.database import world_database

    first = world_database(backend, tmp_path / "db", scenes=12)
    assert first.num_images == 12
    assert all(name.startswith("world-database-scene-") for name in first.sources)
    stamp = (tmp_path / "db" / "index.faiss").stat().st_mtime_ns
    again = world_database(backend, tmp_path / "db", scenes=12)
    assert (tmp_path / "db" / "index.faiss").stat().st_mtime_ns == stamp
    assert again.sources == first.sources
    bigger = world_database(backend, tmp_path / "db", scenes=15)  # another size is rebuilt, not reused
    assert bigger.num_images == 15


def test_the_shipped_model_loads_and_generates():
    import json

    from arrag.backends import load_backend
    from arrag.backends.builtin import BUILTIN_DIR
    from arrag.config import GenerationConfig
    from arrag.decoding.loop import generate

    backend = load_backend("builtin")
    trained_on = json.loads((BUILTIN_DIR / "generator" / "config.json").read_text())["tokenizer_fingerprint"]
    assert backend.codebook_fingerprint == trained_on  # the generator was trained on the shipped tokenizer
    out = generate(backend, ["a 7", "two 3s"], GenerationConfig(), seeds=[0, 1])
    assert out.images.shape == (2, 3, 64, 64)
    assert out.tokens.shape == (2, 256)


def test_the_demo_writes_a_grid_and_a_judged_summary(tmp_path):
    import json

    from arrag.demo import DemoConfig, run_demo

    config = DemoConfig(out=tmp_path / "demo", cache=tmp_path / "cache", prompts=2, images_per_prompt=1)
    summary = run_demo(config)
    assert (tmp_path / "demo" / "grid.png").is_file()
    assert json.loads((tmp_path / "demo" / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert [(im["method"], im["category"]) for im in summary["images"]] == [  # faid: the shipped adapter
        (method, category) for category in ("single_object", "two_object") for method in ("base", "daid", "faid")
    ]
    assert all(isinstance(im["correct"], bool) for im in summary["images"])


def test_the_builtin_model_retrieves_from_the_world_database_by_default(backend, tmp_path, caplog):
    import logging

    from arrag.backends import load_backend
    from arrag.world.database import default_database, world_database, world_database_dir

    assert default_database(backend, tmp_path / "cache") is None  # another backend has no database of its own
    assert not (tmp_path / "cache").exists()
    builtin = load_backend("builtin")
    directory = world_database_dir(tmp_path / "cache", builtin)
    with caplog.at_level(logging.INFO, logger="arrag.world.database"):
        database = default_database(builtin, tmp_path / "cache")  # built on first use
    assert str(directory) in caplog.text
    stamp = (directory / "index.faiss").stat().st_mtime_ns
    assert default_database(builtin, tmp_path / "cache").sources == database.sources  # then loaded
    assert (directory / "index.faiss").stat().st_mtime_ns == stamp
    assert database.sources == world_database(builtin, directory).sources  # the database arrag demo uses
    assert database.num_images == 2000
