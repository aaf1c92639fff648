"""What the decoding loop needs from an image-token generator, and nothing more.

A backend hides its prompt format, KV cache and classifier-free-guidance batch layout inside a
:class:`Session`; the loop sees one row per image and receives conditional and unconditional logits.
FAiD's needs are a separate, optional protocol (:class:`FaidCapable`): a backend without it still generates,
with or without DAiD.

A backend's ``name`` is its registry name (:func:`arrag.backends.load_backend`): ``kind`` or ``kind:argument``,
such that ``load_backend(backend.name)`` loads the same model. Databases and sidecars store it; it must round-trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from PIL import Image

from arrag.config import SamplingConfig
from arrag.images import Preprocessing
from arrag.retrieval.grid import Grid

if TYPE_CHECKING:
    from arrag.faid.attach import FaidTarget


@dataclass
class StepLogits:
    """Next-token logits of one decoding step."""

    cond: torch.Tensor  # (B, V) prompt-conditioned logits
    uncond: torch.Tensor | None = None  # (B, V) unconditional logits; None when guidance is off


class Session(Protocol):
    """Decoding state of one batch of prompts (KV cache, CFG layout)."""

    def step(self, previous: torch.Tensor | None) -> StepLogits:
        """Feed the tokens sampled at the previous step, (B,) or None at the first step; get the next logits."""
        ...


@runtime_checkable
class Backend(Protocol):
    """A text-to-image generator that emits an R×C grid of VQ tokens in raster order."""

    name: str  # registry name; load_backend(name) loads this model again
    grid: Grid
    codebook_size: int
    cell_dim: int  # size of one codebook vector (and of one encoder latent)
    image_size: int  # pixels per side of a generated or encoded image
    preprocessing: Preprocessing  # how ``preprocess`` resizes, crops and scales an image for the tokenizer
    codebook_fingerprint: str
    device: torch.device
    sampling: SamplingConfig  # how this model is meant to be decoded: its authors' settings, or validation's

    def start(self, prompts: Sequence[str], guidance_scale: float) -> Session: ...

    def teacher_forced_logits(
        self, prompts: Sequence[str], tokens: torch.Tensor, unconditional: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T) tokens -> (B, T, V) next-token logits under teacher forcing; ``unconditional`` (B,) rows get
        guidance's unconditional prompt."""
        ...

    def code_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        """(...) token ids -> (..., d) L2-normalised codebook vectors."""
        ...

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """A PIL image -> (3, H, W) in [-1, 1], resized and centre-cropped as the tokenizer expects
        (``self.preprocessing``)."""
        ...

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, R·C) token ids."""
        ...

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, R·C, d) continuous encoder latents (before quantisation)."""
        ...

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, R·C) token ids -> (N, 3, H, W) images in [0, 1]."""
        ...


@runtime_checkable
class FaidCapable(Protocol):
    """Optional: a backend whose decoder FAiD can attach to.

    FAiD's hooks give retrieved features to the first B rows of every forward of the model, so a session of such
    a backend must put the B conditional rows first (then guidance's unconditional rows).
    """

    def faid_target(self) -> FaidTarget:
        """The decoder layers and image-token paths a FAiD adapter attaches to."""
        ...


@runtime_checkable
class MemoryEstimating(Protocol):
    """Optional: a backend that can say how much memory a session holds, so a batch that cannot fit is refused."""

    def session_bytes(self, rows: int, guidance: bool) -> int:
        """About how many bytes a session of ``rows`` images holds on the backend's device (its KV cache)."""
        ...
