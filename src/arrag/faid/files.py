"""A trained FAiD adapter on disk: ``model.safetensors`` (trainable parts only) and ``config.json``.

The config records the adapter's :class:`FaidConfig`, the command that trained it and a fingerprint of the
base model's weights, so an adapter is never loaded onto a model it was not trained for.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from arrag.faid.attach import build_adapter
from arrag.faid.blender import FaidAdapter, FaidConfig
from arrag.training import CONFIG_FILE, WEIGHTS_FILE

BUILTIN_FAID_DIR = Path(__file__).resolve().parent.parent / "assets" / "builtin" / "faid"


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's float32 weights and their names."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return f"sha256:{digest.hexdigest()[:16]}"


def load_adapter(directory: str | Path, backend) -> FaidAdapter:
    """The adapter saved in ``directory`` (by ``arrag train faid``), checked against ``backend``'s weights."""
    directory = Path(directory)
    if not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{directory} holds no FAiD adapter ({WEIGHTS_FILE}); train one with arrag train faid")
    description = json.loads((directory / CONFIG_FILE).read_text())
    target = backend.faid_target()
    expected, found = description["base_fingerprint"], model_fingerprint(target.model)
    if expected != found:
        raise ValueError(
            f"the FAiD adapter in {directory} was trained on {description.get('backend')!r} with weights {expected}, "
            f"but backend {backend.name!r} has weights {found}"
        )
    adapter = build_adapter(FaidConfig.from_dict(description["faid"]), target)
    adapter.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return adapter.to(next(target.model.parameters()).device).eval()


def shipped_adapter(backend) -> FaidAdapter | None:
    """The FAiD adapter shipped for the built-in model, or None if this install has none."""
    if backend.name != "builtin" or not (BUILTIN_FAID_DIR / WEIGHTS_FILE).is_file():
        return None
    with torch.no_grad():
        return load_adapter(BUILTIN_FAID_DIR, backend)
