"""The plan of a build or add: what it will do, written to ``DB/build/plan.json`` before it starts.

Resuming reads the plan back and refuses to go on with other inputs or settings, so that an interrupted
build, finished, is exactly the build it began as.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from arrag.build.sources import ShardSpec, SourceConfig
from arrag.retrieval.database import MANIFEST_VERSION, DatabaseSpec
from arrag.retrieval.indexes import IndexConfig
from arrag.retrieval.layout import write_json

PlanKind = Literal["build", "add"]
PLAN_KINDS: tuple[PlanKind, ...] = ("build", "add")


@dataclass(frozen=True)
class BuildPlan:
    """What a build or add does.

    Attributes:
        kind: ``build`` (a new database) or ``add`` (images appended to one).
        inputs: what is read, as given.
        spec, index, sources: the database's spec, its index and how the inputs were split into shards.
        preprocessing: how the tokenizer prepares images (recorded in the manifest).
        seed: of the training sample and k-means.
        first_image: the id of the first image read (the database's image count, for an add).
        ivfdata: the file of the on-disk inverted lists the merge writes.
        base_token_shards: the manifest's token shards before an add (``file``, ``first_image``, ``images``).
        shards: what is read, shard by shard.
        ignored: {"path", "reason"}: files in folders not read.
        version: the database format the build makes; a build begun by another arrag is not resumed.
    """

    kind: PlanKind
    inputs: tuple[str, ...]
    spec: DatabaseSpec
    index: IndexConfig
    sources: SourceConfig
    preprocessing: dict
    seed: int
    first_image: int
    ivfdata: str
    base_token_shards: tuple[dict, ...]
    shards: tuple[ShardSpec, ...]
    ignored: tuple[dict[str, str], ...]
    version: int | None = MANIFEST_VERSION  # None: a plan an arrag older than versions wrote

    def __post_init__(self) -> None:
        if self.kind not in PLAN_KINDS:
            raise ValueError(f"a plan's kind is one of {PLAN_KINDS}, got {self.kind!r}")
        if self.first_image < 0:
            raise ValueError(f"first_image must be >= 0, got {self.first_image}")

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "version": self.version,
            "inputs": list(self.inputs),
            "spec": self.spec.to_dict(),
            "index": self.index.to_dict(),
            "sources": asdict(self.sources),
            "preprocessing": self.preprocessing,
            "seed": self.seed,
            "first_image": self.first_image,
            "ivfdata": self.ivfdata,
            "base_token_shards": list(self.base_token_shards),
            "shards": [shard.to_dict() for shard in self.shards],
            "ignored": list(self.ignored),
        }

    @classmethod
    def from_dict(cls, data: dict) -> BuildPlan:
        return cls(
            kind=data["kind"],
            version=data.get("version"),
            inputs=tuple(data["inputs"]),
            spec=DatabaseSpec.from_dict(data["spec"]),
            index=IndexConfig.from_dict(data["index"]),
            sources=SourceConfig(**data["sources"]),
            preprocessing=data["preprocessing"],
            seed=data["seed"],
            first_image=data["first_image"],
            ivfdata=data["ivfdata"],
            base_token_shards=tuple(data["base_token_shards"]),
            shards=tuple(ShardSpec.from_dict(shard) for shard in data["shards"]),
            ignored=tuple(data["ignored"]),
        )

    @classmethod
    def read(cls, path: Path) -> BuildPlan:
        return cls.from_dict(json.loads(path.read_text()))

    def write(self, path: Path) -> None:
        write_json(path, self.to_dict())

    def check_resumes(
        self, kind: PlanKind, inputs: list[str], spec: DatabaseSpec, index: IndexConfig, sources: SourceConfig
    ) -> None:
        """Refuse to resume this plan for other inputs or settings: the result would be neither build."""
        differences = [
            name
            for name, planned, now in (
                ("arrag database format", self.version, MANIFEST_VERSION),  # a build from an older arrag
                ("operation", self.kind, kind),
                ("inputs", self.inputs, tuple(inputs)),
                ("tokenizer, grid or neighbourhood", self.spec, spec),
                ("index", self.index, index),
                ("shard size or Parquet columns", self.sources, sources),
            )
            if planned != now
        ]
        if differences:
            raise ValueError(
                f"the interrupted {self.kind} was started with other {', '.join(differences)}; resume it with the "
                f"same command (inputs: {' '.join(self.inputs)}; index: {self.index.description}; shard size: "
                f"{self.sources.shard_size}) or start again with overwrite=True"
            )
