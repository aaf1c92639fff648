import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from arrag.build import BuildConfig, BuildRunningError, add_to_database, build_database, rollback
from arrag.build.sources import SourceConfig
from arrag.retrieval import indexes
from arrag.retrieval.database import PatchDatabase
from arrag.retrieval.grid import Neighbourhood
from arrag.retrieval.indexes import IndexConfig
from arrag.retrieval.layout import STATE_DIR
from conftest import blob_images, database_from_images


def same_entries(a: PatchDatabase, b: PatchDatabase) -> None:
    """The same images, entry numbers and next tokens; indexes that number entries as added (no stored ids)
    must hold the same key under each number."""
    assert a.sources == b.sources
    assert indexes.stores_ids(a.index) == indexes.stores_ids(b.index)
    if not indexes.stores_ids(a.index):
        assert np.array_equal(a.next_tokens, b.next_tokens)
        assert np.array_equal(a.index.reconstruct_n(0, len(a)), b.index.reconstruct_n(0, len(b)))
        return
    ids = stored_ids(faiss.extract_index_ivf(a.index))
    assert np.array_equal(ids, stored_ids(faiss.extract_index_ivf(b.index)))
    assert np.array_equal(np.sort(a.locate(ids)[0]), np.repeat(np.arange(a.num_images), len(a.positions)))


def stored_ids(ivf: faiss.IndexIVF) -> np.ndarray:
    """Every id in an IVF index's inverted lists, sorted."""
    lists = ivf.invlists
    return np.sort(np.concatenate([faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)) for i in range(ivf.nlist)]))


def same_database(a: PatchDatabase, b: PatchDatabase) -> None:
    same_entries(a, b)
    queries = torch.randn(12, a.spec.key_dim, generator=torch.Generator().manual_seed(0))
    for name in ("distances", "tokens", "image_ids", "positions"):
        assert torch.equal(getattr(a.search(queries, 7), name), getattr(b.search(queries, 7), name)), name


