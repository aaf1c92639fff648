"""Where database images come from, planned into shards and read one shard at a time.

Inputs are image files, folders (searched recursively for images, ``.tar`` WebDataset shards and
``.parquet`` files), and ``world:N`` — the built-in world's first N database scenes. :func:`plan_shards`
turns them into a list of :class:`ShardSpec` (plain JSON, so an interrupted build resumes from exactly the
same plan); :func:`read_shard` yields every item of one shard decoded to RGB, or the reason it could not be.
Nothing here raises on one bad file.
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from arrag.images import IMAGE_SUFFIXES, ImageReadError, drop_duplicate_files, files_under, read_image

logger = logging.getLogger(__name__)

ShardKind = Literal["files", "tar", "parquet", "world"]
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes")  # first one present is read
NAME_COLUMNS = ("__key__", "key", "path", "url", "file_name", "filename", "id")
_WORLD = re.compile(r"world:(\d+)")


@dataclass(frozen=True)
class SourceConfig:
    """How inputs are split into shards and which Parquet columns hold the images.

    Attributes:
        shard_size: loose image files per shard (a tar file or a Parquet row group is one shard).
        image_column: Parquet column with encoded image bytes (or Hugging Face ``{"bytes", "path"}``
            structs); by default the first of ``IMAGE_COLUMNS`` present.
        name_column: Parquet column naming each row; by default the first of ``NAME_COLUMNS`` present.
    """

    shard_size: int = 1000
    image_column: str | None = None
    name_column: str | None = None

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: a list of image files, a tar file, a Parquet row group or a batch of world scenes."""

    index: int
    kind: ShardKind
    location: str = ""  # tar or Parquet file
    items: tuple[str, ...] = ()  # image files
    start: int = 0  # Parquet row group; first world scene
    count: int = 0  # world scenes
    image_column: str | None = None
    name_column: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "items": list(self.items)}

    @classmethod
    def from_dict(cls, data: dict) -> ShardSpec:
        return cls(**{**data, "items": tuple(data.get("items", ()))})


@dataclass(frozen=True)
class Item:
    """One item of a shard: a decoded RGB image, or the reason there is none."""

    name: str
    image: Image.Image | None = None
    error: str = ""


@dataclass
class Plan:
    """Shards to read, and the input files that were passed over with the reason."""

    shards: list[ShardSpec] = field(default_factory=list)
    ignored: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}


def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    return path.name.lower().endswith(tuple(suffixes))


def plan_shards(inputs: Sequence[str | Path], config: SourceConfig = SourceConfig(), first_index: int = 0) -> Plan:
    """Split ``inputs`` into shards numbered from ``first_index``, in a deterministic order.

    Loose image files come first (in input order; folders sorted), in shards of ``config.shard_size``; then
    one shard per tar file and per Parquet row group; then the world's scenes. Files in folders that are
    none of these are ignored and listed; a file named directly is always tried as an image. Folders are
    searched through symlinks; a file reached more than once (given twice, in nested folders given both,
    through symlinks) is read once, where it first came.
    """
    files: list[Path] = []
    named: set[Path] = set()  # given directly, so tried as an image whatever its name
    worlds: list[int] = []
    for raw in inputs:
        match = _WORLD.fullmatch(str(raw))
        if match:
            worlds.append(int(match.group(1)))
            continue
        path = Path(raw)
        if path.is_dir():
            files += files_under(path)
        elif path.exists():
            files.append(path)
            named.add(path)
        else:
            raise FileNotFoundError(f"{raw} does not exist (inputs are image files, folders or world:N)")
    images: list[Path] = []
    containers: list[Path] = []
    plan = Plan()
    for path in drop_duplicate_files(files):
        if _has_suffix(path, TAR_SUFFIXES + PARQUET_SUFFIXES):
            containers.append(path)
        elif path in named or path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            plan.ignored.append({"path": str(path), "reason": "not an image, tar or Parquet file name"})
    index = first_index

    def add(**fields: object) -> None:
        nonlocal index
        plan.shards.append(ShardSpec(index=index, **fields))  # type: ignore[arg-type]
        index += 1

    for start in range(0, len(images), config.shard_size):
        add(kind="files", items=tuple(str(p) for p in images[start : start + config.shard_size]))
    for container in containers:
        if _has_suffix(container, TAR_SUFFIXES):
            add(kind="tar", location=str(container))
            continue
        try:
            groups = _parquet_file(container).metadata.num_row_groups
        except Exception as error:  # pyarrow raises several types for damaged files
            plan.ignored.append({"path": str(container), "reason": f"unreadable Parquet file: {error}"})
            continue
        for group in range(groups):
            add(
                kind="parquet",
                location=str(container),
                start=group,
                image_column=config.image_column,
                name_column=config.name_column,
            )
    if worlds:
        from arrag.world.database import SCENE_BATCH  # the world's scenes are seeded per batch of SCENE_BATCH

    for scenes in worlds:
        for start in range(0, scenes, SCENE_BATCH):
            add(kind="world", start=start, count=min(SCENE_BATCH, scenes - start))
    return plan


