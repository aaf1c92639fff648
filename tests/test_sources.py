import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from arrag.build.sources import ShardSpec, SourceConfig, plan_shards, read_shard, source_kind, source_schemes
from conftest import blob_images


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture
def webdataset_tar(tmp_path):
    """Four samples (PNG, JPEG, WebP and a corrupt JPEG), each with a caption; one caption-only sample."""
    path = tmp_path / "shard-0000.tar"
    images = blob_images(3, seed=5)
    with tarfile.open(path, "w") as archive:
        for key, (image, fmt) in enumerate(zip(images, ["PNG", "JPEG", "WEBP"], strict=True)):
            add_member(archive, f"part/{key:04d}.txt", b"a caption")
            add_member(archive, f"part/{key:04d}.{fmt.lower()}", encoded(image, fmt))
        add_member(archive, "part/0003.jpg", b"\xff\xd8 not a jpeg")
        add_member(archive, "part/0004.json", b"{}")
    return path


def test_folders_are_searched_recursively_and_split_in_shards(tmp_path):
    for i, (image, fmt) in enumerate(zip(blob_images(5), ["PNG", "JPEG", "WEBP", "PNG", "JPEG"], strict=True)):
        folder = tmp_path / "images" / f"sub{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"image{i}.{fmt.lower()}", format=fmt)
    (tmp_path / "images" / "readme.md").write_text("hello")
    plan = plan_shards([tmp_path / "images"], SourceConfig(shard_size=2))
    assert [len(shard.items) for shard in plan.shards] == [2, 2, 1]
    assert [shard.index for shard in plan.shards] == [0, 1, 2]
    assert plan.ignored == [{"path": str(tmp_path / "images" / "readme.md"), "reason": plan.ignored[0]["reason"]}]
    items = [item for shard in plan.shards for item in read_shard(shard)]
    assert [item.name.rsplit("/", 1)[1] for item in items] == [
        "image0.png",
        "image2.webp",
        "image4.jpeg",
        "image1.jpeg",
        "image3.png",
    ]
    assert all(item.image is not None and item.image.mode == "RGB" for item in items)


def test_a_webdataset_tar_gives_one_image_per_sample_and_reports_the_corrupt_one(webdataset_tar):
    (shard,) = plan_shards([webdataset_tar]).shards
    assert shard.kind == "tar"
    items = list(read_shard(shard))
    assert [item.name.rsplit("::", 1)[1] for item in items] == [
        "part/0000.png",
        "part/0001.jpeg",
        "part/0002.webp",
        "part/0003.jpg",
    ]
    assert [item.image is not None for item in items] == [True, True, True, False]
    assert "UnidentifiedImageError" in items[3].error
    original = np.asarray(blob_images(3, seed=5)[0])
    assert np.array_equal(np.asarray(items[0].image), original)  # PNG is lossless


def test_a_truncated_tar_keeps_what_was_read_and_reports_the_rest(webdataset_tar, tmp_path):
    data = webdataset_tar.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    items = list(read_shard(ShardSpec(0, "tar", location=str(cut))))
    assert items[0].image is not None
    assert items[-1].image is None
    assert items[-1].name == str(cut)
    assert "unreadable tar" in items[-1].error


def test_parquet_image_bytes_and_hugging_face_image_structs(tmp_path):
    images = blob_images(5, seed=2)
    plain = tmp_path / "plain.parquet"
    table = pa.table({"key": [f"k{i}" for i in range(5)], "jpg": [encoded(im, "JPEG") for im in images]})
    table = table.set_column(1, "jpg", pa.array([*table.column("jpg").to_pylist()[:4], b"junk"]))
    pq.write_table(table, plain, row_group_size=2)
    hf = tmp_path / "hf.parquet"
    structs = [{"bytes": encoded(im, "PNG"), "path": f"{i}.png"} for i, im in enumerate(images[:2])]
    pq.write_table(pa.table({"image": structs}), hf)
    plan = plan_shards([plain, hf])
    assert [(s.kind, s.start) for s in plan.shards] == [("parquet", 0), ("parquet", 1), ("parquet", 2), ("parquet", 0)]
    items = [item for shard in plan.shards for item in read_shard(shard)]
    assert [item.name.rsplit("::", 1)[1] for item in items] == ["k0", "k1", "k2", "k3", "k4", "0", "1"]
    assert [item.image is None for item in items] == [False] * 4 + [True] + [False] * 2
    assert np.array_equal(np.asarray(items[5].image), np.asarray(images[0]))