def same_entries_and_distances(a: PatchDatabase, b: PatchDatabase) -> None:
    """Same entries and distances; the order of equally distant entries may differ (other IVF list layouts)."""
    same_entries(a, b)
    queries = torch.randn(12, a.spec.key_dim, generator=torch.Generator().manual_seed(0))
    found_a, found_b = a.search(queries, 7), b.search(queries, 7)
    assert torch.equal(found_a.distances, found_b.distances)
    for row in range(len(queries)):
        inside = found_a.distances[row] < found_a.distances[row, -1]
        assert set(found_a.image_ids[row][inside].tolist()) == set(found_b.image_ids[row][inside].tolist())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """14 good images in nested folders (PNG, JPEG, WebP), plus corrupt, truncated and non-image files."""
    root = tmp_path_factory.mktemp("collection")
    for i, image in enumerate(blob_images(14, seed=3)):
        sub = root / f"part{i % 3}"
        sub.mkdir(exist_ok=True)
        image.save(sub / f"img{i:02d}.{['png', 'jpg', 'webp'][i % 3]}")
    (root / "part0" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    data = (root / "part1" / "img01.jpg").read_bytes()
    (root / "part1" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "part2" / "text.webp").write_text("a text file with an image name")
    (root / "notes.txt").write_text("not an image")
    return root


SMALL = BuildConfig(sources=SourceConfig(shard_size=3), batch_size=2)


def test_a_folder_with_bad_files_builds_with_a_correct_report(backend, folder, tmp_path):
    report = build_database(backend, [folder], tmp_path / "db", SMALL)
    assert report.images_added == 14
    assert report.shards == 6  # 17 image-named files in shards of 3
    assert sorted(s["path"].rsplit("/", 1)[1] for s in report.skipped) == ["corrupt.png", "text.webp", "truncated.jpg"]
    assert all("Error" in s["reason"] for s in report.skipped)
    assert [i["path"] for i in report.ignored] == [str(folder / "notes.txt")]
    assert json.loads((tmp_path / "db" / "build-report.json").read_text())["skipped"] == report.skipped
    assert not (tmp_path / "db" / STATE_DIR).exists()
    database = PatchDatabase.load(tmp_path / "db")
    good = sorted(p for p in folder.rglob("img*"))
    expected, _ = database_from_images(backend, [Image.open(p).convert("RGB") for p in good], Neighbourhood())
    assert database.sources == [str(p) for p in good]
    assert len(database) == report.entries == len(expected)
    same_database(
        database, PatchDatabase(expected.spec, expected.index, database.sources, next_tokens=expected.next_tokens)
    )
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    assert [s["images"] for s in manifest["token_shards"]] == [2, 3, 3, 2, 3, 1]  # bad files sorted among good
    assert report.bytes_per_entry > 0


@pytest.mark.parametrize("description", ["IVF4,CodebookPQ", "CodebookPQ"])  # stored ids; entries numbered as added
def test_kill_and_resume_gives_the_entries_of_an_uninterrupted_build(backend, folder, tmp_path, description):
    config = BuildConfig(sources=SourceConfig(shard_size=3), batch_size=2, index=IndexConfig(description))
    build_database(backend, [folder], tmp_path / "whole", config)
    for stage, after in (("tokenize", 2), ("index", 3)):
        out = tmp_path / f"killed-in-{stage}"
        done: list[tuple[str, int]] = []

        def die(name, record, stage=stage, after=after, done=done):
            done.append((name, record["shard"]))
            if sum(n == stage for n, _ in done) == after:
                raise KeyboardInterrupt  # what a kill looks like from inside

        with pytest.raises(KeyboardInterrupt):
            build_database(backend, [folder], out, config, on_shard_done=die)
        assert not (out / "manifest.json").exists()
        with pytest.raises(FileExistsError, match="resume=True"):
            build_database(backend, [folder], out, config)
        stamps = {p.name: p.stat().st_mtime_ns for p in (out / "tokens").glob("*.parquet")}
        redone: list[tuple[str, int]] = []
        report = build_database(
            backend,
            [folder],
            out,
            config,
            resume=True,
            on_shard_done=lambda n, r, redone=redone: redone.append((n, r["shard"])),
        )
        assert not set(redone) & set(done)  # no finished shard was done again
        assert len(redone) + len(done) == 6 + 6
        assert {p.name: p.stat().st_mtime_ns for p in (out / "tokens").glob("*.parquet")}.items() >= stamps.items()
        assert report.shards_resumed == (2 if stage == "tokenize" else 6)
        same_database(PatchDatabase.load(out), PatchDatabase.load(tmp_path / "whole"))


def test_overwrite_keeps_the_database_until_the_new_build_is_complete(backend, folder, tmp_path):
    db, config = tmp_path / "db", BuildConfig(sources=SourceConfig(shard_size=3), index=IndexConfig("IVF2,CodebookPQ"))
    build_database(backend, [folder / "part0"], db, config)
    reference = tmp_path / "reference"
    shutil.copytree(db, reference)
    not_a_tar = tmp_path / "not-a.tar"
    not_a_tar.write_text("garbage")
    with pytest.raises(ValueError, match="could be read"):  # fails after tokenizing: the old database comes back
        build_database(backend, [not_a_tar], db, config, overwrite=True)
    same_database(PatchDatabase.load(db), PatchDatabase.load(reference))
    assert sorted(p.name for p in db.iterdir()) == sorted(p.name for p in reference.iterdir())

    def die(name, record):
        if name == "index":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a killed --overwrite keeps the old database until it is finished
        build_database(backend, [folder / "part1"], db, config, overwrite=True, on_shard_done=die)
    with pytest.raises(FileNotFoundError, match="resume=True"):
        PatchDatabase.load(db)
    build_database(backend, [folder / "part1"], db, config, overwrite=True)  # starts again from the old database
    build_database(backend, [folder / "part1"], tmp_path / "part1", config)
    same_database(PatchDatabase.load(db), PatchDatabase.load(tmp_path / "part1"))
    assert not (db / STATE_DIR).exists()


@pytest.mark.parametrize("state", ["previous.partial", "previous", "previous.restoring"])
def test_a_database_killed_while_set_aside_or_put_back_is_recovered(backend, folder, tmp_path, state):
    db = tmp_path / "db"
    build_database(backend, [folder / "part0"], db, SMALL)
    reference = tmp_path / "reference"
    shutil.copytree(db, reference)
    held = db / STATE_DIR / state
    held.mkdir(parents=True)
    moved = ["manifest.json", "index.faiss"] if state == "previous.partial" else [p.name for p in db.iterdir()]
    if state == "previous.restoring":  # the manifest goes back last: a kill leaves it behind
        moved = ["manifest.json", "tokens"]
    for name in moved:
        if name != STATE_DIR:
            (db / name).rename(held / name)
    with pytest.raises(FileExistsError, match="already holds"):  # recovered first, then refused as usual
        build_database(backend, [folder / "part1"], db, SMALL)
    assert sorted(p.name for p in db.iterdir()) == sorted(p.name for p in reference.iterdir())
    same_database(PatchDatabase.load(db), PatchDatabase.load(reference))


@pytest.mark.parametrize(
    ("index", "error"),
    [
        (IndexConfig("nonsense"), "FAISS cannot make"),
        (IndexConfig("Flat", search_params="nprobe=4"), "do not apply"),
        (IndexConfig("IVF4096,Flat", train_size=1000), "train_size"),
    ],
)
def test_bad_index_settings_fail_before_anything_is_read_or_removed(backend, folder, tmp_path, index, error):
    db = tmp_path / "db"
    build_database(backend, [folder / "part0"], db, SMALL)
    before = sorted(p.relative_to(db) for p in db.rglob("*"))
    bad = BuildConfig(sources=SourceConfig(shard_size=3), index=index)
    with pytest.raises(ValueError, match=error):
        build_database(backend, [folder / "part0"], db, bad, overwrite=True)
    assert sorted(p.relative_to(db) for p in db.rglob("*")) == before


def test_out_must_be_a_database_a_build_or_an_empty_folder(backend, folder, tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="is a file"):
        build_database(backend, [folder / "part0"], tmp_path / "file", SMALL, overwrite=True)
    theirs = tmp_path / "project"
    (theirs / "build").mkdir(parents=True)
    (theirs / "build" / "keep.txt").write_text("important")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not empty"):
            build_database(backend, [folder / "part0"], theirs, SMALL, overwrite=overwrite)
    assert (theirs / "build" / "keep.txt").read_text() == "important"
    with pytest.raises(FileNotFoundError, match="not a patch database"):  # not taken for an unfinished build
        PatchDatabase.load(theirs)
    (tmp_path / "empty").mkdir()
    assert build_database(backend, [folder / "part0"], tmp_path / "empty", SMALL).images_added == 5


def test_a_second_build_or_add_in_the_same_folder_is_refused_while_one_runs(backend, folder, tmp_path):
    db = tmp_path / "db"
    build_database(backend, [folder / "part0"], db, SMALL)
    holder = os.open(db, os.O_RDONLY)  # what a running build holds
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FileExistsError, match="running"):
            add_to_database(backend, [folder / "part1"], db, SMALL)
        with pytest.raises(FileExistsError, match="running"):
            build_database(backend, [folder / "part1"], db, SMALL, overwrite=True)
    finally:
        os.close(holder)
    assert add_to_database(backend, [folder / "part1"], db, SMALL).images_added == 5


