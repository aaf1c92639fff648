import json
import shutil
import signal
import subprocess
import sys
import time

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
    assert [p.name for p in pngs] == [f"prompt{i:03d}-image{j:02d}.png" for i in range(2) for j in range(2)]
    sidecar = json.loads(pngs[3].with_suffix(".json").read_text())
    assert sidecar["prompt"] == "two cats"
    assert sidecar["seed"] == 8
    assert sidecar["backend"] == "tiny-0"
    assert sidecar["config"]["method"] == "daid"
    assert sidecar["config"]["retrieval"] == {"weight": 0.4, "temperature": 0.5, "k": 8, "duplicates": "nearest"}
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
    assert main(["db", "build", str(image_folder), "--out", str(db), "--backend", "tiny-1"]) == 0
    assert main(["generate", "a cat", "--db", str(db), "--backend", "tiny-0", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "codebook fingerprint" in err
    assert "tiny-1" in err
    assert "tiny-0" in err


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
    from arrag.cli import _generation_config, build_parser
    from arrag.config import SamplingConfig

    backend = tiny_backend(seed=0)
    backend.sampling = SamplingConfig(guidance_scale=3.0, temperature=0.9, top_k=20, top_p=0.95)
    parse = build_parser().parse_args
    assert _generation_config(parse(["generate", "a 7"]), backend).sampling == backend.sampling
    changed = _generation_config(parse(["generate", "a 7", "--guidance-scale", "6", "--top-k", "0"]), backend)
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
    from arrag.cli import _sampling_candidate
    from arrag.config import SamplingConfig

    assert _sampling_candidate("3:20") == SamplingConfig(guidance_scale=3.0, top_k=20)
    assert _sampling_candidate("5") == SamplingConfig(guidance_scale=5.0)
    assert main(["world", "report", "--part", "sampling", "--candidates", "three"]) == 2
    assert "GUIDANCE:TOP_K" in capsys.readouterr().err