def test_a_damaged_parquet_file_or_missing_column_is_reported_not_raised(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(pa.table({"caption": ["a cat"]}), tmp_path / "captions.parquet")
    plan = plan_shards([tmp_path / "bad.parquet", tmp_path / "captions.parquet"])
    assert [entry["path"] for entry in plan.ignored] == [str(tmp_path / "bad.parquet")]
    (item,) = list(read_shard(plan.shards[0]))
    assert item.image is None
    assert "no image column" in item.error


def test_world_scenes_are_those_of_the_world_database(backend):
    from arrag.world.database import world_database_scenes

    plan = plan_shards(["world:130"])
    assert [(s.start, s.count) for s in plan.shards] == [(0, 100), (100, 30)]
    items = list(read_shard(plan.shards[1]))
    prompts, pixels = list(world_database_scenes(backend, 130))[1]
    assert [item.name for item in items] == [f"world-database-scene-{100 + i}: {p.text}" for i, p in enumerate(prompts)]
    assert np.array_equal(np.stack([backend.preprocess(item.image) for item in items]), pixels.numpy())


def test_the_world_source_is_found_through_the_registry():
    from arrag.world.source import WORLD

    assert "world" in source_schemes()
    assert source_kind("world") is WORLD
    assert [shard.kind for shard in plan_shards(["world:250"]).shards] == ["world"] * 3


def test_an_unknown_scheme_is_refused_with_the_known_ones_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown source scheme 'nosuch'; known schemes: .*world") as refused:
        plan_shards([tmp_path, "nosuch:3"])
    assert "\n" not in str(refused.value)
    with pytest.raises(ValueError, match="unknown source scheme 'nosuch'"):  # a shard of it, read in a worker
        list(read_shard(ShardSpec(0, "nosuch")))


def test_a_file_whose_name_looks_like_a_scheme_is_read_as_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blob_images(1)[0].save("photo:1.png")
    (shard,) = plan_shards(["photo:1.png"]).shards
    assert shard.items == (str(tmp_path / "photo:1.png"),)


def test_a_missing_input_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plan_shards([tmp_path / "nope"])


def names_in(plan, root) -> list[str]:
    return [Path(name).relative_to(root).as_posix() for shard in plan.shards for name in shard.items]


def test_a_symlinked_folder_contributes_its_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "elsewhere" / "sub").mkdir(parents=True)
    for path, image in zip(
        [tmp_path / "images" / "a.png", tmp_path / "elsewhere" / "b.png", tmp_path / "elsewhere" / "sub" / "c.png"],
        blob_images(3),
        strict=True,
    ):
        image.save(path)
    (tmp_path / "images" / "linked").symlink_to(tmp_path / "elsewhere")
    plan = plan_shards([tmp_path / "images"])
    assert names_in(plan, tmp_path) == ["images/a.png", "images/linked/b.png", "images/linked/sub/c.png"]
    assert all(item.image is not None for item in read_shard(plan.shards[0]))


def test_a_symlink_loop_ends_and_gives_each_image_once(tmp_path):
    (tmp_path / "images" / "sub").mkdir(parents=True)
    blob_images(1)[0].save(tmp_path / "images" / "sub" / "a.png")
    (tmp_path / "images" / "sub" / "up").symlink_to(tmp_path / "images")
    (tmp_path / "images" / "self").symlink_to(".")
    assert names_in(plan_shards([tmp_path / "images"]), tmp_path) == ["images/sub/a.png"]


