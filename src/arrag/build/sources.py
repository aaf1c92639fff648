"""Where database images come from, planned into shards and read one shard at a time.

Inputs are image files, folders (searched recursively for images, ``.tar`` WebDataset shards and
``.parquet`` files), and sources named ``SCHEME:ARGUMENT``: kinds of input that packages register under
their scheme in the ``arrag.sources`` entry-point group (:class:`SourceKind`; arrag's own built-in world
registers ``world:N``, its first N database scenes, and ``world-eval:N``, N held-out ones).
:func:`plan_shards` turns inputs into a list of :class:`ShardSpec` (plain JSON, so an interrupted build
resumes from exactly the same plan; files by absolute path, so provenance does not depend on the folder the
build ran in); :func:`read_shard` yields every item of one shard decoded to RGB, with its caption where the
input has one and the SHA-256 of its encoded bytes, or the reason it could not be decoded. Nothing here
raises on one bad file.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import entry_points
from pathlib import Path

from PIL import Image

from arrag.images import IMAGE_SUFFIXES, ImageReadError, drop_duplicate_files, files_under, read_image

logger = logging.getLogger(__name__)

SOURCE_GROUP = "arrag.sources"  # the entry-point group in which packages register source kinds by scheme
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes")  # first one present is read
NAME_COLUMNS = ("__key__", "key", "path", "url", "file_name", "filename", "id")
CAPTION_COLUMNS = ("caption", "text", "prompt")  # Parquet: the first one present captions the rows
CAPTION_SUFFIX = ".txt"  # WebDataset: the member of a sample that captions it
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(.*)", re.DOTALL)


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
    """One unit of work: a list of image files, a tar file, a Parquet row group, or a part of a source.

    ``kind`` is ``files``, ``tar``, ``parquet`` or the scheme of the source the shard belongs to.
    """

    index: int
    kind: str
    location: str = ""  # tar or Parquet file
    items: tuple[str, ...] = ()  # image files
    start: int = 0  # Parquet row group; a source's first item
    count: int = 0  # a source's items
    image_column: str | None = None
    name_column: str | None = None

    def __post_init__(self) -> None:
        if self.index < 0 or not self.kind:
            raise ValueError(f"a shard needs a kind and an index >= 0, got {self.kind!r} and {self.index}")

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "items": list(self.items)}

    @classmethod
    def from_dict(cls, data: dict) -> ShardSpec:
        return cls(**{**data, "items": tuple(data.get("items", ()))})


@dataclass(frozen=True)
class Item:
    """One item of a shard: a decoded RGB image, or the reason there is none.

    Attributes:
        name: where it came from (its source name in the database).
        image: the decoded image; None if it could not be decoded.
        error: why not.
        caption: its text, where the input has one (a world scene's prompt, a WebDataset ``.txt`` member,
            a Parquet caption column).
        sha256: hex digest of its encoded bytes ("" for generated images): how an add knows it is already there.
    """

    name: str
    image: Image.Image | None = None
    error: str = ""
    caption: str | None = None
    sha256: str = ""


@dataclass(frozen=True)
class SourcePlan:
    """Shards to read, and the input files that were passed over with the reason."""

    shards: list[ShardSpec]
    ignored: list[dict[str, str]]  # {"path", "reason"}


@dataclass(frozen=True)
class SourceKind:
    """A kind of input named ``SCHEME:ARGUMENT``, registered under its scheme in the ``arrag.sources``
    entry-point group, e.g. ``world = "arrag.world.source:WORLD"``.

    Attributes:
        plan: (argument, number of its first shard) -> its shards, numbered on from there, whose ``kind`` is
            the scheme (how :func:`read_shard` finds ``read`` again, in any process).
        read: one of those shards -> its items, decoded or with the reason they could not be.
    """

    plan: Callable[[str, int], list[ShardSpec]]
    read: Callable[[ShardSpec], Iterator[Item]]


def source_schemes() -> list[str]:
    """The schemes of the registered source kinds."""
    return sorted({point.name for point in entry_points(group=SOURCE_GROUP)})


@functools.cache
def source_kind(scheme: str) -> SourceKind:
    """The source kind registered for ``scheme``."""
    points = entry_points(group=SOURCE_GROUP, name=scheme)
    if not points:
        raise ValueError(f"unknown source scheme {scheme!r}; known schemes: {', '.join(source_schemes()) or 'none'}")
    kind = next(iter(points)).load()
    if not isinstance(kind, SourceKind):
        raise TypeError(f"the {SOURCE_GROUP} entry point {scheme!r} is a {type(kind).__name__}, not a SourceKind")
    return kind


def _source(raw: str) -> tuple[str, str] | None:
    """(scheme, argument) of an input that names a source rather than a file."""
    match = _SCHEME.fullmatch(raw)
    if match is None or (Path(raw).exists() and match.group(1) not in source_schemes()):
        return None
    return match.group(1), match.group(2)


def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    return path.name.lower().endswith(tuple(suffixes))


def plan_shards(
    inputs: Sequence[str | Path], config: SourceConfig = SourceConfig(), first_index: int = 0
) -> SourcePlan:
    """Split ``inputs`` into shards numbered from ``first_index``, in a deterministic order.

    Loose image files come first (in input order; folders sorted), in shards of ``config.shard_size``; then
    one shard per tar file and per Parquet row group; then the sources' shards, in input order. Files in
    folders that are none of these are ignored and listed; a file named directly is always tried as an
    image. Folders are searched through symlinks; a file reached more than once (given twice, in nested
    folders given both, through symlinks) is read once, where it first came. Files are named by absolute
    path (symlinks kept as reached).
    """
    files: list[Path] = []
    named: set[Path] = set()  # given directly, so tried as an image whatever its name
    sources: list[tuple[str, str]] = []
    for raw in inputs:
        source = _source(str(raw))
        if source is not None:
            source_kind(source[0])  # an unknown scheme fails before any folder is searched
            sources.append(source)
            continue
        path = Path(os.path.abspath(raw))  # provenance that holds from any folder
        if path.is_dir():
            files += files_under(path)
        elif path.exists():
            files.append(path)
            named.add(path)
        else:
            schemes = ", ".join(source_schemes())
            raise FileNotFoundError(
                f"{raw} does not exist (inputs are image files, folders or SCHEME:ARGUMENT sources; schemes: {schemes})"
            )
    images: list[Path] = []
    containers: list[Path] = []
    shards: list[ShardSpec] = []
    ignored: list[dict[str, str]] = []
    for path in drop_duplicate_files(files):
        if _has_suffix(path, TAR_SUFFIXES + PARQUET_SUFFIXES):
            containers.append(path)
        elif path in named or path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            ignored.append({"path": str(path), "reason": "not an image, tar or Parquet file name"})

    def add(**fields: object) -> None:
        shards.append(ShardSpec(index=first_index + len(shards), **fields))  # type: ignore[arg-type]

    for start in range(0, len(images), config.shard_size):
        add(kind="files", items=tuple(str(p) for p in images[start : start + config.shard_size]))
    for container in containers:
        if _has_suffix(container, TAR_SUFFIXES):
            add(kind="tar", location=str(container))
            continue
        try:
            groups = _parquet_file(container).metadata.num_row_groups
        except Exception as error:  # pyarrow raises several types for damaged files
            ignored.append({"path": str(container), "reason": f"unreadable Parquet file: {error}"})
            continue
        for group in range(groups):
            add(
                kind="parquet",
                location=str(container),
                start=group,
                image_column=config.image_column,
                name_column=config.name_column,
            )
    for scheme, argument in sources:
        first = first_index + len(shards)
        planned = source_kind(scheme).plan(argument, first)
        if [(shard.index, shard.kind) for shard in planned] != [(first + i, scheme) for i in range(len(planned))]:
            raise ValueError(f"the {scheme}: source must number its shards on from {first}, of kind {scheme!r}")
        shards += planned
    return SourcePlan(shards, ignored)


def read_shard(shard: ShardSpec) -> Iterator[Item]:
    """Every item of ``shard``, decoded or with the reason it could not be; never raises for bad data."""
    readers = {"files": _read_files, "tar": _read_tar, "parquet": _read_parquet}
    yield from (readers[shard.kind] if shard.kind in readers else source_kind(shard.kind).read)(shard)


def _decoded(name: str, data: bytes, caption: str | None = None) -> Item:
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        return Item(name, read_image(data), caption=caption, sha256=sha256)
    except ImageReadError as error:
        return Item(name, error=str(error), caption=caption, sha256=sha256)


def _read_files(shard: ShardSpec) -> Iterator[Item]:
    for path in shard.items:
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            yield Item(path, error=f"{type(error).__name__}: {error.strerror or error}")
            continue
        yield _decoded(path, data)


def _sample_key(member: tarfile.TarInfo) -> str:
    """A WebDataset member's sample: its path up to the first dot of the file name."""
    directory, _, name = member.name.rpartition("/")
    return f"{directory}/{name.split('.', 1)[0]}"


