"""The image-level retrieval baseline that AR-RAG argues against.

Before generation, each prompt retrieves the database images whose captions match it best; at every step the
tokens those images hold at the position being generated are the "neighbours", merged into the model's
distribution by DAiD's own merge with the same λ. The retrieval is static: it never looks at what has been
generated, which is the difference the paper's step-wise patch retrieval is about.

Shapes: B rows, M retrieved images per row, T = R·C positions, N database images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer

from arrag.retrieval.neighbours import Neighbours


def rank_by_caption(prompts: Sequence[str], captions: Sequence[str], count: int) -> np.ndarray:
    """Indices of the ``count`` captions most similar to each prompt (TF-IDF cosine; ties by index) -> (B, M)."""
    if not 1 <= count <= len(captions):
        raise ValueError(f"count must be in [1, {len(captions)}] (the number of captions), got {count}")
    # Single characters matter here: digits name the objects.
    vectorizer = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b").fit(captions)
    similarity = (vectorizer.transform(prompts) @ vectorizer.transform(captions).T).toarray()  # (B, N)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :count]


class StaticImageRetriever:
    """A :class:`arrag.decoding.loop.Retriever` whose neighbours at position t are the retrieved images' tokens at t.

    Every retrieved image counts at distance 0, so the retrieved distribution is flat over them.
    """

    def __init__(self, tokens: torch.Tensor, image_ids: torch.Tensor, eligible: Sequence[int]):
        """``tokens`` (B, M, T) of each row's retrieved images, ``image_ids`` (B, M) their database ids."""
        if tokens.ndim != 3 or image_ids.shape != tokens.shape[:2]:
            raise ValueError(
                f"tokens must be (B, M, T) and image_ids (B, M), got {tuple(tokens.shape)}, {tuple(image_ids.shape)}"
            )
        self.tokens, self.image_ids = tokens.long(), image_ids.long()
        self.eligible = set(int(p) for p in eligible)

    def observe(self, position: int, tokens: torch.Tensor) -> None:
        """Static retrieval ignores what has been generated."""

    def search(self, position: int) -> Neighbours:
        tokens = self.tokens[:, :, position]  # (B, M)
        return Neighbours(
            distances=torch.zeros(tokens.shape),
            tokens=tokens,
            image_ids=self.image_ids,
            positions=torch.full(tokens.shape, position),
            valid=torch.ones(tokens.shape, dtype=torch.bool),
        )
