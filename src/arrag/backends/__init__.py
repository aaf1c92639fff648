"""Image-token generators behind one protocol; :func:`load_backend` picks one by name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from arrag.backends.base import Backend, Session, StepLogits

__all__ = ["Backend", "BackendRef", "Session", "StepLogits", "load_backend"]


def load_backend(name: str, device: str | torch.device = "cpu", dtype: str = "float32") -> Backend:
    """A backend by name.

    ``builtin`` is the shipped model of the built-in world; ``builtin:DIR`` one trained into DIR
    (``DIR/tokenizer``, ``DIR/generator``); ``tiny`` / ``tiny-SEED`` a small random model for tests; anything
    else is a Janus / Janus-Pro checkpoint: a hub id (``deepseek-community/Janus-Pro-1B``) or a local folder.
    """
    from arrag.backends import builtin

    match = re.fullmatch(r"tiny(?:-(\d+))?", name)
    if (match or name == "builtin" or name.startswith("builtin:")) and dtype != "float32":
        raise ValueError(f"the {name} backend runs in float32; --dtype is for Janus checkpoints")
    if match:
        return builtin.tiny_backend(int(match.group(1) or 0), device)
    if name == "builtin":
        return builtin.builtin_backend(device=device)
    if name.startswith("builtin:"):
        return builtin.builtin_backend(Path(name.removeprefix("builtin:")), device)
    if "/" in name or Path(name).exists():
        from arrag.backends.janus import load_janus

        return load_janus(name, str(device), dtype)
    raise ValueError(
        f"unknown backend {name!r}; available: builtin, builtin:DIR, tiny, tiny-SEED, or a Janus-Pro hub id or folder"
    )


@dataclass(frozen=True)
class BackendRef:
    """A backend by name, loaded where it is used: in each worker of a distributed database build."""

    name: str
    device: str = "cpu"
    dtype: str = "float32"

    def load(self, device: str | None = None) -> Backend:
        """The backend, on ``device`` if given (a worker's accelerator), else on ``self.device``."""
        return load_backend(self.name, device or self.device, self.dtype)