def test_a_failed_add_leaves_the_database_as_it_was(backend, folder, tmp_path):
    db = tmp_path / "db"
    build_database(backend, [folder / "part0"], db, SMALL)
    reference = tmp_path / "reference"
    shutil.copytree(db, reference)
    not_a_tar = tmp_path / "not-a.tar"
    not_a_tar.write_text("garbage")
    with pytest.raises(ValueError, match="could be read"):
        add_to_database(backend, [not_a_tar], db, SMALL)
    assert sorted(p.name for p in db.rglob("*")) == sorted(p.name for p in reference.rglob("*"))
    add_to_database(backend, [folder / "part1"], db, SMALL)  # takes further adds
    build_database(backend, [folder / "part0", folder / "part1"], tmp_path / "whole", SMALL)
    same_database(PatchDatabase.load(db), PatchDatabase.load(tmp_path / "whole"))


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def die_in_index(name, record):
    if name == "index":
        raise KeyboardInterrupt  # what a kill looks like from inside


def test_an_interrupted_overwrite_is_rolled_back_to_the_database_it_replaced(backend, folder, tmp_path):
    db = tmp_path / "db"
    build_database(backend, [folder / "part0"], db, SMALL)
    reference = tmp_path / "reference"
    shutil.copytree(db, reference)
    with pytest.raises(KeyboardInterrupt):
        build_database(backend, [folder / "part1"], db, SMALL, overwrite=True, on_shard_done=die_in_index)
    kept = f"kept in {db / STATE_DIR / 'previous'} and comes back on rollback()"
    for refused in (
        lambda: PatchDatabase.load(db),
        lambda: build_database(backend, [folder / "part1"], db, SMALL),
        lambda: add_to_database(backend, [folder / "part2"], db, SMALL),
    ):
        with pytest.raises((FileNotFoundError, FileExistsError), match="unfinished build") as error:
            refused()
        assert "resume=True" in str(error.value) and "rollback()" in str(error.value) and kept in str(error.value)
    rollback(db)
    assert listing(db) == listing(reference)
    same_database(PatchDatabase.load(db), PatchDatabase.load(reference))
    with pytest.raises(FileNotFoundError, match="no unfinished build or add to roll back"):
        rollback(db)


