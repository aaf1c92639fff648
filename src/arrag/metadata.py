"""What a generated image carries in its PNG text chunk (and ``arrag generate``'s JSON sidecar).

An image's metadata: its prompt and seed, the run's :class:`Settings` (backend, patch database, FAiD adapter,
generation config, prompt clipping), the arrag version, its tokens and, per position, the database patch
its token came from. A grid of one prompt's images carries the prompt, the seeds and the settings.

The settings are what makes two runs' images comparable: with the same settings, a seed gives the same image.
A benchmark runner refuses to add images to a folder whose finished images were made with other settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from arrag import __version__
from arrag.config import GenerationConfig

if TYPE_CHECKING:
    from arrag.decoding.loop import GenerationOutput
    from arrag.retrieval.database import PatchDatabase


@dataclass(frozen=True)
class Settings:
    """A generation run as its images record it; ``to_dict`` is written at the top level of their metadata."""

    backend: str  # the backend's name, which loads it again
    config: GenerationConfig
    database: str | None = None  # the patch database's folder
    faid: str | None = None  # the FAiD adapter's folder, or "shipped"
    max_prompt_bytes: int | None = None  # prompts were cut to this many UTF-8 bytes (BenchConfig)
    retrieval_from: str | None = None  # where DAiD's setting came from (calibration.json, defaults), options aside

    def __post_init__(self) -> None:
        if not self.backend:
            raise ValueError("settings need the backend's name")
        if not isinstance(self.config, GenerationConfig):
            raise ValueError(f"config must be a GenerationConfig, got {type(self.config).__name__}")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready, as read back from an image (tuples as lists)."""
        values = {field.name: getattr(self, field.name) for field in fields(self)}
        return json.loads(json.dumps({**values, "config": self.config.to_dict()}))


SETTINGS_KEYS = tuple(field.name for field in fields(Settings))


def settings_of(metadata: dict) -> dict[str, object]:
    """The settings recorded in an image's metadata ({} for an image arrag did not make)."""
    return {key: metadata[key] for key in SETTINGS_KEYS if key in metadata}


def image_metadata(
    output: GenerationOutput, row: int, settings: Settings, database: PatchDatabase | None = None
) -> dict[str, object]:
    """Row ``row`` of a generation: prompt, seed, settings, version, tokens and provenance.

    Provenance, per position: the database image and position of the nearest retrieved neighbour whose next
    token was the sampled one (-1 where none was), and the sources of those images.
    """
    records = output.records
    image_ids = records.image_ids[row].tolist()
    used = sorted(set(image_ids) - {-1})
    return {
        "prompt": output.prompts[row],
        "seed": output.seeds[row],
        **settings.to_dict(),
        "arrag_version": __version__,
        "tokens": output.tokens[row].tolist(),
        "provenance": {
            "image_ids": image_ids,
            "positions": records.positions[row].tolist(),
            "sources": {i: database.sources[i] for i in used} if database is not None else {},
        },
    }


def grid_metadata(output: GenerationOutput, rows: range, settings: Settings) -> dict[str, object]:
    """A grid of the rows ``rows`` of one prompt: prompt, seeds in grid order, settings and version."""
    return {
        "prompt": output.prompts[rows.start],
        "seeds": [output.seeds[row] for row in rows],
        **settings.to_dict(),
        "arrag_version": __version__,
    }
