"""Over-copying: how often a generated image nearly duplicates a database image.

Distances are squared pixel differences relative to the two images' energies, ``‖x − y‖² / (‖x‖² + ‖y‖²)``
in [0, 2] (RGB in [0, 1] on a black background): 0 for a copy, 1 when the drawings do not overlap at all. A
plain mean squared difference would call a nearly blank image a copy of any sparse database image. They
are measured between decoded images: generated images and the database images' tokenizer reconstructions,
so that a token-for-token copy is at distance 0 rather than at the tokenizer's reconstruction error.

The threshold is calibrated on real images that cannot be copies: held-out scenes drawn from glyphs that are
not in the database. A generated image is a near-copy when it is closer to its nearest database image than
all but ``false_positive_rate`` of those real scenes are to theirs, so a generator that produced new real
scenes would be flagged at that rate and no more.

Shapes: N query images, M database images, P = 3·H·W pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def nearest_database_image(
    images: torch.Tensor, database: torch.Tensor, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Each image's nearest database image: ((N,) relative squared difference, (N,) database index).

    Args:
        images: (N, 3, H, W) in [0, 1].
        database: (M, 3, H, W) in [0, 1].
    """
    flat_db = database.flatten(1).double()  # (M, P)
    db_energy = flat_db.pow(2).sum(1)  # (M,)
    distances, indices = [], []
    for start in range(0, len(images), chunk):
        flat = images[start : start + chunk].flatten(1).double()  # (n, P)
        energy = flat.pow(2).sum(1, keepdim=True) + db_energy  # (n, M)
        relative = 1 - 2 * (flat @ flat_db.T) / energy.clamp_min(1e-12)  # (n, M)
        best = relative.min(dim=1)
        distances.append(best.values.clamp_min(0).numpy())
        indices.append(best.indices.numpy())
    return np.concatenate(distances), np.concatenate(indices)


@dataclass(frozen=True)
class CopyThreshold:
    distance: float  # relative squared difference at or below which an image counts as a near-copy
    false_positive_rate: float
    calibration_images: int

    @classmethod
    def calibrate(cls, real_distances: np.ndarray, false_positive_rate: float = 0.01) -> CopyThreshold:
        """The ``false_positive_rate`` quantile of real novel images' nearest-database distances."""
        if not 0 < false_positive_rate < 1:
            raise ValueError(f"false_positive_rate must be in (0, 1), got {false_positive_rate}")
        if len(real_distances) * false_positive_rate < 1:
            raise ValueError(
                f"{len(real_distances)} calibration images cannot resolve a {false_positive_rate} rate; use more"
            )
        distance = float(np.quantile(real_distances, false_positive_rate, method="lower"))
        return cls(distance, false_positive_rate, len(real_distances))

    def copy_rate(self, distances: np.ndarray) -> float:
        return float(np.mean(np.asarray(distances) <= self.distance))