def test_an_interrupted_build_or_add_is_rolled_back(backend, folder, tmp_path):
    db = tmp_path / "db"
    with pytest.raises(KeyboardInterrupt):
        build_database(backend, [folder / "part0"], db, SMALL, on_shard_done=die_in_index)
    with pytest.raises(FileExistsError, match=r"resume=True .*overwrite=True or abandon it with rollback\(\)"):
        build_database(backend, [folder / "part0"], db, SMALL)
    rollback(db)
    assert listing(db) == []  # the folder is left empty, and takes a build again
    build_database(backend, [folder / "part0"], db, SMALL)
    reference = tmp_path / "reference"
    shutil.copytree(db, reference)
    with pytest.raises(KeyboardInterrupt):
        add_to_database(backend, [folder / "part1"], db, SMALL, on_shard_done=die_in_index)
    with pytest.raises(FileExistsError, match=r"unfinished add; .*resume=True .*rollback\(\)"):
        add_to_database(backend, [folder / "part1"], db, SMALL)
    rollback(db)
    assert listing(db) == listing(reference)
    add_to_database(backend, [folder / "part1"], db, SMALL)
    build_database(backend, [folder / "part0", folder / "part1"], tmp_path / "whole", SMALL)
    same_database(PatchDatabase.load(db), PatchDatabase.load(tmp_path / "whole"))


def test_a_build_refused_in_training_leaves_the_folder_as_it_found_it(backend, folder, tmp_path):
    too_many_lists = BuildConfig(sources=SMALL.sources, index=IndexConfig("IVF256,Flat", train_size=1000))
    fitting = BuildConfig(sources=SMALL.sources, index=IndexConfig("IVF4,Flat", train_size=1000))
    new, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    for out in (new, empty):  # 5 images give 210 keys: too few for 256 lists, found once they are tokenized
        with pytest.raises(ValueError, match="needs at least 256 training keys"):
            build_database(backend, [folder / "part0"], out, too_many_lists)
        assert out.exists() == (out == empty) and not any(out.iterdir() if out.exists() else [])
        assert build_database(backend, [folder / "part0"], out, fitting).images_added == 5  # no overwrite=True
    reference = tmp_path / "reference"
    shutil.copytree(new, reference)
    with pytest.raises(ValueError, match="needs at least 256 training keys"):
        build_database(backend, [folder / "part0"], new, too_many_lists, overwrite=True)
    assert listing(new) == listing(reference)
    same_database(PatchDatabase.load(new), PatchDatabase.load(reference))


def test_a_build_failing_after_tokenizing_keeps_its_shards_and_says_how_to_go_on(backend, folder, tmp_path):
    db = tmp_path / "db"

    def fail_in_index(name, record):
        if name == "index":
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left") as error:
        build_database(backend, [folder / "part0"], db, SMALL, on_shard_done=fail_in_index)
    (note,) = error.value.__notes__
    assert note == (
        f"the tokenized shards are kept: {db} holds an unfinished build; finish it with resume=True (the same "
        "inputs and settings) or abandon it with rollback() (which empties the folder)"
    )
    report = build_database(backend, [folder / "part0"], db, SMALL, resume=True)
    assert report.shards_resumed == 2
    build_database(backend, [folder / "part0"], tmp_path / "whole", SMALL)
    same_database(PatchDatabase.load(db), PatchDatabase.load(tmp_path / "whole"))


