"""arrag serve's functions without a browser: requests -> images and maps, patches -> sources, calibration prefill,
error lines, the provenance picture; on the tiny backend and databases built here."""

from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arrag.backends import load_backend
from arrag.build import BuildConfig, build_database
from arrag.build.sources import SourceConfig
from arrag.cli import build_parser, cli_message, main
from arrag.config import GenerationConfig, RetrievalConfig
from arrag.decoding.loop import generate
from arrag.decoding.weights import AdaptiveWeight
from arrag.evaluation.calibration import CALIBRATION_FILE, DaidSetting
from arrag.images import read_image, read_metadata, to_pil
from arrag.retrieval.database import DatabaseMismatchError, PatchDatabase
from arrag.retrieval.grid import Grid
from arrag.serve.captions import parse_caption
from arrag.serve.provenance import (
    NOT_RETRIEVED,
    SELECTED,
    Provenance,
    SourceImages,
    cell_at,
    cell_box,
    colour,
    heat_map,
    outlined,
    provenance_picture,
)
from arrag.serve.requests import (
    Library,
    Request,
    calibrated_retrieval,
    error_message,
    find_databases,
    prefilled_retrieval,
    provenance_map,
    run,
    save_result,
    select_patch,
    verdict,
)
from arrag.world.prompts import Clause, Prompt, sample_prompts
from arrag.world.report import eval_scenes

BACKEND = "tiny:0"  # the conftest backend, by name
DAID = RetrievalConfig(weight=0.5, k=64)


@pytest.fixture(scope="module")
def built(backend, image_folder, tmp_path_factory) -> Path:
    """A database of the 24 blob images with token shards of 10 images (so ids cross shards)."""
    out = tmp_path_factory.mktemp("serve") / "db"
    build_database(backend, [image_folder], out, BuildConfig(sources=SourceConfig(shard_size=10)))
    return out


@pytest.fixture(scope="module")
def library() -> Library:
    return Library()


@pytest.fixture(scope="module")
def result(library, built):
    request = Request(("a red 7", "three 2s"), BACKEND, built, "daid", DAID, seed=5, images_per_prompt=2)
    return run(library, request)


def test_a_request_gives_both_columns_with_the_seeds_of_generate(backend, built, library, result):
    database = PatchDatabase.load(built)
    prompts = ["a red 7", "three 2s"]
    alone = generate(backend, prompts, GenerationConfig(num_images_per_prompt=2, seed=5))
    daid = generate(
        backend, prompts, GenerationConfig("daid", retrieval=DAID, num_images_per_prompt=2, seed=5), database
    )
    assert torch.equal(result.base.output.tokens, alone.tokens)
    assert torch.equal(result.retrieval.output.tokens, daid.tokens)
    assert [p.seed for p in result.retrieval.pictures] == [5, 6, 7, 8]
    assert [p.prompt for p in result.base.pictures] == ["a red 7", "a red 7", "three 2s", "three 2s"]
    assert np.array_equal(result.retrieval.pictures[1].image, np.asarray(to_pil(daid.images[1])))
    assert all(p.verdict is None for p in result.base.pictures)  # the world's checker judges builtin scenes only
    assert result.retrieval.settings.database == str(built) and result.base.settings.database is None


def test_progress_reports_the_rows_of_both_columns(library, built):
    seen: list[tuple[float, str]] = []
    run(library, Request(("a 3",), BACKEND, built, "daid", DAID), lambda done, text: seen.append((done, text)))
    assert len(seen) == 16  # 8 rows of the 8×8 grid, model alone then DAiD
    assert [done for done, _ in seen] == pytest.approx([i / 16 for i in range(1, 17)])
    assert seen[0][1] == "model alone: row 1 of 8" and seen[-1][1] == "with DAiD: row 8 of 8"


def test_method_none_serves_the_model_alone(library):
    served = run(library, Request(("a 3",), BACKEND, None, "none"))
    assert served.retrieval is None and len(served.base.pictures) == 1
    with pytest.raises(ValueError, match="no retrieval"):
        served.provenance(0)


