"""The world's digit classifier as a feature space for image-quality statistics (its penultimate layer).

Two units: ``objects`` embeds every object the checker finds in a scene (:func:`object_features` returns
them all, one row per object; :class:`DigitFeatures` averages them per scene, zeros for an empty scene);
``scene`` embeds the whole scene, its ink shrunk to the classifier's 28×28 input.

Shapes: N scenes of S×S pixels, n objects, 128 features.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arrag.world.checker import CLASSIFIER_SIZE, DigitClassifier, object_crops
from arrag.world.scenes import to_uint8

Unit = Literal["objects", "scene"]
EMBEDDING = 128  # width of the classifier's penultimate layer


@torch.inference_mode()
def object_features(classifier: DigitClassifier, scenes: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """(N, S, S, 3) uint8 -> (n, 128) embeddings of every object in every scene, and (n,) its scene's index."""
    crops = [object_crops(scene) for scene in scenes]
    owners = np.repeat(np.arange(len(scenes)), [len(c) for c in crops])
    stacked = torch.from_numpy(np.concatenate(crops)) if crops else torch.zeros(0, CLASSIFIER_SIZE, CLASSIFIER_SIZE)
    return classifier.eval().embed(stacked[:, None]), owners  # (n, 1, 28, 28) -> (n, 128)


class DigitFeatures(nn.Module):
    """Per-scene features from the digit classifier, for :mod:`arrag.evaluation.quality`."""

    num_features = EMBEDDING

    def __init__(self, classifier: DigitClassifier, unit: Unit = "objects"):
        super().__init__()
        if unit not in ("objects", "scene"):
            raise ValueError(f"unit must be 'objects' or 'scene', got {unit!r}")
        self.classifier, self.unit = classifier.eval(), unit
        self.name = "digit-classifier features, " + ("mean over objects" if unit == "objects" else "whole scene")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [0, 1] -> (N, 128)."""
        if self.unit == "scene":
            ink = images.amax(dim=1, keepdim=True)  # (N, 1, S, S): the checker's intensity
            size = (CLASSIFIER_SIZE, CLASSIFIER_SIZE)
            return self.classifier.embed(F.interpolate(ink, size=size, mode="bilinear", antialias=True))
        embeddings, owners = object_features(self.classifier, to_uint8(images))
        sums = torch.zeros(len(images), EMBEDDING).index_add_(0, torch.from_numpy(owners), embeddings)
        counts = torch.bincount(torch.from_numpy(owners), minlength=len(images)).clamp(min=1)
        return sums / counts[:, None]
