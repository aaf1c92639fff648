"""A text-conditioned decoder-only transformer over image tokens, in the LlamaGen style.

The sequence is ``[caption bytes (padded to a fixed length)] [begin-of-image] [image tokens]``; the hidden
state at the begin-of-image position predicts the first image token. Pre-norm blocks with RMSNorm and a
SwiGLU MLP, learned absolute positions, and a preallocated KV cache for decoding.

Shapes: B batch, S sequence, D model width, H heads, E head size, V image codebook size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

PAD_ID = 256  # caption bytes are 0..255
BOI_ID = 257
TEXT_VOCAB = 258


@dataclass(frozen=True)
class TransformerConfig:
    codebook_size: int
    image_tokens: int  # R·C
    max_text_len: int = 64
    width: int = 256
    layers: int = 6
    heads: int = 8
    mlp_ratio: float = 8 / 3

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")

    @property
    def max_len(self) -> int:
        return self.max_text_len + self.image_tokens  # the last image token is never an input

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def encode_captions(captions: list[str], max_len: int) -> torch.Tensor:
    """UTF-8 bytes, right-padded with PAD and followed by BOI -> (B, max_len + 1) ids."""
    rows = []
    for caption in captions:
        data = list(caption.encode("utf-8"))
        if len(data) > max_len:
            raise ValueError(f"caption is {len(data)} bytes, this model reads at most {max_len}: {caption!r}")
        rows.append([*data, *[PAD_ID] * (max_len - len(data)), BOI_ID])
    return torch.tensor(rows, dtype=torch.long)


def unconditional_captions(batch: int, max_len: int) -> torch.Tensor:
    """The empty caption that classifier-free guidance contrasts with -> (B, max_len + 1)."""
    return encode_captions([""] * batch, max_len)


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class KVCache:
    """Preallocated keys and values of every layer; ``length`` positions are filled."""

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int, like: torch.Tensor):
        shape = (batch, heads, max_len, head_dim)
        self.keys = [like.new_zeros(shape) for _ in range(layers)]
        self.values = [like.new_zeros(shape) for _ in range(layers)]
        self.length = 0


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=False)
        self.out = nn.Linear(config.width, config.width, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, S, E)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            start = cache.length
            cache.keys[layer][:, :, start : start + s] = k
            cache.values[layer][:, :, start : start + s] = v
            k = cache.keys[layer][:, :, : start + s]  # (B, H, start+S, E)
            v = cache.values[layer][:, :, : start + s]
            if start == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif s == 1:  # one new position attends to everything cached
                y = F.scaled_dot_product_attention(q, k, v)
            else:
                raise ValueError("a cached forward takes a prompt on an empty cache, then one position at a time")
        return self.out(y.transpose(1, 2).reshape(b, s, d))  # (B, S, D)


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        hidden = int(config.width * config.mlp_ratio)
        self.gate = nn.Linear(config.width, hidden, bias=False)
        self.up = nn.Linear(config.width, hidden, bias=False)
        self.down = nn.Linear(hidden, config.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.width)
        self.attention = Attention(config)
        self.mlp_norm = RMSNorm(config.width)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class ImageTransformer(nn.Module):
    """Caption prefix -> logits over the next image token at every position."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.text_embedding = nn.Embedding(TEXT_VOCAB, config.width)
        self.image_embedding = nn.Embedding(config.codebook_size, config.width)
        self.position_embedding = nn.Embedding(config.max_len, config.width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.width)
        self.head = nn.Linear(config.width, config.codebook_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def new_cache(self, batch: int) -> KVCache:
        c = self.config
        like = self.head.weight
        return KVCache(c.layers, batch, c.heads, c.max_len, c.width // c.heads, like)

    def forward(
        self, text_ids: torch.Tensor | None, image_ids: torch.Tensor | None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Logits for the image token after each input position.

        Args:
            text_ids: (B, L+1) captions with BOI (see :func:`encode_captions`), or None after the prefill.
            image_ids: (B, T) image tokens that follow, or None.
            cache: decode incrementally when given; None runs the whole sequence (training, reference).

        Returns:
            (B, S, V) logits, S = number of input positions.
        """
        parts = []
        if text_ids is not None:
            parts.append(self.text_embedding(text_ids))  # (B, L+1, D)
        if image_ids is not None:
            parts.append(self.image_embedding(image_ids))  # (B, T, D)
        x = torch.cat(parts, dim=1)  # (B, S, D)
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        x = x + self.position_embedding(positions)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += x.shape[1]
        return self.head(self.norm(x))  # (B, S, V)