def test_concurrent_requests_get_their_own_images(backend, built, library):
    database = PatchDatabase.load(built)
    seeds, results, start = (0, 7), {}, threading.Barrier(2)

    def serve(seed: int) -> None:
        start.wait()
        results[seed] = run(library, Request(("a 4 left of a 1",), BACKEND, built, "daid", DAID, seed=seed))

    threads = [threading.Thread(target=serve, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for seed in seeds:
        expected = generate(backend, "a 4 left of a 1", GenerationConfig("daid", retrieval=DAID, seed=seed), database)
        assert torch.equal(results[seed].retrieval.output.tokens, expected.tokens)
        assert results[seed].request.seed == seed
    assert not torch.equal(results[0].retrieval.output.tokens, results[7].retrieval.output.tokens)


def test_heat_map_tints_each_cell_by_its_share():
    grid = Grid(2, 2)
    share = np.array([[np.nan, 0.0], [0.5, 1.0]])
    missing = np.full((2, 2), -1)
    provenance = Provenance(grid, share, missing, missing, np.full((2, 2), np.nan))
    picture = np.asarray(heat_map(np.zeros((32, 32, 3), np.uint8), provenance))  # black image: the tint alone
    assert picture.shape == (256, 256, 3)  # enlarged ×8 to the display width
    centres = {(0, 0): NOT_RETRIEVED, (0, 1): colour(np.array(0.0)), (1, 0): colour(np.array(0.5))}
    centres[(1, 1)] = colour(np.array(1.0))
    for (r, c), expected in centres.items():
        assert np.abs(picture[64 + 128 * r, 64 + 128 * c] - 0.65 * np.asarray(expected)).max() <= 1
    selected = np.asarray(heat_map(np.zeros((32, 32, 3), np.uint8), provenance, selected=(1, 0)))
    x0, y0, _, _ = cell_box((1, 0), grid, (256, 256))
    assert tuple(selected[y0 + 1, x0 + 40]) == SELECTED


def test_a_pixel_maps_to_the_cell_under_it():
    grid = Grid(8, 6)
    for r in range(grid.rows):
        for c in range(grid.cols):
            x0, y0, x1, y1 = cell_box((r, c), grid, (240, 320))
            assert cell_at((x0 + x1) / 2, (y0 + y1) / 2, (240, 320), grid) == (r, c)
            assert cell_at(x0, y0, (240, 320), grid) == (r, c) and cell_at(x1, y1, (240, 320), grid) == (r, c)
    assert cell_at(-5, 999, (240, 320), grid) == (7, 0)  # clamped onto the grid


def test_selecting_a_patch_shows_its_source_outlined_with_its_distance(backend, built, library, result, image_folder):
    records, grid = result.retrieval.output.records, result.grid
    t = int(torch.nonzero(records.image_ids[1] >= 0)[0])
    (r, c), image_id = grid.cell(t), int(records.image_ids[1, t])
    view = select_patch(library, result, 1, 32 * c + 16, 32 * r + 16)  # the map is 256 px: 32 px a cell
    assert view.patch.cell == (r, c) and view.patch.image_id == image_id
    assert view.patch.distance == pytest.approx(float(records.distances[1, t]))
    assert view.patch.share == pytest.approx(float(records.retrieval_share[1, t]))
    assert view.patch.source_cell == grid.cell(int(records.positions[1, t]))
    assert f"database image {image_id}" in view.text and f"{view.patch.distance:.3g}" in view.text
    database = PatchDatabase.load(built)
    assert database.sources[image_id] in view.text
    # the thumbnail is the database's image: the tokens of its source file, decoded, with the source patch outlined
    tokens = backend.encode(backend.preprocess(read_image(Path(database.sources[image_id])))[None])
    decoded = np.asarray(to_pil(backend.decode(tokens)[0]))
    assert np.array_equal(np.asarray(view.source), np.asarray(outlined(decoded, view.patch.source_cell, grid)))
    x0, y0, _, _ = cell_box(view.patch.source_cell, grid, view.source.size)
    assert view.source.getpixel((x0 + 1, y0 + 1)) == SELECTED
    box = cell_box((r, c), grid, view.map.size)
    assert view.map.getpixel((box[0] + 1, box[1] + 1)) == SELECTED  # the selected cell outlined on the map


def test_a_patch_without_a_source_says_why(library, result):
    view = select_patch(library, result, 0, 3, 3)  # cell (0, 0): its neighbourhood falls off the grid
    assert view.source is None and view.patch.share is None and "nothing was retrieved" in view.text
    assert provenance_map(result, 0).size == (256, 256)


def test_source_images_fall_back_to_the_source_file_and_else_to_none(backend, built, database):
    loaded = PatchDatabase.load(built)
    from_file = SourceImages(loaded, backend, None)(3)  # no folder: no token shards to read
    expected = backend.preprocess(read_image(Path(loaded.sources[3])))
    assert np.array_equal(from_file, np.asarray(to_pil((expected + 1) / 2)))
    assert SourceImages(database, backend, None)(0) is None  # built in memory from images without files
    assert SourceImages(loaded, backend, built)(len(loaded.sources)) is None


def test_save_result_writes_pngs_sidecars_and_provenance_pictures(library, result, tmp_path):
    written = save_result(library, result, tmp_path)
    names = {path.name for path in written}
    assert {
        "prompt001-image01-none.png",
        "prompt001-image01-daid.json",
        "prompt000-image00-daid-provenance.png",
    } <= names
    assert len(written) == 4 * 2 * 2 + 4 and all(path.is_file() for path in written)
    metadata = read_metadata(tmp_path / "prompt001-image00-daid.png")
    assert metadata == json.loads((tmp_path / "prompt001-image00-daid.json").read_text())
    assert metadata["seed"] == 7 and metadata["config"]["method"] == "daid"
    assert metadata["provenance"]["image_ids"] == result.retrieval.output.records.image_ids[2].tolist()


def test_provenance_picture_shows_the_cells_that_took_most_from_retrieval(backend, built, library, result):
    provenance = result.provenance(0)
    top = provenance.top(4)
    shares = [provenance.share[cell] for cell in top]
    assert len(top) == 4 and shares == sorted(shares, reverse=True)
    assert all(provenance.image_ids[cell] >= 0 for cell in top)
    sources = SourceImages(PatchDatabase.load(built), backend, built)
    picture = provenance_picture(result.retrieval.pictures[0].image, provenance, sources)
    assert picture.width > 3 * 256 and picture.height >= 256


def test_calibration_prefills_the_chosen_setting_and_tolerates_its_absence(tmp_path):
    assert calibrated_retrieval(tmp_path) is None  # no calibration.json

    def chosen(setting: dict | None) -> Path:
        (tmp_path / CALIBRATION_FILE).write_text(
            json.dumps({"format": "arrag-calibration", "chosen": {"setting": setting}})
        )
        return tmp_path

    fixed = DaidSetting("sum", 2.0, 256, AdaptiveWeight("fixed", 0.05))
    assert calibrated_retrieval(chosen(fixed.to_dict())) == RetrievalConfig(0.05, 2.0, 256, "sum")
    gated = DaidSetting("nearest", 1.0, 512, AdaptiveWeight("gated", 0.2, threshold=3.0))
    assert calibrated_retrieval(chosen(gated.to_dict())) == RetrievalConfig(0.2, 1.0, 512, "nearest", gated.weight)
    assert calibrated_retrieval(chosen(None)) is None  # calibration chose the model alone
    (tmp_path / CALIBRATION_FILE).write_text("{not json")
    assert calibrated_retrieval(tmp_path) is None


def test_the_page_prefills_the_calibrated_setting_or_the_defaults(tmp_path):
    assert prefilled_retrieval(None) == (RetrievalConfig(), prefilled_retrieval(tmp_path)[1])
    assert "arrag's defaults" in prefilled_retrieval(tmp_path)[1]
    setting = DaidSetting("sum", 0.5, 128, AdaptiveWeight("fixed", 0.1)).to_dict()
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"chosen": {"setting": setting}}))
    config, line = prefilled_retrieval(str(tmp_path))
    assert config == RetrievalConfig(0.1, 0.5, 128, "sum") and "calibration.json" in line


