"""Image-token generators behind one protocol; :func:`load_backend` picks one by name."""

from __future__ import annotations

import re

import torch

from arrag.backends.base import Backend, Session, StepLogits

__all__ = ["Backend", "Session", "StepLogits", "load_backend"]


def load_backend(name: str, device: str | torch.device = "cpu") -> Backend:
    """A backend by name: ``tiny`` or ``tiny-SEED`` (a small random model for tests and quick checks)."""
    match = re.fullmatch(r"tiny(?:-(\d+))?", name)
    if match:
        from arrag.backends.builtin import tiny_backend

        return tiny_backend(int(match.group(1) or 0), device)
    raise ValueError(f"unknown backend {name!r}; available: tiny, tiny-SEED")
