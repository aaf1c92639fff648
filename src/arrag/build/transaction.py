"""What makes a build or add all or nothing: one at a time in a folder, and the folder as it was if it fails.

- :func:`locked`: a build or add holds a lock (``flock``) on the database folder; a second one is refused.
- :func:`set_aside`: an ``overwrite`` build moves the database it replaces into ``DB/build/previous``,
  where it stays until the new database is complete (:func:`commit`) and comes back if the build fails
  (:func:`undo`) or is abandoned (:func:`rollback`).
- :func:`undo`: a failed build or add leaves the folder as it found it, unless what it tokenized is worth
  resuming; :func:`rollback` abandons an unfinished (killed, or failed and kept) one.
- recovery: a build or add killed while a database was being set aside or put back is finished by the next
  one, before it does anything else (inside :func:`locked`).
"""

from __future__ import annotations

import contextlib
import logging
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
    try:
        with layout.lock():
            _recover(layout)
            yield
    finally:
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


def undo(layout: DatabaseLayout, plan: BuildPlan, keep: bool) -> bool:
    """After a failed build or add: the folder as the build or add found it (:func:`_abandon`), unless
    ``keep`` (what it tokenized is worth resuming) or an add's merge has begun (it can only be finished).
    Returns whether the unfinished build or add is kept."""
    if keep or layout.base_index.exists():
        return True
    _abandon(layout, plan)
    return False


def rollback(directory: str | Path) -> None:
    """Abandon the unfinished build or add in ``directory`` (killed, or failed and kept for ``resume=True``):
    the database an ``overwrite`` build set aside comes back; without one, a build's files are removed (the
    folder is left empty) and an add is forgotten (the database is left as before it)."""
    layout = DatabaseLayout(directory)
    with locked(layout, create=False):
        if not layout.plan.exists():
            raise FileNotFoundError(f"{layout.root} holds no unfinished build or add to roll back")
        if layout.base_index.exists():
            raise ValueError(
                f"the add in {layout.root} was interrupted while merging its entries into the database, which "
                "cannot be rolled back; finish it with resume=True"
            )
        _abandon(layout, BuildPlan.read(layout.plan) if layout.unfinished_kind() == "add" else None)
    logger.info("rolled back the unfinished build or add in %s", layout.root)


def _abandon(layout: DatabaseLayout, plan: BuildPlan | None) -> None:
    """Undo a build or add that has not merged: put back the database an overwrite build replaced, remove a
    build's files, or forget an add (``plan``: its token shards and state)."""
    if layout.previous.exists():
        _restore_previous(layout)
    elif plan is not None and plan.kind == "add":
        for shard in plan.shards:
            layout.token_shard(shard.index).unlink(missing_ok=True)
        shutil.rmtree(layout.state)
    else:
        clear_database(layout.root)


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
