"""Image quality offline: Fréchet distance and KID between two image sets, in a feature space of our choosing.

"FID" is the Fréchet distance in Inception-v3's pool features; its weights need a download. The same
statistics in another network's features are different numbers on a different scale, so they are named
for their features here: "Fréchet distance (EfficientNet-Lite0 features)", never "FID". Both statistics
are torchmetrics' (:class:`~torchmetrics.image.fid.FrechetInceptionDistance`,
:class:`~torchmetrics.image.kid.KernelInceptionDistance`), fed features extracted once per image set.

A feature extractor is an ``nn.Module`` with ``name: str`` and ``num_features: int`` that maps images
(N, 3, H, W) float in [0, 1] to (N, D) features.

Shapes: N real images, M generated images, D features.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from arrag.models.efficientnet_lite import FEATURES, load_efficientnet_lite0, normalise

Images = torch.Tensor | np.ndarray


def as_float_images(images: Images) -> torch.Tensor:
    """Images -> (N, 3, H, W) float32 in [0, 1].

    Accepts a tensor (N, 3, H, W), uint8 or float in [0, 1], or a numpy array (N, H, W, 3) uint8 (the
    channels-last layout of PIL and the world's scenes).
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"numpy images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"image tensors must be (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise ValueError(f"image tensors must be uint8 or float in [0, 1], got {images.dtype}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError("float images must lie in [0, 1]")
    return images.float()


class FeaturesUnavailableError(ValueError):
    """A feature network or the metrics cannot be loaded here; the message says how to provide them."""


def _metrics() -> tuple[type, type]:
    """torchmetrics' FrechetInceptionDistance and KernelInceptionDistance classes."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except (ImportError, RuntimeError) as error:  # RuntimeError: torch-fidelity with a torchvision that fails
        raise FeaturesUnavailableError(
            f"torchmetrics' image metrics do not import ({error}): pip install 'arrag[eval]'; if torch-fidelity "
            "is installed, its torchvision must import too (or uninstall torch-fidelity)"
        ) from error
    return FrechetInceptionDistance, KernelInceptionDistance


class EfficientNetLite0Features(nn.Module):
    """ImageNet features of EfficientNet-Lite0: the 1280 pooled activations before its classifier."""

    name = "EfficientNet-Lite0 features"
    num_features = FEATURES

    def __init__(self) -> None:
        super().__init__()
        self.network = load_efficientnet_lite0()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network.pooled_features(normalise(images))  # (N, 3, H, W) in [0, 1] -> (N, 1280)


@dataclass(frozen=True)
class QualityConfig:
    """``kid_subset_size`` is capped by half the smaller set; ``seed`` fixes KID's subset draws."""

    batch_size: int = 64
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    kid_degree: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "kid_subsets", "kid_subset_size", "kid_degree"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@torch.inference_mode()
def extract_features(extractor: nn.Module, images: Images, batch_size: int = 64) -> torch.Tensor:
    """Images -> (N, D) float64 features, batch by batch, the extractor in evaluation mode."""
    pixels = as_float_images(images)
    extractor.eval()
    parts = [extractor(pixels[i : i + batch_size]).double().cpu() for i in range(0, len(pixels), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, extractor.num_features, dtype=torch.float64)


class _Given(nn.Module):
    """The identity: lets torchmetrics' statistics take features that were extracted beforehand."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check_pair(real: torch.Tensor, generated: torch.Tensor, least: int) -> None:
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {tuple(real.shape)} and {tuple(generated.shape)}")
    if min(len(real), len(generated)) < least:
        raise ValueError(f"each set needs at least {least} images, got {len(real)} and {len(generated)}")


def frechet_distance(real: torch.Tensor, generated: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to (N, D) and (M, D) features."""
    _check_pair(real, generated, 2)
    FrechetInceptionDistance, _ = _metrics()
    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(generated.double(), real=False)
    return float(metric.compute())


def kernel_distance(
    real: torch.Tensor,
    generated: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    seed: int = 0,
) -> tuple[float, float, int]:
    """KID: the polynomial-kernel MMD² averaged over random subsets -> (mean, std, subset size used)."""
    _check_pair(real, generated, 2)
    _, KernelInceptionDistance = _metrics()
    # Subsets of at most half of each set, so that they differ and the spread over them means something.
    size = max(2, min(subset_size, len(real) // 2, len(generated) // 2))
    with warnings.catch_warnings():  # that it keeps every feature: so does the caller
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        metric = KernelInceptionDistance(
            feature=_Given(real.shape[1]), subsets=subsets, subset_size=size, degree=degree
        )
    metric.update(real.double(), real=True)
    metric.update(generated.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


@dataclass(frozen=True)
class Quality:
    """Distances between a real and a generated image set in one feature space."""

    features: str
    frechet_distance: float
    kid: float
    kid_std: float
    kid_subset_size: int
    real_images: int
    generated_images: int

    def named(self) -> dict[str, float]:
        """The numbers under names that say what they are, for tables."""
        return {
            f"Fréchet distance ({self.features})": self.frechet_distance,
            f"KID ({self.features})": self.kid,
            f"KID std ({self.features})": self.kid_std,
        }

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def quality_from_features(
    real: torch.Tensor, generated: torch.Tensor, features: str, config: QualityConfig = QualityConfig()
) -> Quality:
    """Both distances between already extracted (N, D) and (M, D) features."""
    kid, kid_std, size = kernel_distance(
        real, generated, config.kid_subsets, config.kid_subset_size, config.kid_degree, config.seed
    )
    return Quality(features, frechet_distance(real, generated), kid, kid_std, size, len(real), len(generated))


def compare(real: Images, generated: Images, extractor: nn.Module, config: QualityConfig = QualityConfig()) -> Quality:
    """Fréchet distance and KID between two image sets in ``extractor``'s feature space."""
    return quality_from_features(
        extract_features(extractor, real, config.batch_size),
        extract_features(extractor, generated, config.batch_size),
        extractor.name,
        config,
    )


class ImageQuality:
    """``quality(real, generated) -> {name: value}`` in several feature spaces at once.

    The real set's features are kept, keyed by the images' bytes, so comparing several generated sets with
    the same real set extracts the real features once per feature space.
    """

    def __init__(self, extractors: Sequence[nn.Module], config: QualityConfig = QualityConfig()):
        if not extractors:
            raise ValueError("give at least one feature extractor")
        self.extractors, self.config = list(extractors), config
        self._real: dict[tuple[str, int], torch.Tensor] = {}

    def _real_features(self, index: int, images: Images) -> torch.Tensor:
        pixels = as_float_images(images)
        key = (hashlib.sha1(pixels.numpy().tobytes()).hexdigest(), index)
        if key not in self._real:
            self._real = {k: v for k, v in self._real.items() if k[0] == key[0]}  # keep one real set
            self._real[key] = extract_features(self.extractors[index], pixels, self.config.batch_size)
        return self._real[key]

    def __call__(self, real: Images, generated: Images) -> dict[str, float]:
        named: dict[str, float] = {}
        for index, extractor in enumerate(self.extractors):
            generated_features = extract_features(extractor, generated, self.config.batch_size)
            quality = quality_from_features(
                self._real_features(index, real), generated_features, extractor.name, self.config
            )
            named |= quality.named()
        return named