def read_shard(shard: ShardSpec) -> Iterator[Item]:
    """Every item of ``shard``, decoded or with the reason it could not be; never raises for bad data."""
    readers = {"files": _read_files, "tar": _read_tar, "parquet": _read_parquet, "world": _read_world}
    yield from readers[shard.kind](shard)


def _decoded(name: str, data: bytes | Path) -> Item:
    try:
        return Item(name, read_image(data))
    except ImageReadError as error:
        return Item(name, error=str(error))


def _read_files(shard: ShardSpec) -> Iterator[Item]:
    for path in shard.items:
        yield _decoded(path, Path(path))


def _read_tar(shard: ShardSpec) -> Iterator[Item]:
    """WebDataset samples: members grouped by the path up to the first dot of the file name; the first
    image member of each sample is read, captions and metadata are not."""
    seen: set[str] = set()
    try:
        with tarfile.open(shard.location, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                directory, _, name = member.name.rpartition("/")
                key = f"{directory}/{name.split('.', 1)[0]}"
                if key in seen or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                seen.add(key)
                data = archive.extractfile(member)
                yield _decoded(f"{shard.location}::{member.name}", data.read() if data else b"")
    except (tarfile.TarError, OSError, EOFError) as error:
        yield Item(shard.location, error=f"unreadable tar file after {len(seen)} samples: {error}")


def _parquet_file(path: str | Path):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path)


def _column(names: Sequence[str], chosen: str | None, candidates: Sequence[str]) -> str | None:
    if chosen is not None:
        return chosen if chosen in names else None
    return next((name for name in candidates if name in names), None)


def _read_parquet(shard: ShardSpec) -> Iterator[Item]:
    where = f"{shard.location}#rowgroup{shard.start}"
    try:
        file = _parquet_file(shard.location)
        names = file.schema_arrow.names
        image_column = _column(names, shard.image_column, IMAGE_COLUMNS)
        if image_column is None:
            wanted = shard.image_column or " or ".join(IMAGE_COLUMNS)
            yield Item(where, error=f"no image column {wanted} among {names}")
            return
        name_column = _column(names, shard.name_column, NAME_COLUMNS)
        table = file.read_row_group(shard.start, columns=[c for c in (image_column, name_column) if c])
    except Exception as error:  # pyarrow raises several types for damaged files
        yield Item(where, error=f"unreadable Parquet row group: {error}")
        return
    first_row = sum(file.metadata.row_group(g).num_rows for g in range(shard.start))
    labels = table.column(name_column).to_pylist() if name_column else [None] * table.num_rows
    for row, (value, label) in enumerate(zip(table.column(image_column).to_pylist(), labels, strict=True)):
        name = f"{shard.location}::{label if label is not None else first_row + row}"
        data = value.get("bytes") if isinstance(value, dict) else value
        if not isinstance(data, bytes):
            yield Item(name, error=f"column {image_column!r} holds {type(data).__name__}, not image bytes")
        else:
            yield _decoded(name, data)


def _read_world(shard: ShardSpec) -> Iterator[Item]:
    from arrag.world.database import world_scene_name, world_scenes

    prompts, images = world_scenes(shard.start, shard.count)
    for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        yield Item(world_scene_name(shard.start + i, prompt), Image.fromarray(image))
