"""Build engines: run one stage (:mod:`arrag.build.stages`) over many shards, here or on Ray Data.

A stage is a picklable object with ``name``, ``gpu`` (whether it wants an accelerator where there is one),
``setup(device) -> context`` — what a worker loads once per stage — and ``__call__(context, task) -> result``, both
tasks and results being JSON-able dicts. Both engines call the very same stage objects; they differ only in
where and how many at a time.
"""

from __future__ import annotations

import json
import logging
import socket
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

logger = logging.getLogger(__name__)

EngineName = Literal["local", "ray"]
ENGINES: tuple[EngineName, ...] = ("local", "ray")


class Stage(Protocol):
    name: str
    gpu: bool

    def setup(self, device: str | None) -> Any: ...

    def __call__(self, context: Any, task: dict) -> dict: ...


class LocalEngine:
    """Runs the tasks one after another in this process; needs nothing but arrag."""

    name = "local"

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def run(self, stage: Stage, tasks: Sequence[dict]) -> Iterator[dict]:
        """Results in task order, each as soon as it is done."""
        if not tasks:
            return
        context = stage.setup(None)
        for task in tasks:
            yield stage(context, task)


_CONTEXTS: dict[str, Any] = {}  # in a Ray worker process: the set-up context of the stage run it last served


def _run_batch(batch: dict[str, np.ndarray], stage: Stage, run: str, device: str | None) -> dict[str, np.ndarray]:
    """A Ray Data task: run ``stage`` on a batch of tasks, setting it up once per worker process and run."""
    if run not in _CONTEXTS:
        _CONTEXTS.clear()  # a finished stage's context (a tokenizer, say) is not needed any more
        _CONTEXTS[run] = stage.setup(device)
    results = [json.dumps(stage(_CONTEXTS[run], json.loads(task))) for task in batch["task"]]
    return {"result": np.array(results, dtype=object)}


@dataclass
class RayEngine:
    """Runs the tasks on Ray Data, one shard per Ray task, results streamed back as they finish.

    Ray tasks rather than an actor pool per stage: worker processes outlive a stage, so the second stage
    does not wait for new processes to start and import torch and FAISS; each process sets a stage up
    (loads the tokenizer, reads the trained index) once, on its first task of that stage.

    Without ``address`` it starts Ray inside this process (``ray.init``) for the machine's cores and stops it
    on exit; with an address (``HOST:PORT`` or ``auto``) it joins that cluster, whose workers must have arrag
    installed and see the database folder at the same path (a shared file system). Stages that want an
    accelerator get one GPU per actor where the cluster has GPUs.
    """

    address: str | None = None
    num_cpus: int | None = None
    object_store_memory: int | None = None
    name: str = "ray"

    def __post_init__(self) -> None:
        self._started = False

    def __enter__(self) -> RayEngine:
        import ray

        if not ray.is_initialized():
            if self.address is not None:
                _check_reachable(self.address)
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=self.num_cpus,
                    object_store_memory=self.object_store_memory,
                    include_dashboard=False,
                    log_to_driver=False,
                )
            self._started = True
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the build shows its own, per stage
        context.print_on_execution_start = False
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        if self._started:
            ray.shutdown()
            self._started = False

    def run(self, stage: Stage, tasks: Sequence[dict]) -> Iterator[dict]:
        """Results in completion order."""
        if not tasks:
            return
        import ray

        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if stage.gpu else 0
        workers = gpus or max(1, min(int(resources.get("CPU", 1)), len(tasks)))
        dataset = ray.data.from_items([{"task": json.dumps(task)} for task in tasks], override_num_blocks=len(tasks))
        dataset = dataset.map_batches(
            _run_batch,
            fn_args=(stage, uuid.uuid4().hex, "cuda" if gpus else None),
            batch_size=1,
            concurrency=workers,
            num_gpus=1 if gpus else 0,
            num_cpus=1,
        )
        logger.info("%s: %d tasks on %d Ray workers (%s)", stage.name, len(tasks), workers, "GPU" if gpus else "CPU")
        for row in dataset.iter_rows():
            yield json.loads(row["result"])


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a ``HOST:PORT`` where nothing listens: ``ray.init`` would retry for minutes."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():  # "auto", "ray://...": Ray resolves those itself
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise ValueError(
            f"no Ray cluster answers at {address} ({error}); start one there with `ray start --head` or check address"
        ) from None


def make_engine(name: EngineName, address: str | None = None) -> LocalEngine | RayEngine:
    """``local`` or ``ray`` (an embedded Ray, or the cluster at ``address``)."""
    if name == "local":
        if address is not None:
            raise ValueError("address is for the ray engine")
        return LocalEngine()
    if name == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as error:
            raise ValueError('the ray engine needs Ray Data: pip install "arrag[scale]"') from error
        return RayEngine(address=address)
    raise ValueError(f"engine must be one of {ENGINES}, got {name!r}")
