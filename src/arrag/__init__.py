"""arrag: autoregressive retrieval augmentation (AR-RAG) for token-based image generators."""

from __future__ import annotations

__version__ = "0.1.0"

from arrag.backends import load_backend
from arrag.config import GenerationConfig, RetrievalConfig, SamplingConfig
from arrag.decoding.loop import GenerationOutput, generate, generate_in_batches
from arrag.metadata import Settings
from arrag.outputs import ImageWriter, save
from arrag.retrieval.database import DatabaseSpec, PatchDatabase
from arrag.retrieval.grid import Grid, Neighbourhood

__all__ = [
    "DatabaseSpec",
    "GenerationConfig",
    "GenerationOutput",
    "Grid",
    "ImageWriter",
    "Neighbourhood",
    "PatchDatabase",
    "RetrievalConfig",
    "SamplingConfig",
    "Settings",
    "__version__",
    "generate",
    "generate_in_batches",
    "load_backend",
    "save",
]