def test_an_image_given_several_times_is_read_once(tmp_path, caplog):
    (tmp_path / "images" / "sub").mkdir(parents=True)
    for name, image in zip(["a.png", "b.png", "sub/c.png"], blob_images(3), strict=True):
        image.save(tmp_path / "images" / name)
    inputs = [tmp_path / "images", tmp_path / "images" / "sub", tmp_path / "images", tmp_path / "images" / "b.png"]
    plan = plan_shards(inputs, SourceConfig(shard_size=2))
    assert names_in(plan, tmp_path) == ["images/a.png", "images/b.png", "images/sub/c.png"]
    assert "dropped 5 duplicate input files" in caplog.text


def test_webdataset_and_parquet_captions(tmp_path, webdataset_tar):
    assert [item.caption for item in read_shard(plan_shards([webdataset_tar]).shards[0])] == ["a caption"] * 3 + [None]
    path = tmp_path / "after.tar"  # the caption after the image, and a sample with none
    png = encoded(blob_images(1)[0], "PNG")
    with tarfile.open(path, "w") as archive:
        add_member(archive, "a.png", png)
        add_member(archive, "a.txt", "  un chat noir é \n".encode())
        add_member(archive, "b.png", png)
    assert [(item.name.rsplit("::", 1)[1], item.caption) for item in read_shard(plan_shards([path]).shards[0])] == [
        ("a.png", "un chat noir é"),
        ("b.png", None),
    ]
    table = pa.table({"jpg": [encoded(blob_images(1)[0], "JPEG")] * 2, "text": ["a dog", None]})
    pq.write_table(table, tmp_path / "captioned.parquet")
    items = list(read_shard(plan_shards([tmp_path / "captioned.parquet"]).shards[0]))
    assert [item.caption for item in items] == ["a dog", None]
    assert items[0].sha256 == hashlib.sha256(table.column("jpg")[0].as_py()).hexdigest()


def test_world_eval_scenes_are_the_held_out_scenes_captioned_by_their_prompts():
    from arrag.world.digits import load_pool
    from arrag.world.report import eval_scenes

    assert "world-eval" in source_schemes()
    (shard,) = plan_shards(["world-eval:30"], first_index=4).shards
    assert (shard.index, shard.kind, shard.count) == (4, "world-eval", 30)
    items = list(read_shard(shard))
    prompts, images = eval_scenes(30)
    assert [item.name for item in items] == [f"world-eval-scene-{i}: {p.text}" for i, p in enumerate(prompts)]
    assert [item.caption for item in items] == [p.text for p in prompts]
    assert np.array_equal(np.stack([np.asarray(item.image) for item in items]), images)
    again = [np.asarray(item.image) for item in read_shard(plan_shards(["world-eval:10"]).shards[0])]
    assert np.array_equal(np.stack(again), images[:10])  # deterministic: world-eval:10 begins world-eval:30
    database = [item for shard in plan_shards(["world:30"]).shards for item in read_shard(shard)]
    assert all(item.caption == item.name.split(": ", 1)[1] for item in database)
    eval_glyphs, database_glyphs = (set(load_pool(pool).source_rows.tolist()) for pool in ("eval", "database"))
    assert not eval_glyphs & database_glyphs  # drawn from disjoint glyph pools: no scene is in both
    assert not {np.asarray(item.image).tobytes() for item in database} & {image.tobytes() for image in images}
    with pytest.raises(ValueError, match="world-eval:ten: the world-eval source takes a number of scenes"):
        plan_shards(["world-eval:ten"])


def test_world_eval_builds_a_database(backend, tmp_path):
    from arrag.build import build_database
    from arrag.retrieval.database import PatchDatabase

    assert build_database(backend, ["world-eval:7"], tmp_path / "db").images_added == 7
    assert PatchDatabase.load(tmp_path / "db").sources[0].startswith("world-eval-scene-0: ")
