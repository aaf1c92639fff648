"""What makes a build or add all or nothing: one at a time in a folder, and the folder as it was if it fails.

- :func:`locked`: a build or add holds a lock (``flock``) on the database folder; a second one is refused.
- :func:`set_aside`: an ``overwrite`` build moves the database it replaces into ``DB/build/previous``,
  where it stays until the new database is complete (:func:`commit`) and comes back if the build fails
  (:func:`undo`).
- recovery: a build or add killed while a database was being set aside or put back is finished by the next
  one, before it does anything else (inside :func:`locked`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from arrag.build.plan import BuildPlan
from arrag.retrieval.layout import DatabaseLayout

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def locked(layout: DatabaseLayout, create: bool) -> Iterator[None]:
    """Hold the lock on the database folder while a build or add runs in it, having first recovered what a kill
    left unfinished. A folder made here (``create``) is removed again if the build leaves it empty (it was
    refused)."""
    directory = layout.root
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file; choose a folder")
    made = create and not directory.exists()
    if made:
        directory.mkdir(parents=True)
    elif not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a patch database (no such folder); build one with arrag db build")
    handle = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"another arrag build or add is running in {directory}; let it finish") from None
        _recover(layout)
        yield
    finally:
        os.close(handle)  # releases the lock
        if made and not any(directory.iterdir()):
            directory.rmdir()


def set_aside(layout: DatabaseLayout) -> None:
    """For an ``overwrite`` build: move the database into the build's state, where it stays until the new
    build is complete, and comes back if the build fails; an interrupted build is removed."""
    if layout.previous.exists():  # an interrupted overwrite: its database comes back first
        _restore_previous(layout)
    if not layout.manifest.exists():
        clear_database(layout.root)
        return
    shutil.rmtree(layout.state, ignore_errors=True)
    layout.previous_partial.mkdir(parents=True)
    for path in layout.database_files():  # the manifest first: a half-moved database does not load
        path.rename(layout.previous_partial / path.name)
    layout.previous_partial.rename(layout.previous)


def undo(layout: DatabaseLayout, plan: BuildPlan, merging: bool) -> None:
    """After a failed build or add: put back the database an overwrite build replaced; forget an add that
    failed before its merge (its token shards and state), so the database takes further adds."""
    if layout.previous.exists():
        _restore_previous(layout)
    elif plan.kind == "add" and not merging and not layout.base_index.exists():  # no merge begun, ever
        for shard in plan.shards:
            layout.token_shard(shard.index).unlink(missing_ok=True)
        shutil.rmtree(layout.state)


def commit(layout: DatabaseLayout, plan: BuildPlan) -> None:
    """The database is complete: end its build (the database it replaced goes with the build's state; from
    here on, resuming has nothing to do), then remove the index before an add and inverted-list files no
    index refers to any more."""
    shutil.rmtree(layout.state)
    layout.base_index.unlink(missing_ok=True)
    for stale in layout.ivfdata_files():
        if stale.name != plan.ivfdata:
            stale.unlink()


def clear_database(directory: str | Path) -> None:
    """Remove a database's files and any build state in ``directory``."""
    layout = DatabaseLayout(directory)
    for path in [*layout.database_files(), layout.state]:
        _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _restore_previous(layout: DatabaseLayout) -> None:
    """Put back the database an overwrite build set aside, removing what that build wrote."""
    for path in layout.database_files():
        _remove(path)
    layout.previous.rename(layout.previous_restoring)  # what the build wrote is gone
    _move_back(layout, layout.previous_restoring)
    logger.warning("the database that was in %s is back in place", layout.root)


def _move_back(layout: DatabaseLayout, held: Path) -> None:
    """Move a set-aside database's files back into the database folder, the manifest last; end its build."""
    for path in sorted(held.iterdir(), key=lambda path: path == held / layout.manifest.name):
        path.rename(layout.root / path.name)
    shutil.rmtree(layout.state)


def _recover(layout: DatabaseLayout) -> None:
    """Finish what a kill interrupted while a database was being set aside or put back."""
    for unfinished in (layout.previous_partial, layout.previous_restoring):
        if unfinished.exists():  # only the old database's files were moving: move the rest back
            _move_back(layout, unfinished)
    if layout.previous.exists() and not layout.plan.exists():  # set aside, the build not begun
        _restore_previous(layout)
