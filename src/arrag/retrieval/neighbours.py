"""What a search returns: the K nearest entries of each query, with their next tokens and provenance."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Neighbours:
    """Search results; entries with ``valid`` False are padding (fewer than K entries in the database)."""

    distances: torch.Tensor  # (B, K) float32 squared L2, +inf where not valid
    tokens: torch.Tensor  # (B, K) int64 token that followed the neighbour, 0 where not valid
    image_ids: torch.Tensor  # (B, K) int64 database image id, -1 where not valid
    positions: torch.Tensor  # (B, K) int64 raster position in that image, -1 where not valid
    valid: torch.Tensor  # (B, K) bool
