"""Image-token generators behind one protocol, loaded by name from a registry of backend kinds.

A name is ``kind`` or ``kind:argument``: ``builtin`` (the shipped model), ``builtin:DIR`` (one trained into DIR),
``tiny:SEED`` (a small random model for tests), ``janus:ID`` (a Janus-Pro hub id or local folder). A backend's
``name`` is the name that loads it again. Older names still load: ``tiny``, ``tiny-SEED``, a bare hub id or folder.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from arrag.backends.base import Backend, FaidCapable, Session, StepLogits

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendRef",
    "FaidCapable",
    "Session",
    "StepLogits",
    "load_backend",
    "parse_name",
    "usable_device",
]

BackendFactory = Callable[[str, torch.device, str], Backend]  # (argument, device, dtype) -> backend


def _builtin(argument: str, device: torch.device, dtype: str) -> Backend:
    from arrag.backends import builtin

    _check_float32("builtin", dtype)
    return builtin.builtin_backend(Path(argument), device) if argument else builtin.builtin_backend(device=device)


def _tiny(argument: str, device: torch.device, dtype: str) -> Backend:
    from arrag.backends import builtin

    _check_float32("tiny", dtype)
    if argument and not argument.isdigit():
        raise ValueError(f"a tiny backend is named tiny:SEED with a whole number SEED, got tiny:{argument}")
    return builtin.tiny_backend(int(argument or 0), device)


def _janus(argument: str, device: torch.device, dtype: str) -> Backend:
    if not argument:
        raise ValueError("a Janus backend is named janus:ID, with a hub id or a local folder")
    try:
        from arrag.backends.janus import load_janus
    except ImportError as error:
        raise ValueError(
            f'the Janus backend needs {error.name or "transformers"}: pip install "arrag[janus]"'
        ) from None

    return load_janus(argument, str(device), dtype)


def _check_float32(kind: str, dtype: str) -> None:
    if dtype != "float32":
        raise ValueError(f"the {kind} backend runs in float32; the dtype option is for Janus checkpoints")


BACKENDS: dict[str, BackendFactory] = {"builtin": _builtin, "tiny": _tiny, "janus": _janus}


def parse_name(name: str) -> tuple[str, str]:
    """A backend name -> (kind, argument), old spellings included."""
    kind, colon, argument = name.partition(":")
    if kind in BACKENDS and (colon or not argument):
        return kind, argument
    legacy_tiny = re.fullmatch(r"tiny-(\d+)", name)
    if legacy_tiny:
        return "tiny", legacy_tiny.group(1)
    if "/" in name or Path(name).exists():  # a hub id (owner/model) or a local folder: Janus
        return "janus", name
    kinds = ", ".join(f"{kind}[:ARGUMENT]" for kind in BACKENDS)
    raise ValueError(
        f"unknown backend {name!r}; available: {kinds} (builtin, builtin:DIR, tiny:SEED, janus:HUB_ID or janus:DIR)"
    )


def load_backend(name: str, device: str | torch.device = "cpu", dtype: str = "float32") -> Backend:
    """The backend a name stands for (see the module docstring), on ``device``; ``dtype`` is for Janus weights."""
    kind, argument = parse_name(name)
    return BACKENDS[kind](argument, usable_device(device), dtype)


def usable_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device, or ValueError saying why this torch cannot run on it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{device!r} is not a device torch knows (cpu, cuda, cuda:1, mps): {error}") from None
    backends = {"cuda": torch.cuda, "mps": torch.backends.mps}
    if device.type in backends and not backends[device.type].is_available():
        raise ValueError(f"device {str(device)!r} is not available to this torch ({torch.__version__}); use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


@dataclass(frozen=True)
class BackendRef:
    """A backend by name, loaded where it is used: in each worker of a distributed database build."""

    name: str
    device: str = "cpu"
    dtype: str = "float32"

    def load(self, device: str | None = None) -> Backend:
        """The backend, on ``device`` if given (a worker's accelerator), else on ``self.device``."""
        return load_backend(self.name, device or self.device, self.dtype)
