import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from arrag.cli import main


@pytest.fixture
def messy_folder(image_folder, tmp_path):
    """Good images plus a corrupt PNG, a truncated JPEG, a text file and a nested folder."""
    folder = tmp_path / "messy"
    shutil.copytree(image_folder, folder / "nested")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.open(image_folder / "blob00.png").convert("RGB").save(folder / "photo.jpg")
    data = (folder / "photo.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_db_build_skips_bad_files_and_reports_them(messy_folder, tmp_path, capsys):
    assert main(["db", "build", str(messy_folder), "--out", str(tmp_path / "db"), "--backend", "tiny"]) == 0
    report = json.loads((tmp_path / "db" / "build-report.json").read_text())
    assert report["images_added"] == 25  # 24 nested + photo.jpg; notes.txt is not looked at
    assert sorted(s["path"].rsplit("/", 1)[1] for s in report["skipped"]) == ["corrupt.png", "truncated.jpg"]
    assert all(s["reason"] for s in report["skipped"])
    assert main(["db", "info", str(tmp_path / "db")]) == 0
    assert f"entries: {25 * 42}" in capsys.readouterr().out


def test_generate_writes_pngs_with_every_parameter(image_folder, tmp_path):
    db = tmp_path / "db"
    assert main(["db", "build", str(image_folder), "--out", str(db), "--backend", "tiny"]) == 0
    out = tmp_path / "out"
    argv = [
        "generate",
        "a red 7",
        "two cats",
        "--db",
        str(db),
        "--lambda",
        "0.4",
        "--tau",
        "0.5",
        "--k",
        "8",
        "--num-images",
        "2",
        "--seed",
        "5",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    pngs = sorted(out.glob("*.png"))
    names = ["000-a-red-7-image00", "000-a-red-7-image01", "001-two-cats-image00", "001-two-cats-image01"]
    assert [p.name for p in pngs] == [f"{name}.png" for name in names]
    sidecar = json.loads(pngs[3].with_suffix(".json").read_text())
    assert sidecar["prompt"] == "two cats"
    assert sidecar["seed"] == 8
    assert sidecar["backend"] == "tiny:0"  # the name that loads the backend again
    assert sidecar["config"]["method"] == "daid"
    assert sidecar["config"]["retrieval"] == {
        "weight": 0.4,
        "temperature": 0.5,
        "k": 8,
        "duplicates": "nearest",
        "rule": None,
    }
    assert sidecar["config"]["sampling"]["guidance_scale"] == 5.0
    assert len(sidecar["tokens"]) == 64
    assert len(sidecar["provenance"]["image_ids"]) == 64
    assert json.loads(Image.open(pngs[3]).text["arrag"]) == sidecar


def test_an_existing_database_is_never_overwritten_by_accident(image_folder, tmp_path, capsys):
    db = tmp_path / "db"
    assert main(["db", "build", str(image_folder), "--out", str(db), "--backend", "tiny"]) == 0
    before = (db / "index.faiss").read_bytes()
    assert main(["db", "build", str(image_folder / "blob00.png"), "--out", str(db), "--backend", "tiny"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (db / "index.faiss").read_bytes() == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "", "--backend", "tiny"], "prompt is empty"),
        (["generate", "a cat", "--lambda", "1.5"], "λ must be in [0, 1]"),
        (["generate", "a cat", "--tau", "0"], "τ must be"),
        (["generate", "a cat", "--k", "0"], "k must be an integer >= 1"),
        (["generate", "a cat", "--backend", "nope"], "unknown backend"),
        (["generate", "a cat", "--db", "/nonexistent"], "not a patch database"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_database_of_another_tokenizer_is_refused(image_folder, tmp_path, capsys):
    db = tmp_path / "db"
    assert main(["db", "build", str(image_folder), "--out", str(db), "--backend", "tiny:1"]) == 0
    assert main(["generate", "a cat", "--db", str(db), "--backend", "tiny:0", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "codebook fingerprint" in err
    assert "tiny:1" in err
    assert "tiny:0" in err


def test_a_folder_without_images_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.png").write_bytes(b"junk")
    assert main(["db", "build", str(tmp_path / "empty"), "--out", str(tmp_path / "db"), "--backend", "tiny"]) == 2
    assert main(["db", "build", str(tmp_path / "bad.png"), "--out", str(tmp_path / "db"), "--backend", "tiny"]) == 2
    assert "could be read" in capsys.readouterr().err
    assert not (tmp_path / "db" / "manifest.json").exists()
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"image": pa.array([], pa.binary())}), empty)
    assert main(["db", "build", str(empty), "--out", str(tmp_path / "db"), "--backend", "tiny"]) == 2
    assert "hold no images" in capsys.readouterr().err
    assert not (tmp_path / "db" / "build").exists()  # nothing to resume: the next build starts afresh
    assert main(["db", "build", str(tmp_path / "empty"), "--out", str(tmp_path / "db"), "--backend", "tiny"]) == 2
    assert "no image files found" in capsys.readouterr().err
    fake = tmp_path / "fake.parquet"
    fake.write_text("junk")
    assert main(["db", "build", str(fake), "--out", str(tmp_path / "db"), "--backend", "tiny"]) == 2
    assert "unreadable Parquet file" in capsys.readouterr().err  # why nothing could be read


def test_ctrl_c_says_how_to_resume_and_resume_finishes(tmp_path):
    db = tmp_path / "db"
    command = [sys.executable, "-m", "arrag", "db", "build", "world:600", "--out", str(db), "--backend", "builtin"]
    build = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    first_shard = db / "build" / "tokenized" / "000000.json"
    deadline = time.monotonic() + 120
    while not first_shard.exists() and build.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    build.send_signal(signal.SIGINT)
    _, err = build.communicate(timeout=60)
    assert build.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert main(["db", "build", "world:600", "--out", str(db), "--backend", "builtin", "--resume"]) == 0
    assert json.loads((db / "manifest.json").read_text())["counts"]["images"] == 600


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "arrag", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("arrag ")


def test_sampling_options_override_the_backends_own_and_zero_turns_a_filter_off():
    from arrag.backends.builtin import tiny_backend
    from arrag.cli import build_parser
    from arrag.cli.options import generation_config
    from arrag.config import SamplingConfig

    backend = tiny_backend(seed=0)
    backend.sampling = SamplingConfig(guidance_scale=3.0, temperature=0.9, top_k=20, top_p=0.95)
    parse = build_parser().parse_args
    assert generation_config(parse(["generate", "a 7"]), backend).sampling == backend.sampling
    changed = generation_config(parse(["generate", "a 7", "--guidance-scale", "6", "--top-k", "0"]), backend)
    assert changed.sampling == SamplingConfig(guidance_scale=6.0, temperature=0.9, top_k=None, top_p=0.95)


def test_a_trained_generator_is_decoded_with_the_sampling_recorded_beside_it(tmp_path):
    from arrag.backends.builtin import recommended_sampling
    from arrag.config import SamplingConfig

    (tmp_path / "config.json").write_text(json.dumps({"transformer": {}}))
    assert recommended_sampling(tmp_path) == SamplingConfig()
    (tmp_path / "config.json").write_text(json.dumps({"sampling": {"guidance_scale": 3.0, "top_k": 20}}))
    assert recommended_sampling(tmp_path) == SamplingConfig(guidance_scale=3.0, top_k=20)
    (tmp_path / "config.json").write_text(json.dumps({"sampling": {"top_k": -1}}))
    with pytest.raises(ValueError, match="top_k"):
        recommended_sampling(tmp_path)


def test_sampling_candidates_read_as_guidance_and_optional_top_k(capsys):
    from arrag.cli.world import sampling_candidate
    from arrag.config import SamplingConfig

    assert sampling_candidate("3:20") == SamplingConfig(guidance_scale=3.0, top_k=20)
    assert sampling_candidate("5") == SamplingConfig(guidance_scale=5.0)
    assert main(["world", "report", "--part", "sampling", "--candidates", "three"]) == 2
    assert "GUIDANCE:TOP_K" in capsys.readouterr().err


@pytest.mark.parametrize("position", ["before", "after"])
def test_verbose_shows_the_traceback_before_the_message_in_either_position(tmp_path, capsys, position):
    build = ["db", "build", str(tmp_path / "none"), "--out", str(tmp_path / "db"), "--backend", "tiny"]
    assert main(build) == 2
    quiet = capsys.readouterr().err
    assert "Traceback" not in quiet and quiet.count("\n") == 1
    assert main(["-v", *build] if position == "before" else [*build, "-v"]) == 2
    loud = capsys.readouterr().err
    assert "Traceback" in loud and loud.endswith(quiet)  # the traceback, then the same one line


def test_global_options_are_read_after_any_subcommand():
    from arrag.cli import build_parser

    parse = build_parser().parse_args
    assert not parse(["generate", "a red 7"]).verbose
    assert parse(["-v", "generate", "a red 7"]).verbose
    assert parse(["generate", "-v", "a red 7"]).verbose
    assert parse(["db", "build", "-v", "x", "--out", "y"]).verbose
    assert parse(["train", "faid", "--out", "x", "--steps", "1", "-v"]).verbose


def test_library_errors_are_printed_with_the_flags_that_set_their_arguments(image_folder, tmp_path, capsys):
    from arrag.cli import CLI_FLAGS, cli_message

    build = ["db", "build", str(image_folder), "--out", str(tmp_path / "db"), "--backend", "tiny"]
    assert main([*build, "--index", "IVF4,CodebookPQ", "--train-size", "0"]) == 2
    assert "--train-size must be >= 1" in capsys.readouterr().err
    assert main([*build, "--index", "IVF4,PQ4x4fs", "--on-disk"]) == 2
    assert "no --on-disk" in capsys.readouterr().err
    assert main(["generate", "a 7", "--backend", "tiny", "--dtype", "bfloat16"]) == 2
    assert "--dtype" in capsys.readouterr().err
    message = "pass resume=True or overwrite=True, raise train_size, use key_source='codebook' or on_disk=False"
    assert cli_message(message) == (
        "pass --resume or --overwrite, raise --train-size, use --key-source codebook or no --on-disk"
    )
    assert cli_message("pass backend=DIR; unknown backend; check address; /runs/out=1/address") == (
        "pass --backend DIR; unknown backend; check --address; /runs/out=1/address"
    )
    assert cli_message("--resume and --train-size stay; so do train_sizes and self.address") == (
        "--resume and --train-size stay; so do train_sizes and self.address"
    )
    assert all(flag.removeprefix("no ").startswith(("--", "arrag ")) for flag in CLI_FLAGS.values())  # or a command
    assert cli_message("abandon it with rollback()") == "abandon it with arrag db rollback"


def test_the_training_command_is_the_argv_given_to_main(tmp_path):
    out = tmp_path / "classifier"
    argv = ["train", "classifier", "--out", str(out), "--steps", "1"]
    assert main(argv) == 0
    assert json.loads((out / "config.json").read_text())["command"] == "arrag " + " ".join(argv)


def test_one_name_per_option_and_defaults_from_the_library(capsys):
    from arrag.cli import build_parser
    from arrag.evaluation.experiment import EvalConfig
    from arrag.faid.blender import FaidConfig
    from arrag.faid.train import FaidSchedule

    parse = build_parser().parse_args
    faid = parse(["train", "faid", "--out", "x", "--steps", "1"])
    assert tuple(faid.blender_hops) == FaidConfig().hops and faid.learning_rate == FaidSchedule(1).learning_rate
    assert parse(["train", "faid", "--out", "x", "--steps", "1", "--learning-rate", "5e-4"]).learning_rate == 5e-4
    assert parse(["train", "generator", "--out", "x", "--tokenizer", "t", "--learning-rate", "4e-4"]).learning_rate
    assert parse(["generate", "a 7", "--lambda", "0.2"]).weight == parse(["generate", "a 7", "--weight", "0.2"]).weight
    for old in (["--lr", "5e-4"], ["--hops", "1"]):
        with pytest.raises(SystemExit):
            parse(["train", "faid", "--out", "x", "--steps", "1", *old])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse(["eval", "--help"])
    assert "test seeds (default: " + " ".join(map(str, EvalConfig().seeds)) in " ".join(capsys.readouterr().out.split())


def test_train_faid_for_another_backend_follows_the_faid_recipe(backend, image_folder, tmp_path):
    import numpy as np

    db, data, out = tmp_path / "db", tmp_path / "data.npz", tmp_path / "adapter"
    assert main(["db", "build", str(image_folder), "--out", str(db), "--backend", "tiny"]) == 0
    tokens = np.random.default_rng(0).integers(0, backend.codebook_size, (6, backend.grid.size))
    np.savez(data, captions=np.array(["a red 7", "two blue 3s"] * 3), tokens=tokens)
    argv = ["train", "faid", "--backend", "tiny", "--data", str(data), "--db", str(db), "--out", str(out)]
    options = ["--steps", "3", "--batch-size", "2", "--k", "4", "--probes", "0", "--blender-hops", "1"]
    assert main([*argv, *options, "--learning-rate", "5e-4"]) == 0
    recorded = json.loads((out / "train-config.json").read_text())
    assert recorded["train"]["learning_rate"] == 5e-4 and recorded["train"]["warmup_steps"] == 1  # 10%, at least 1
    assert recorded["train"]["checkpoint_every"] == 50 and recorded["faid"]["hops"] == [1]
    assert recorded["command"].startswith("arrag train faid --backend tiny")


def test_each_generate_writes_a_fresh_run_folder_and_names_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = ["--backend", "tiny", "--num-images", "2"]
    assert main(["generate", "a red 7", *tiny]) == 0
    assert capsys.readouterr().out.endswith("2 images in samples/run-0001\n")
    first = {path.name: path.read_bytes() for path in (tmp_path / "samples" / "run-0001").iterdir()}
    assert main(["generate", "a red 7", *tiny, "--seed", "9"]) == 0  # the same names, another request
    assert capsys.readouterr().out.endswith("2 images in samples/run-0002\n")
    assert {path.name: path.read_bytes() for path in (tmp_path / "samples" / "run-0001").iterdir()} == first
    assert sorted(path.name for path in (tmp_path / "samples" / "run-0002").glob("*.png")) == sorted(
        name for name in first if name.endswith(".png")
    )


def test_an_out_holding_an_earlier_run_is_refused_unless_overwrite_and_a_file_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    tiny = ["--backend", "tiny", "--out", str(out)]
    assert main(["generate", "a red 7", "two cats", *tiny]) == 0
    (out / "notes.txt").write_text("not arrag's")
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert main(["generate", "a blue 3", *tiny]) == 2
    assert "holds an earlier run's output; pass --overwrite to replace it" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert main(["generate", "a blue 3", *tiny, "--overwrite"]) == 0  # the earlier run's images go, no other file
    assert sorted(path.name for path in out.iterdir()) == [
        "000-a-blue-3-image00.json",
        "000-a-blue-3-image00.png",
        "notes.txt",
    ]
    capsys.readouterr()
    # checked first: the backend that does not exist is never reached
    assert main(["generate", "a blue 3", "--backend", "nope", "--out", str(out / "notes.txt")]) == 2
    assert (
        capsys.readouterr().err
        == f"arrag: error: {out / 'notes.txt'} is a file, not a folder; write to a folder (--out DIR)\n"
    )


def test_images_are_those_of_one_call_whatever_the_batch_size(tmp_path):
    for size in (1, 4):
        argv = ["generate", "a red 7", "two cats", "--backend", "tiny", "--num-images", "3", "--seed", "2"]
        assert main([*argv, "--batch-size", str(size), "--out", str(tmp_path / str(size))]) == 0
    one, four = ({path.name: path for path in (tmp_path / str(size)).iterdir()} for size in (1, 4))
    assert len(one) == 12 and one.keys() == four.keys()
    for name, path in one.items():
        if name.endswith(".json"):  # every token, seed and setting
            assert path.read_text() == four[name].read_text()
        else:  # decoded in batches of another size: the last bit of a pixel may differ
            first, second = (np.asarray(Image.open(p), dtype=int) for p in (path, four[name]))
            assert np.abs(first - second).max() <= 1


def test_save_writes_images_with_their_metadata_and_never_over_an_earlier_run(backend, tmp_path):
    from arrag import GenerationConfig, Settings, generate, save
    from arrag.images import read_metadata

    config = GenerationConfig(num_images_per_prompt=2, seed=4)
    output = generate(backend, ["a red 7", "a red 7"], config)
    settings = Settings(backend.name, config)
    paths = save(output, settings, tmp_path / "out")
    names = ["000-a-red-7-image00", "000-a-red-7-image01", "001-a-red-7-image00", "001-a-red-7-image01"]
    assert [path.name for path in paths] == [f"{name}.png" for name in names]  # the same prompt twice: two indexes
    metadata = read_metadata(paths[3])
    assert metadata == json.loads(paths[3].with_suffix(".json").read_text())
    assert metadata["seed"] == 7 and metadata["tokens"] == output.tokens[3].tolist()
    assert metadata["backend"] == backend.name and metadata["config"] == json.loads(json.dumps(config.to_dict()))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save(output, settings, tmp_path / "out")
    assert save(output, settings, tmp_path / "out", overwrite=True) == paths


def test_ctrl_c_keeps_the_finished_images_and_says_where_they_are(tmp_path):
    from cli_process import ctrl_c

    out = tmp_path / "out"
    argv = ["generate", "a cat", "--backend", "tiny", "--num-images", "100000", "--batch-size", "4", "--out", str(out)]
    code, err = ctrl_c(argv, lambda _: len(list(out.glob("*.png"))) >= 4)
    kept = sorted(out.glob("*.png"))
    assert code == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == f"arrag: interrupted: {len(kept)} of 100000 images are in {out}"
    assert [path.name for path in kept] == [f"000-a-cat-image{i:05d}.png" for i in range(len(kept))]
    assert all(path.with_suffix(".json").is_file() for path in kept) and not list(out.glob(".*"))


def test_retrieval_without_a_database_says_how_to_build_one(capsys):
    assert main(["generate", "a cat", "--backend", "tiny", "--method", "daid"]) == 2
    assert "needs a patch database for tiny:0: build one with arrag db build IMAGES --backend tiny:0 --out DB" in (
        capsys.readouterr().err
    )


def test_the_builtin_model_retrieves_from_its_own_world_database_by_default(tmp_path):
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    argv = ["generate", "a red 7", "--method", "daid", "--out", str(tmp_path / "out")]
    result = subprocess.run([sys.executable, "-m", "arrag", *argv], env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    [directory] = (tmp_path / "cache" / "arrag").glob("world-db-*")
    assert f"arrag: DAiD over the built-in world database at {directory} (built now, on first use)\n" in result.stderr
    sidecar = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert sidecar["database"] == str(directory) and sidecar["config"]["method"] == "daid"
    assert any(image_id >= 0 for image_id in sidecar["provenance"]["image_ids"])  # tokens came from the database


def test_generate_says_what_it_does_with_the_options_given(image_folder, tmp_path, capsys):
    db = tmp_path / "db"
    assert main(["db", "build", str(image_folder), "--out", str(db), "--backend", "tiny"]) == 0
    capsys.readouterr()
    assert (
        main(["generate", "a 7", "--backend", "tiny", "--lambda", "0.5", "--tau", "2", "--out", str(tmp_path / "a")])
        == 0
    )
    assert "arrag: warning: --weight, --tau have no effect without DAiD (the method is none, as no --db is given;" in (
        capsys.readouterr().err
    )
    assert main(["generate", "a 7", "--db", str(db), "--method", "none", "--k", "4", "--out", str(tmp_path / "b")]) == 0
    assert (
        "arrag: warning: --k has no effect without DAiD (the method is none; --method daid" in capsys.readouterr().err
    )
    assert main(["generate", "a 7", "--db", str(db), "--k", "4", "--out", str(tmp_path / "c")]) == 0
    err = capsys.readouterr().err
    assert "no effect" not in err
    assert f"arrag: backend tiny:0: the one {db} was built with (--backend chooses another)\n" in err
    assert "image/s]" in err  # the progress bar's rate


def test_log_lines_are_written_above_the_progress_bar_not_onto_it(image_folder, tmp_path):
    db = tmp_path / "db"
    assert main(["db", "build", str(image_folder), "--out", str(db), "--backend", "tiny"]) == 0
    argv = [
        "-v",
        "generate",
        "a 7",
        "--db",
        str(db),
        "--num-images",
        "3",
        "--batch-size",
        "1",
        "--out",
        str(tmp_path / "o"),
    ]
    result = subprocess.run([sys.executable, "-m", "arrag", *argv], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("k = 2048 is more than the database's") == 3  # logged in each batch, under the bar
    assert not re.search(r"[^\r\n](INFO|WARNING) arrag", result.stderr)


def test_db_rollback_puts_back_the_database_an_interrupted_overwrite_replaced(image_folder, tmp_path, capsys):
    from arrag.backends import load_backend
    from arrag.build import build_database

    db = tmp_path / "db"
    assert main(["db", "build", str(image_folder), "--out", str(db), "--backend", "tiny"]) == 0
    manifest = (db / "manifest.json").read_text()

    def interrupt(stage, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_database(load_backend("tiny"), [image_folder], db, overwrite=True, on_shard_done=interrupt)
    capsys.readouterr()
    assert main(["db", "info", str(db)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "arrag db rollback" in err and "build/previous" in err
    assert main(["db", "rollback", str(db)]) == 0
    assert "holds its database as before" in capsys.readouterr().out
    assert (db / "manifest.json").read_text() == manifest
    assert main(["db", "rollback", str(db)]) == 2
    assert "no unfinished build or add to roll back" in capsys.readouterr().err


def test_db_calibrate_reports_and_writes_calibration_json(image_folder, tmp_path, capsys):
    """A database of the held-out images themselves informs the model: the report says so and is saved."""
    db = tmp_path / "db"
    assert main(["db", "build", str(image_folder), "--out", str(db), "--backend", "tiny"]) == 0
    capsys.readouterr()
    assert main(["db", "calibrate", str(db), str(image_folder), "--max-images", "12"]) == 0
    out = capsys.readouterr().out
    assert "DAiD calibration: backend tiny:0" in out and "12 images" in out
    report = json.loads((db / "calibration.json").read_text())
    assert report["backend"] == "tiny:0"
    assert main(["db", "calibrate", str(db), str(tmp_path / "missing")]) == 2


def test_generate_uses_the_databases_calibrated_setting_unless_options_are_given(image_folder, tmp_path, capsys):
    from arrag.decoding.weights import AdaptiveWeight
    from arrag.evaluation.calibration import DaidSetting

    db, out = tmp_path / "db", tmp_path / "out"
    assert main(["db", "build", str(image_folder), "--out", str(db), "--backend", "tiny"]) == 0
    run = ["generate", "a red 7", "--db", str(db), "--method", "daid"]
    assert main([*run, "--out", str(out / "a")]) == 0
    assert "has no calibration.json" in capsys.readouterr().err
    setting = DaidSetting("sum", 0.5, 16, AdaptiveWeight("gated", 0.2, threshold=1.0))
    (db / "calibration.json").write_text(json.dumps({"chosen": {"setting": setting.to_dict()}}))
    assert main([*run, "--out", str(out / "b")]) == 0
    assert "calibration.json chose (sum, τ 0.5, k 16, λ 0.2 by rule)" in capsys.readouterr().err
    sidecar = json.loads(next((out / "b").glob("*.json")).read_text())
    assert sidecar["config"]["retrieval"]["rule"]["kind"] == "gated" and sidecar["retrieval_from"] == "calibration.json"
    assert main([*run, "--k", "8", "--out", str(out / "c")]) == 0  # an option given overrides the calibrated one
    assert json.loads(next((out / "c").glob("*.json")).read_text())["config"]["retrieval"]["k"] == 8
    assert main([*run, "--weight", "0.5", "--out", str(out / "e")]) == 0  # a λ given replaces the rule
    retrieval = json.loads(next((out / "e").glob("*.json")).read_text())["config"]["retrieval"]
    assert retrieval["weight"] == 0.5 and retrieval["rule"] is None and retrieval["k"] == 16
    (db / "calibration.json").write_text(json.dumps({"chosen": {"setting": None}}))
    assert main([*run, "--out", str(out / "d")]) == 0
    assert "does not inform this model" in capsys.readouterr().err
    assert json.loads(next((out / "d").glob("*.json")).read_text())["config"]["retrieval"]["weight"] == 0.0