def test_an_add_leaves_out_images_the_database_holds(backend, folder, tmp_path, caplog):
    db = tmp_path / "db"
    build_database(backend, [folder / "part0"], db, SMALL)
    before = {p: p.stat().st_mtime_ns for p in db.rglob("*") if p.is_file()}
    again = add_to_database(backend, [folder / "part0"], db, SMALL)  # all there: nothing changes
    assert again.images_added == 0 and again.entries == 0
    assert sorted(d["path"] for d in again.duplicates) == sorted(str(p) for p in (folder / "part0").glob("img*"))
    assert {d["reason"] for d in again.duplicates} == {"already in the database"}
    assert "holds every image of" in caplog.text and "nothing added" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in db.rglob("*") if p.is_file()} == before
    copies = tmp_path / "copies"  # the same bytes under other names
    copies.mkdir()
    for path in sorted((folder / "part0").glob("img*")):
        shutil.copyfile(path, copies / f"copy-{path.name}")
    report = add_to_database(backend, [folder / "part1", copies, folder / "part0"], db, SMALL)
    assert report.images_added == 5
    reasons = {d["path"]: d["reason"] for d in report.duplicates}
    assert len(reasons) == 10
    original = folder / "part0" / "img00.png"
    assert reasons[str(copies / "copy-img00.png")] == f"the same bytes as {original}, already in the database"
    assert "10 images are in" in caplog.text
    build_database(backend, [folder / "part0", folder / "part1"], tmp_path / "whole", SMALL)
    same_database(PatchDatabase.load(db), PatchDatabase.load(tmp_path / "whole"))


def test_the_build_report_keeps_every_run(backend, folder, tmp_path):
    db = tmp_path / "db"
    build_database(backend, [folder / "part0"], db, SMALL)
    add_to_database(backend, [folder / "part1"], db, SMALL)
    add_to_database(backend, [folder / "part1", folder / "part2"], db, SMALL)
    saved = json.loads((db / "build-report.json").read_text())
    runs = saved["runs"]
    assert [(run["kind"], run["inputs"], run["first_image"]) for run in runs] == [
        ("build", [str(folder / "part0")], 0),
        ("add", [str(folder / "part1")], 5),
        ("add", [str(folder / "part1"), str(folder / "part2")], 10),
    ]
    assert [run["images_added"] for run in runs] == [5, 5, 4]
    assert saved["images_added"] == 14 and saved["entries"] == 14 * 42
    skipped = sorted(s["path"].rsplit("/", 1)[1] for s in saved["skipped"])  # truncated.jpg: by both adds
    assert skipped == ["corrupt.png", "text.webp", "truncated.jpg", "truncated.jpg"]
    assert [len(run["duplicates"]) for run in runs] == [0, 0, 5]  # part1's images, already added
    assert saved["duplicates"] == runs[2]["duplicates"]
    build_database(backend, [folder / "part0"], db, SMALL, overwrite=True)  # a new database: a new history
    assert [run["kind"] for run in json.loads((db / "build-report.json").read_text())["runs"]] == ["build"]


def test_a_folder_whose_build_is_running_says_so(backend, folder, tmp_path):
    db = tmp_path / "db"
    started, finish = threading.Event(), threading.Event()

    def wait(name, record):
        started.set()
        assert finish.wait(60)

    with pytest.raises(KeyboardInterrupt):
        build_database(backend, [folder / "part0"], db, SMALL, on_shard_done=die_in_index)
    resumed = threading.Thread(
        target=build_database,
        args=(backend, [folder / "part0"], db, SMALL),
        kwargs={"resume": True, "on_shard_done": wait},
    )
    resumed.start()
    try:
        assert started.wait(60)
        for refused in (
            lambda: PatchDatabase.load(db),
            lambda: build_database(backend, [folder / "part0"], db, SMALL),
            lambda: build_database(backend, [folder / "part0"], db, SMALL, resume=True),
            lambda: add_to_database(backend, [folder / "part1"], db, SMALL),
            lambda: rollback(db),
        ):
            with pytest.raises(BuildRunningError) as error:
                refused()
            assert str(error.value) == f"a build is running in {db}; wait for it to finish"
    finally:
        finish.set()
        resumed.join()
    assert PatchDatabase.load(db).num_images == 5


