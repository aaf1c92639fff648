"""A VQ autoencoder in the LlamaGen / Janus style: conv encoder, L2-normalised codebook, conv decoder.

Each halving of resolution is one down block, so ``len(channels) - 1`` halvings turn an S×S image into an
(S / 2^(len(channels) - 1))² grid of tokens. Quantisation is the nearest code by cosine similarity
(the argmin of L2 distance between L2-normalised vectors), as in LlamaGen and the original Janus.

Shapes: N images, C channels, h×w latent grid, d code size, V codebook size.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 512
    code_dim: int = 8
    channels: tuple[int, ...] = (64, 128, 128)  # one entry per resolution; len - 1 downsamplings
    image_size: int = 64

    def __post_init__(self) -> None:
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not divisible by the downsampling {self.downsample}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(min(32, channels // 4), channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(min(32, channels // 4), channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        ch = config.channels
        encoder: list[nn.Module] = [nn.Conv2d(3, ch[0], 3, padding=1)]
        for c_in, c_out in itertools.pairwise(ch):
            encoder += [ResBlock(c_in), nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)]
        encoder += [ResBlock(ch[-1]), nn.GroupNorm(min(32, ch[-1] // 4), ch[-1]), nn.SiLU()]
        encoder += [nn.Conv2d(ch[-1], config.code_dim, 1)]
        self.encoder = nn.Sequential(*encoder)

        decoder: list[nn.Module] = [nn.Conv2d(config.code_dim, ch[-1], 3, padding=1), ResBlock(ch[-1])]
        for c_in, c_out in zip(ch[:0:-1], ch[-2::-1], strict=True):
            decoder += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1)]
            decoder += [ResBlock(c_out)]
        decoder += [nn.GroupNorm(min(32, ch[0] // 4), ch[0]), nn.SiLU(), nn.Conv2d(ch[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*decoder)

        self.codebook = nn.Embedding(config.codebook_size, config.code_dim)
        nn.init.normal_(self.codebook.weight)

    def normalised_codebook(self) -> torch.Tensor:
        return F.normalize(self.codebook.weight, dim=-1)  # (V, d)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [-1, 1] -> (N, h·w, d) L2-normalised continuous latents, raster order."""
        z = self.encoder(images)  # (N, d, h, w)
        return F.normalize(z.flatten(2).transpose(1, 2), dim=-1)  # (N, h·w, d)

    def quantize(self, latents: torch.Tensor) -> torch.Tensor:
        """(..., d) normalised latents -> (...) ids of the nearest normalised codes."""
        with torch.autocast(latents.device.type, enabled=False):  # a bf16 argmax would pick wrong codes
            similarity = latents.float() @ self.normalised_codebook().float().T  # (..., V)
        return similarity.argmax(dim=-1)

    def decode_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, h·w) ids -> (N, 3, S, S) in [-1, 1] (unclamped)."""
        n, side = ids.shape[0], self.config.grid_size
        z = self.normalised_codebook()[ids]  # (N, h·w, d)
        return self.decoder(z.transpose(1, 2).reshape(n, -1, side, side))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction with a straight-through quantiser: (recon, latents, quantised latents)."""
        z = self.latents(images)  # (N, h·w, d)
        q = self.normalised_codebook()[self.quantize(z)]  # (N, h·w, d)
        z_st = z + (q - z).detach()
        n, side = images.shape[0], self.config.grid_size
        recon = self.decoder(z_st.transpose(1, 2).reshape(n, -1, side, side))
        return recon, z, q
