"""Building and growing patch databases from image collections: plan → stages → train → merge.

The inputs' kinds are in :mod:`arrag.build.sources` (other packages register theirs by scheme), the
plan in :mod:`arrag.build.plan`, the per-shard stages in :mod:`arrag.build.stages`, the engines that run
them in :mod:`arrag.build.engines`, the pipeline in :mod:`arrag.build.pipeline` and what makes it all or
nothing (and :func:`rollback`) in :mod:`arrag.build.transaction`.
"""

from arrag.build.pipeline import BuildConfig, BuildReport, add_to_database, build_database
from arrag.build.sources import SourceConfig
from arrag.build.transaction import clear_database, rollback
from arrag.retrieval.layout import BuildRunningError

__all__ = [
    "BuildConfig",
    "BuildReport",
    "BuildRunningError",
    "SourceConfig",
    "add_to_database",
    "build_database",
    "clear_database",
    "rollback",
]
