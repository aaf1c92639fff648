"""Where everything of a patch database folder lives, and the one way a file in it is written.

    DB/manifest.json                  what the database is (written last: a database without it never loads)
    DB/index.faiss                    the FAISS index
    DB/*.ivfdata                      its on-disk inverted lists, for an ``on_disk`` index
    DB/next-tokens.npy                the next token of every entry, for an index that stores no ids
    DB/sources.json                   the name of every image
    DB/trained.faiss                  the trained empty index: what an add adds shards to
    DB/build-report.json              every build and add run: what each read, skipped, ignored and found there already
    DB/tokens/shard-NNNNNN.parquet    every image's tokens, one file a shard
    DB/index.base.faiss               the index before an add, kept until the add is complete

    DB/build/                         a build or add in progress, removed when the database is complete:
        plan.json                     what it does
        tokenized/NNNNNN.json         a shard's tokenize record, written after its token file
        index/shard-NNNNNN.faiss      a shard's index
        trained.faiss                 the trained empty index of this build
        previous/                     the database an overwrite replaces, kept until the build is complete
        previous.partial/             ... while it is being set aside
        previous.restoring/           ... while it is being put back

Every file of it is written through :func:`write_atomically`: under its final name only when complete, and
a build or add holds the folder's lock (:meth:`DatabaseLayout.lock`) while it runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
SOURCES_FILE = "sources.json"
NEXT_TOKENS_FILE = "next-tokens.npy"
TEMPLATE_FILE = "trained.faiss"
REPORT_FILE = "build-report.json"
BASE_FILE = "index.base.faiss"
TOKENS_DIR = "tokens"
STATE_DIR = "build"
PLAN_FILE = "plan.json"
PREVIOUS_DIR = "previous"

_held: set[tuple[Path, int]] = set()  # (folder, thread) of every build lock this process holds


class BuildRunningError(FileExistsError):
    """A build or add is running in the database folder: it holds the folder's lock."""


@dataclass(frozen=True)
class DatabaseLayout:
    """The paths of the database in folder ``root`` and of its build's state (a str is taken for a Path, so a
    worker process sent the folder's name builds the same layout)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # The database's own files

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def index(self) -> Path:
        return self.root / INDEX_FILE

    @property
    def sources(self) -> Path:
        return self.root / SOURCES_FILE

    @property
    def next_tokens(self) -> Path:
        return self.root / NEXT_TOKENS_FILE

    @property
    def trained(self) -> Path:
        return self.root / TEMPLATE_FILE

    @property
    def report(self) -> Path:
        return self.root / REPORT_FILE

    @property
    def base_index(self) -> Path:
        return self.root / BASE_FILE

    @staticmethod
    def token_file(shard: int) -> str:
        """Shard ``shard``'s token file relative to the folder, as the manifest and the shard records name it."""
        return f"{TOKENS_DIR}/shard-{shard:06d}.parquet"

    @staticmethod
    def shard_of(token_file: str) -> int:
        """The shard number in a token file's name: the inverse of :meth:`token_file`."""
        return int(Path(token_file).stem.rsplit("-", 1)[1])

    def token_shard(self, shard: int) -> Path:
        return self.root / self.token_file(shard)

    @staticmethod
    def ivfdata_name(first_added_shard: int | None = None) -> str:
        """The inverted-list file of a build (None), or of an add whose shards are numbered from
        ``first_added_shard``: a new name, so that the index before the add keeps its own file."""
        return "index.ivfdata" if first_added_shard is None else f"index-{first_added_shard:06d}.ivfdata"

    def ivfdata_files(self) -> list[Path]:
        return sorted(self.root.glob("*.ivfdata"))

    def database_files(self) -> list[Path]:
        """The files and folders of the database that exist, the manifest first (so that a database half
        removed or moved never loads)."""
        names = (
            MANIFEST_FILE,
            INDEX_FILE,
            NEXT_TOKENS_FILE,
            BASE_FILE,
            SOURCES_FILE,
            TEMPLATE_FILE,
            REPORT_FILE,
            TOKENS_DIR,
        )
        return [self.root / name for name in names if (self.root / name).exists()] + self.ivfdata_files()

    # The build lock

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's build lock (``flock``, released however the process ends); refused at once, with
        :class:`BuildRunningError`, while another build or add holds it."""
        handle = os.open(self.root, os.O_RDONLY)
        key = (self.root.resolve(), threading.get_ident())
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self.running() from None
            _held.add(key)
            yield
        finally:
            _held.discard(key)
            os.close(handle)  # releases the lock

    def build_running(self) -> bool:
        """Whether a build or add holds the folder's lock (other than one the calling thread runs)."""
        if not self.root.is_dir() or (self.root.resolve(), threading.get_ident()) in _held:
            return False
        handle = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a probe: closing the handle releases it
        except BlockingIOError:
            return True
        finally:
            os.close(handle)
        return False

    def running(self) -> BuildRunningError:
        return BuildRunningError(f"a build is running in {self.root}; wait for it to finish")

    # The state of a build or add in progress

    @property
    def state(self) -> Path:
        return self.root / STATE_DIR

    @property
    def plan(self) -> Path:
        return self.state / PLAN_FILE

    def tokenized(self, shard: int) -> Path:
        return self.state / "tokenized" / f"{shard:06d}.json"

    def index_shard(self, shard: int) -> Path:
        return self.state / "index" / f"shard-{shard:06d}.faiss"

    @property
    def state_trained(self) -> Path:
        return self.state / TEMPLATE_FILE

    @property
    def previous(self) -> Path:
        return self.state / PREVIOUS_DIR

    @property
    def previous_partial(self) -> Path:
        """Where the replaced database's files gather; renamed to :attr:`previous` once all are in."""
        return self.state / f"{PREVIOUS_DIR}.partial"

    @property
    def previous_restoring(self) -> Path:
        """Where the replaced database is once what the failed build wrote is gone, while it moves back."""
        return self.state / f"{PREVIOUS_DIR}.restoring"

    @property
    def unfinished(self) -> bool:
        """Whether the folder holds an unfinished build or add (or a database set aside by one)."""
        return self.plan.is_file() or self.previous.is_dir()

    def unfinished_kind(self) -> str:
        """``build`` or ``add``: what the unfinished plan in the folder does (``build`` if it is unreadable)."""
        try:
            return str(json.loads(self.plan.read_text())["kind"])
        except (OSError, ValueError, KeyError, TypeError):
            return "build"

    def unfinished_message(self, restart: bool = False) -> str:
        """What the folder's unfinished build or add is and the ways on from it: ``resume=True``, ``rollback()``
        and, with ``restart``, ``overwrite=True``."""
        kind = self.unfinished_kind()
        again = ", start again with overwrite=True" if restart else ""
        if self.previous.is_dir():
            after = f"; the database it replaces is kept in {self.previous} and comes back on rollback()"
        else:
            after = " (which empties the folder)" if kind == "build" else " (which leaves the database as before it)"
        return (
            f"{self.root} holds an unfinished {kind}; finish it with resume=True (the same inputs and settings)"
            f"{again} or abandon it with rollback(){after}"
        )


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path``: readers see all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # the pid: two writers never share a temporary file
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: object) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2)))
