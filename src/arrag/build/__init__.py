"""Building and growing patch databases from image collections: plan → stages → train → merge."""

from arrag.build.pipeline import BuildConfig, BuildReport, add_images, add_to_database, build_database, clear_database

__all__ = ["BuildConfig", "BuildReport", "add_images", "add_to_database", "build_database", "clear_database"]