def _read_tar(shard: ShardSpec) -> Iterator[Item]:
    """WebDataset samples: consecutive members with the same path up to the first dot of the file name; the
    first image member of each sample is read, captioned by its ``.txt`` member; other members are not read."""
    seen: set[str] = set()
    try:
        with tarfile.open(shard.location, mode="r|*") as archive:
            files = (member for member in archive if member.isfile())
            for key, members in itertools.groupby(files, key=_sample_key):
                image: tuple[str, bytes] | None = None
                caption = None
                for member in members:  # read while current: the archive is a stream
                    suffix = Path(member.name).suffix.lower()
                    wanted = (image is None and suffix in IMAGE_SUFFIXES) or (
                        caption is None and suffix == CAPTION_SUFFIX
                    )
                    data = archive.extractfile(member) if wanted else None
                    content = data.read() if data else b""
                    if wanted and suffix == CAPTION_SUFFIX:
                        caption = content.decode("utf-8", errors="replace").strip()
                    elif wanted:
                        image = (member.name, content)
                if image is not None and key not in seen:
                    seen.add(key)
                    yield _decoded(f"{shard.location}::{image[0]}", image[1], caption)
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
        caption_column = _column(names, None, CAPTION_COLUMNS)
        columns = [c for c in (image_column, name_column, caption_column) if c]
        table = file.read_row_group(shard.start, columns=list(dict.fromkeys(columns)))
    except Exception as error:  # pyarrow raises several types for damaged files
        yield Item(where, error=f"unreadable Parquet row group: {error}")
        return
    first_row = sum(file.metadata.row_group(g).num_rows for g in range(shard.start))

    def values(column: str | None) -> list:
        return table.column(column).to_pylist() if column else [None] * table.num_rows

    rows = zip(values(image_column), values(name_column), values(caption_column), strict=True)
    for row, (value, label, caption) in enumerate(rows):
        name = f"{shard.location}::{label if label is not None else first_row + row}"
        data = value.get("bytes") if isinstance(value, dict) else value
        caption = caption if isinstance(caption, str) else None
        if not isinstance(data, bytes):
            yield Item(name, error=f"column {image_column!r} holds {type(data).__name__}, not image bytes")
        else:
            yield _decoded(name, data, caption)
