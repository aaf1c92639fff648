"""arrag: autoregressive retrieval augmentation (AR-RAG) for token-based image generators."""

from __future__ import annotations

__version__ = "0.1.0"

from arrag.backends import load_backend
from arrag.config import GenerationConfig, RetrievalConfig, SamplingConfig
from arrag.decoding.loop import GenerationOutput, generate
from arrag.retrieval.database import DatabaseSpec, PatchDatabase
from arrag.retrieval.grid import Grid, Neighbourhood

__all__ = [
    "DatabaseSpec",
    "GenerationConfig",
    "GenerationOutput",
    "Grid",
    "Neighbourhood",
    "PatchDatabase",
    "RetrievalConfig",
    "SamplingConfig",
    "__version__",
    "generate",
    "load_backend",
]