def test_databases_are_those_named_then_the_cached_world_ones(built, tmp_path):
    (tmp_path / "world-db-abc").symlink_to(built, target_is_directory=True)
    (tmp_path / "world-db-unfinished").mkdir()  # no manifest: not offered
    (tmp_path / "other").symlink_to(built, target_is_directory=True)  # not a world database's name
    found = find_databases(tmp_path, [built])
    assert [choice.path for choice in found] == [built, tmp_path / "world-db-abc"]
    assert found[0].backend == BACKEND and found[0].images == 24
    assert found[0].label == f"db ({BACKEND}, 24 images)"
    with pytest.raises(FileNotFoundError, match="not a patch database"):
        find_databases(tmp_path, [tmp_path / "other" / "missing"])


def form(**changes):
    fields = {
        "prompts": "a red 7\n\n three 2s ",
        "backend": BACKEND,
        "database": "db",
        "method": "daid",
        "weight": 0.3,
        "tau": 1.0,
        "k": 64.0,
        "duplicates": "nearest",
        "seed": 3.0,
        "images": 2.0,
    }
    return Request.from_form(**{**fields, **changes})


def test_the_form_becomes_a_request():
    request = form()
    assert request.prompts == ("a red 7", "three 2s") and request.database == Path("db")
    assert request.retrieval == RetrievalConfig(0.3, 1.0, 64, "nearest")
    assert (request.seed, request.images_per_prompt) == (3, 2)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"weight": 1.5}, "retrieval weight λ must be in [0, 1]"),
        ({"weight": None}, "retrieval weight λ must be in [0, 1]"),
        ({"tau": 0.0}, "retrieval temperature τ must be a finite number > 0"),
        ({"prompts": "  \n "}, "no prompts given; type one per line"),
        ({"k": 2.5}, "k must be a whole number, got 2.5"),
        ({"images": 9.0}, "images per prompt must be between 1 and 4, got 9"),
        ({"database": None}, "method 'daid' needs a patch database"),
        ({"method": "magic"}, "method must be one of"),
    ],
)
def test_bad_fields_are_refused_with_one_line(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        form(**changes)
    line = error_message(refused.value, cli_message)
    assert message in line and "\n" not in line and "Traceback" not in line


def test_a_database_for_another_tokenizer_is_refused_in_the_cli_wording(library, built):
    with pytest.raises(DatabaseMismatchError) as refused:
        run(library, Request(("a 3",), "tiny:1", built, "daid", DAID))
    line = error_message(refused.value, cli_message)
    assert "this database was built for backend 'tiny:0'" in line
    assert "arrag db build IMAGES --backend tiny:1 --out DIR" in line and "\n" not in line
    assert error_message(ValueError("a\nb  c"), str) == "a b c"


def test_faid_without_a_shipped_adapter_says_so(library, built):
    with pytest.raises(ValueError, match="none is shipped for backend 'tiny:0'; use DAiD"):
        run(library, Request(("a 3",), BACKEND, built, "faid", DAID))


def test_world_captions_read_back_into_their_prompts():
    prompts = sample_prompts(600, seed=11)
    assert all(parse_caption(prompt.text) == prompt for prompt in prompts)
    assert parse_caption("  A  Red 7 ") == Prompt("colors", (Clause(7, colour="red"),))
    for text in ("a photo of a cat", "an 7", "a 7 and", "two 3s and a 4", "a red 7 left of a 1", "a red 7 and a 1"):
        assert parse_caption(text) is None


def test_the_checker_judges_builtin_world_scenes_only(library):
    builtin, tiny = library.backend("builtin"), library.backend(BACKEND)
    prompts, scenes = eval_scenes(6)
    checker = library.checker()
    for prompt, scene in zip(prompts, scenes, strict=True):
        assert verdict(library, builtin, prompt.text, scene) == checker.judge(prompt, scene)
    assert sum(verdict(library, builtin, p.text, s) for p, s in zip(prompts, scenes, strict=True)) >= 5
    assert verdict(library, builtin, "a photo of a cat", scenes[0]) is None  # not a world prompt
    assert verdict(library, tiny, prompts[0].text, scenes[0][:32, :32]) is None  # not the world's model
    assert load_backend("builtin").image_size == 64


def test_serve_listens_on_localhost_by_default(built):
    args = build_parser().parse_args(["serve", "--db", str(built)])
    assert (args.host, args.port, args.db, args.backend) == ("127.0.0.1", 7860, [built], None)


def test_heat_map_grid_is_aligned_with_the_image(result):
    """The map's cell edges fall on token cell edges of the enlarged image: 32 px a cell for the tiny 32 px image."""
    picture = np.asarray(provenance_map(result, 0)).astype(int)
    assert picture.shape == (256, 256, 3)
    for edge in range(32, 256, 32):
        assert (picture[:, edge] == 0).all() and (picture[edge, :] == 0).all()  # black cell edges
    assert not math.isnan(float(result.retrieval.output.records.retrieval_share[0, 9]))
    assert Image.fromarray(picture.astype(np.uint8)).size == (256, 256)


def test_generate_writes_the_provenance_picture_beside_each_image(backend, built, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["generate", "a 3", "--backend", BACKEND, "--db", str(built), "--num-images", "2", "--out", str(out)]
    assert main([*argv, "--provenance"]) == 0
    pictures = sorted(out.glob("*-provenance.png"))
    images = sorted(set(out.glob("*.png")) - set(pictures))
    assert [p.name for p in pictures] == [f"{p.stem}-provenance.png" for p in images] and len(images) == 2
    database = PatchDatabase.load(built)
    config = GenerationConfig("daid", sampling=backend.sampling, num_images_per_prompt=2)
    expected = generate(backend, ["a 3"], config, database)
    sources = SourceImages(database, backend, built)
    for row, path in enumerate(pictures):
        image = np.asarray(to_pil(expected.images[row]))
        drawn = provenance_picture(image, Provenance.of(expected.records, row, backend.grid), sources)
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(drawn))
    assert main([*argv[:-2], "--out", str(tmp_path / "none"), "--method", "none", "--provenance"]) == 2
    assert "--provenance shows where retrieved tokens came from" in capsys.readouterr().err


def test_the_page_builds_with_its_labelled_columns(library, built, tmp_path):
    gradio = pytest.importorskip("gradio")
    from arrag.serve.layout import build_app

    app = build_app(library, find_databases(tmp_path, [built]), BACKEND, cli_message, tmp_path / "downloads")
    assert isinstance(app, gradio.Blocks)
    ids = {block.elem_id for block in app.blocks.values()}
    assert {"prompts", "method", "generate", "base", "retrieval", "provenance", "source", "message"} <= ids
    titles = [block.value for block in app.blocks.values() if isinstance(block, gradio.Markdown)]
    assert {"### Model alone", "### With retrieval", "### Provenance map", "### Source patch"} <= set(titles)