def test_a_build_refused_by_another_process_holding_the_lock(backend, folder, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(BuildRunningError, match="a build is running"):
            PatchDatabase.load(tmp_path)  # no database yet: its build has just begun
        with pytest.raises(BuildRunningError, match="a build is running"):
            build_database(backend, [folder / "part0"], tmp_path, SMALL)
    finally:
        holder.communicate("")
    with pytest.raises(FileNotFoundError, match="not a patch database"):
        PatchDatabase.load(tmp_path)


HOLD_LOCK = """
import fcntl, os, sys
handle = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(handle, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_provenance_is_absolute_whatever_folder_the_build_ran_in(backend, folder, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    work = tmp_path / "work"
    (work / "photos").mkdir(parents=True)
    for path in sorted((folder / "part0").glob("img*")):
        shutil.copyfile(path, work / "photos" / path.name)
    with tarfile.open(work / "shard.tar", "w") as archive:
        archive.add(folder / "part1" / "img01.jpg", arcname="sample/0001.jpg")
    pq.write_table(pa.table({"png": [(folder / "part2" / "img02.webp").read_bytes()]}), work / "rows.parquet")
    monkeypatch.chdir(work)
    build_database(backend, ["photos", "shard.tar", "./rows.parquet", "world:2"], tmp_path / "db", SMALL)
    monkeypatch.chdir(tmp_path)
    sources = PatchDatabase.load(tmp_path / "db").sources
    assert sources[:5] == [str(work / "photos" / p.name) for p in sorted((work / "photos").iterdir())]
    assert sources[5:7] == [f"{work / 'shard.tar'}::sample/0001.jpg", f"{work / 'rows.parquet'}::0"]
    assert all(Path(name.split("::")[0]).is_file() for name in sources[:7])
    assert [name.split(":")[0] for name in sources[7:]] == ["world-database-scene-0", "world-database-scene-1"]


def test_fast_scan_lists_are_refused_on_disk():
    with pytest.raises(ValueError, match="on disk"):
        BuildConfig(index=IndexConfig("IVF64,PQ8x4fs", on_disk=True))


def test_resume_refuses_other_inputs_or_settings(backend, folder, tmp_path):
    def die(name, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_database(backend, [folder], tmp_path / "db", SMALL, on_shard_done=die)
    with pytest.raises(ValueError, match="inputs"):
        build_database(backend, [folder / "part0"], tmp_path / "db", SMALL, resume=True)
    other = BuildConfig(sources=SMALL.sources, index=IndexConfig("CodebookPQ"))
    with pytest.raises(ValueError, match="index"):
        build_database(backend, [folder], tmp_path / "db", other, resume=True)
    plan_path = tmp_path / "db" / STATE_DIR / "plan.json"
    plan = json.loads(plan_path.read_text())
    plan_path.write_text(json.dumps({**plan, "version": 1}))  # a build an older arrag began
    with pytest.raises(ValueError, match="database format"):
        build_database(backend, [folder], tmp_path / "db", SMALL, resume=True)
    plan_path.write_text(json.dumps(plan))
    build_database(backend, [folder], tmp_path / "db", SMALL, overwrite=True)
    with pytest.raises(FileNotFoundError, match="no unfinished build"):
        build_database(backend, [folder], tmp_path / "db", SMALL, resume=True)


@pytest.mark.parametrize(
    ("description", "on_disk"),
    # IVF4,PQ8x4fs: FAISS's own merge of fast-scan lists corrupts the heap with these shard sizes (aborts under
    # MALLOC_CHECK_=3), so its shards keep keys
    [
        ("Flat", False),
        ("IVF4,CodebookPQ", True),
        ("HNSW16", False),
        ("IVF4,PQ8x4fs", False),
        ("IVF4,PQ8x4fs,Refine(CodebookPQ)", False),
    ],
)
def test_db_add_gives_the_database_of_one_build(backend, folder, tmp_path, description, on_disk):
    exhaustive = "nprobe=4" if "IVF" in description else ""  # every list: exact, whatever the coarse quantizer
    exhaustive += ",k_factor_rf=1000" if "Refine" in description else ""  # and every entry re-ranked
    index = IndexConfig(description, on_disk, exhaustive, train_size=2000)
    config = BuildConfig(sources=SourceConfig(shard_size=4), index=index)
    whole = tmp_path / "whole"
    build_database(backend, [folder / "part0", folder / "part1", folder / "part2"], whole, config)
    grown = tmp_path / "grown"
    build_database(backend, [folder / "part0"], grown, config)
    add_to_database(backend, [folder / "part1"], grown, config)
    report = add_to_database(backend, [folder / "part2"], grown, config)
    assert report.images_added == 4
    assert len(list(grown.glob("*.ivfdata"))) == int(on_disk)
    a, b = PatchDatabase.load(grown), PatchDatabase.load(whole)
    if description.startswith("HNSW"):  # another insertion order makes another graph: compare contents only
        same_entries(a, b)
    elif description.endswith("fs"):  # a 4-bit PQ trained on part0 alone: same entries, other approximations
        same_entries(a, b)
        assert a.search(torch.zeros(3, a.spec.key_dim), 7).valid.all()
    else:
        same_entries_and_distances(a, b)


def test_an_on_disk_database_matches_in_memory_and_can_be_moved(backend, folder, tmp_path):
    config = BuildConfig(
        sources=SourceConfig(shard_size=5), index=IndexConfig("IVF4,CodebookPQ", search_params="nprobe=4")
    )
    build_database(backend, [folder], tmp_path / "memory", config)
    on_disk = BuildConfig(sources=config.sources, index=IndexConfig("IVF4,CodebookPQ", True, "nprobe=4"))
    build_database(backend, [folder], tmp_path / "disk", on_disk)
    shutil.move(tmp_path / "disk", tmp_path / "moved")
    database = PatchDatabase.load(tmp_path / "moved")
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(database.index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)
    assert [p.name for p in (tmp_path / "moved").glob("*.ivfdata")] == ["index.ivfdata"]
    same_database(database, PatchDatabase.load(tmp_path / "memory"))


def test_codebook_pq_build_is_exact_and_smaller_than_flat(backend, folder, tmp_path):
    flat = build_database(backend, [folder], tmp_path / "flat", SMALL)
    pq_config = BuildConfig(sources=SMALL.sources, index=IndexConfig("CodebookPQ"))
    pq = build_database(backend, [folder], tmp_path / "pq", pq_config)
    a, b = PatchDatabase.load(tmp_path / "flat"), PatchDatabase.load(tmp_path / "pq")
    queries = torch.randn(20, a.spec.key_dim, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(a.search(queries, 9).distances, b.search(queries, 9).distances, atol=1e-5)
    assert faiss.downcast_index(b.index).pq.code_size == 3  # 4 neighbours × 6 bits (64 codes)
    assert pq.bytes_per_entry < flat.bytes_per_entry / 3  # at this size mostly the 4 × 128 × 8 centroid table


def test_tar_parquet_and_world_inputs(backend, folder, tmp_path):
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    with tarfile.open(tmp_path / "shard.tar", "w") as archive:
        for path in sorted(folder.rglob("img0*")):
            archive.add(path, arcname=f"sample/{path.stem}.{path.suffix[1:]}")
    images = [p.read_bytes() for p in sorted(folder.rglob("img1*"))]
    pq.write_table(pa.table({"jpg": images}), tmp_path / "rows.parquet", row_group_size=2)
    report = build_database(backend, [tmp_path / "shard.tar", tmp_path / "rows.parquet", "world:5"], tmp_path / "db")
    assert report.images_added == 10 + 4 + 5
    assert report.skipped == []
    database = PatchDatabase.load(tmp_path / "db")
    assert database.sources[-5].startswith("world-database-scene-0: ")


def test_a_resumed_add_that_fails_after_its_merge_began_stays_resumable(backend, folder, tmp_path):
    pytest.importorskip("ray")
    db = tmp_path / "db"
    build_database(backend, [folder / "part0"], db, SMALL)

    def die(name, record):
        if name == "index":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        add_to_database(backend, [folder / "part1"], db, SMALL, on_shard_done=die)
    shutil.copyfile(db / "index.faiss", db / "index.base.faiss")  # where a merge killed later would have got to
    unreachable = BuildConfig(**{**vars(SMALL), "engine": "ray", "address": f"127.0.0.1:{free_port()}"})
    with pytest.raises(ValueError, match="no Ray cluster"):
        add_to_database(backend, [folder / "part1"], db, unreachable, resume=True)
    add_to_database(backend, [folder / "part1"], db, SMALL, resume=True)  # not forgotten: it resumes
    build_database(backend, [folder / "part0", folder / "part1"], tmp_path / "whole", SMALL)
    same_database(PatchDatabase.load(db), PatchDatabase.load(tmp_path / "whole"))


def free_port() -> int:
    with socket.socket() as probe:  # nothing listens on it once the probe is closed
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# before ray_cluster: with Ray started in this process, an engine uses it and needs no address
def test_an_address_where_no_ray_cluster_listens_fails_at_once(backend, folder, tmp_path):
    pytest.importorskip("ray")
    config = BuildConfig(engine="ray", address=f"127.0.0.1:{free_port()}")
    with pytest.raises(ValueError, match="no Ray cluster answers"):  # ray.init alone retries for minutes
        build_database(backend, [folder / "part0"], tmp_path / "db", config)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=100 * 1024**2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_engine_runs_the_same_stages_to_the_same_database(backend, folder, tmp_path, ray_cluster):
    local = BuildConfig(sources=SourceConfig(shard_size=3), index=IndexConfig("IVF4,CodebookPQ", train_size=1000))
    distributed = BuildConfig(**{**vars(local), "engine": "ray"})
    build_database(backend, [folder], tmp_path / "local", local)
    report = build_database(backend, [folder], tmp_path / "ray", distributed)
    assert report.engine == "ray"
    assert sorted(s["path"] for s in report.skipped) == sorted(
        s["path"] for s in json.loads((tmp_path / "local" / "build-report.json").read_text())["skipped"]
    )
    same_database(PatchDatabase.load(tmp_path / "ray"), PatchDatabase.load(tmp_path / "local"))


def test_cli_build_add_and_info(folder, tmp_path, capsys):
    from arrag.cli import main

    db = tmp_path / "db"
    common = ["--backend", "tiny", "--shard-size", "3"]
    index = ["--index", "IVF4,CodebookPQ", "--on-disk", "--search-params", "nprobe=2", "--train-size", "500"]
    assert main(["db", "build", str(folder / "part0"), str(folder / "part1"), "--out", str(db), *common, *index]) == 0
    assert main(["db", "add", str(db), str(folder / "part2"), "--shard-size", "3"]) == 0
    out = capsys.readouterr().out
    assert "built" in out and "added to" in out
    assert "skipped" in out and "text.webp" in out
    assert main(["db", "info", str(db)]) == 0
    info = capsys.readouterr().out
    manifest = json.loads(info[: info.index("\nentries:")])
    assert manifest["counts"]["images"] == 14
    assert manifest["index"] == {
        "description": "IVF4,CodebookPQ",
        "on_disk": True,
        "search_params": "nprobe=2",
        "train_size": 500,
        "metric": "squared-l2",
        "key_dim": 32,
    }
    assert manifest["preprocessing"] == {
        "size": 32,
        "crop": "centre",
        "resample": "bicubic",
        "value_range": [-1.0, 1.0],
    }
    assert f"entries: {14 * 42}" in info
    assert "bytes per entry" in info
    assert "token shards: 6" in info


def test_db_add_grows_a_database_saved_in_memory(backend, folder, tmp_path):
    """Databases saved by PatchDatabase.save (the world's, older builds) have no token shards or trained.faiss."""
    good = sorted(folder.rglob("img*"))
    database, _ = database_from_images(backend, [Image.open(p).convert("RGB") for p in good[:5]], Neighbourhood())
    database.sources = [str(p) for p in good[:5]]
    database.save(tmp_path / "db")
    add_to_database(backend, good[5:], tmp_path / "db")
    build_database(backend, good, tmp_path / "whole")
    same_database(PatchDatabase.load(tmp_path / "db"), PatchDatabase.load(tmp_path / "whole"))


def test_an_interrupted_add_resumes_to_the_same_database(backend, folder, tmp_path):
    config = BuildConfig(sources=SourceConfig(shard_size=4), index=IndexConfig("IVF4,CodebookPQ", True, "nprobe=4"))
    build_database(backend, [folder / "part0", folder / "part1"], tmp_path / "whole", config)
    build_database(backend, [folder / "part0"], tmp_path / "grown", config)

    def die(name, record):
        if name == "index":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        add_to_database(backend, [folder / "part1"], tmp_path / "grown", config, on_shard_done=die)
    assert PatchDatabase.load(tmp_path / "grown").num_images == 5  # the database before the add still loads
    with pytest.raises(FileExistsError, match="resume=True"):
        add_to_database(backend, [folder / "part1"], tmp_path / "grown", config)
    add_to_database(backend, [folder / "part1"], tmp_path / "grown", config, resume=True)
    names = sorted(p.name for p in (tmp_path / "grown").iterdir())  # no leftovers: one inverted-list file
    whole = [p.name for p in (tmp_path / "whole").iterdir()]
    assert names == sorted("index-000002.ivfdata" if name.endswith(".ivfdata") else name for name in whole)
    same_entries_and_distances(PatchDatabase.load(tmp_path / "grown"), PatchDatabase.load(tmp_path / "whole"))
