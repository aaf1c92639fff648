"""FAiD's blender: smooth retrieved patch features over their causal context and gate them.

For a target grid cell t and each of its K retrieved candidates, the paper's blender takes the (2h+1)×(2h+1)
window of a decoder layer's normalised hidden states around t (hop h), zeroes every cell at or after t in
raster order, puts the candidate's feature in the centre and reduces the window to one vector with two stacked
``Conv2d(D, D, h+1)`` (no nonlinearity between them); hops are fused with learned softmax weights, and each
candidate is gated by ``sigmoid(Linear(D,1)(ReLU(Linear(D,D)(x_k))))``.

Two linear convolutions in a row are one linear map of the window, so :meth:`Blender.kernels` composes them
into one D×D matrix per causal window cell, one for the centre and one bias; then a candidate costs one D×D
product for its centre instead of two convolutions over the whole window, and the context part is shared by
the K candidates. The parameters stay the two stacked convolutions of the paper.

Shapes: N rows, P target positions, K candidates, n causal window cells, D width.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from arrag.models.transformer import RMSNorm
from arrag.retrieval.grid import Neighbourhood


@dataclass(frozen=True)
class FaidConfig:
    """A FAiD adapter: blenders in ``blenders`` evenly spaced layers, ``k`` candidates per position.

    ``lora_rank`` > 0 adds LoRA (peft) on the backend's attention projections; ``train_head`` fine-tunes a copy
    of the image-token output head. The paper: hops (1, 2), 2 blenders, k = 10, LoRA r 128 / α 256, head trained.
    """

    hops: tuple[int, ...] = (1, 2)
    blenders: int = 2
    k: int = 10
    lora_rank: int = 0
    lora_alpha: float | None = None  # None: 2 × rank, as the paper (128 / 256)
    lora_dropout: float = 0.05
    train_head: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "hops", tuple(self.hops))
        if not self.hops or any(h < 1 for h in self.hops) or len(set(self.hops)) != len(self.hops):
            raise ValueError(f"hops must be distinct integers >= 1, got {self.hops}")
        if self.blenders < 1:
            raise ValueError(f"blenders (b) must be >= 1, got {self.blenders}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.lora_rank < 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError(
                f"lora_rank must be >= 0 and lora_dropout in [0, 1), got {self.lora_rank}, {self.lora_dropout}"
            )

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    def layers(self, depth: int) -> list[int]:
        """The b evenly spaced decoder layers of a ``depth``-layer model that get a blender (b=2, 24 -> 0, 12)."""
        if self.blenders > depth:
            raise ValueError(f"{self.blenders} blenders do not fit in {depth} layers")
        return [i * (depth // self.blenders) for i in range(self.blenders)]

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "hops": list(self.hops)}

    @classmethod
    def from_dict(cls, data: dict) -> FaidConfig:
        return cls(**{**data, "hops": tuple(data["hops"])})


@dataclass
class BlenderKernels:
    """The blender's stacked convolutions and hop fusion as one affine map of the window."""

    context: torch.Tensor  # (n·D_in, D_out) weights of the causal window cells, stacked in window order
    centre: torch.Tensor  # (D_in, D_out) weight of the centre cell (the candidate's feature)
    bias: torch.Tensor  # (D_out,)


def compose_convolutions(second: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """The kernel of ``conv(conv(x, first), second)``, both unpadded and of stride 1.

    Args:
        second: (O, M, s, s) weight applied second.
        first: (M, C, s, s) weight applied first.

    Returns:
        (O, C, 2s−1, 2s−1): the one convolution kernel equal to the two.
    """
    s = first.shape[-1]
    total = 0
    for a in range(s):
        for b in range(s):
            shifted = torch.einsum("om,mcij->ocij", second[:, :, a, b], first)  # (O, C, s, s)
            total = total + F.pad(shifted, (b, s - 1 - b, a, s - 1 - a))
    return total  # (O, C, 2s-1, 2s-1)


class Blender(nn.Module):
    """One blender: hop convolutions, softmax hop fusion and the compatibility gate."""

    def __init__(self, width: int, hops: Sequence[int]):
        super().__init__()
        self.hops = tuple(hops)
        self.norm = RMSNorm(width)  # the paper's retrieval_layernorm on incoming candidate features
        self.first = nn.ModuleList(nn.Conv2d(width, width, h + 1) for h in self.hops)
        self.second = nn.ModuleList(nn.Conv2d(width, width, h + 1) for h in self.hops)
        self.hop_logits = nn.Parameter(torch.zeros(len(self.hops)))  # equal weights at the start
        self.gate = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))
        # Zero second convolutions make the blender add nothing at the start, so fine-tuning starts from the base
        # model's loss instead of a randomly perturbed one; they get gradients from the first ones' outputs.
        for conv in self.second:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    @property
    def offsets(self) -> tuple[tuple[int, int], ...]:
        """(row, col) offsets of the causal window cells of the largest hop, in raster order."""
        return Neighbourhood(hops=max(self.hops)).offsets

    def kernels(self) -> BlenderKernels:
        """Compose each hop's two convolutions and fuse the hops (differentiable in the parameters)."""
        weights = torch.softmax(self.hop_logits, dim=0)  # (hops,)
        width = self.gate[0].in_features
        offsets = self.offsets
        context = [self.hop_logits.new_zeros(width, width) for _ in offsets]
        centre = self.hop_logits.new_zeros(width, width)
        bias = self.hop_logits.new_zeros(width)
        for weight, h, first, second in zip(weights, self.hops, self.first, self.second, strict=True):
            kernel = compose_convolutions(second.weight, first.weight)  # (D, D, 2h+1, 2h+1)
            for i, (dr, dc) in enumerate(offsets):
                if abs(dr) <= h and abs(dc) <= h:
                    context[i] = context[i] + weight * kernel[:, :, dr + h, dc + h]
            centre = centre + weight * kernel[:, :, h, h]
            # The first bias reaches every output of the first conv, hence every tap of the second.
            bias = bias + weight * (second.bias + torch.einsum("omab,m->o", second.weight, first.bias))
        stacked = torch.stack(context)  # (n, D_out, D_in)
        return BlenderKernels(
            context=stacked.transpose(1, 2).reshape(-1, width),  # (n·D_in, D_out)
            centre=centre.T,  # (D_in, D_out)
            bias=bias,
        )

    def forward(
        self, kernels: BlenderKernels, window: torch.Tensor, candidates: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Blend the candidates of P target positions.

        Args:
            kernels: :meth:`kernels` of this blender.
            window: (N, P, n, D) normalised hidden states of each target's causal window cells (zero off the
                grid), in :attr:`offsets` order.
            candidates: (N, P, K, D) retrieved features (embeddings, or the previous blender's output).
            valid: (N, P, K) False for candidates that were not retrieved; they add nothing.

        Returns:
            ((N, P, D) the mean over valid candidates of ``w_k·x_k``, zero where none is valid;
             (N, P, K) × D smoothed candidates ``w_k·x_k`` for the next blender, zero where not valid).
        """
        context = window.flatten(2) @ kernels.context  # (N, P, D)
        x = context[:, :, None] + self.norm(candidates) @ kernels.centre + kernels.bias  # (N, P, K, D)
        gate = torch.sigmoid(self.gate(x))  # (N, P, K, 1)
        smoothed = gate * x * valid[..., None]  # (N, P, K, D)
        count = valid.sum(-1, keepdim=True).clamp_min(1)  # (N, P, 1)
        return smoothed.sum(2) / count, smoothed


class FaidAdapter(nn.Module):
    """Everything FAiD trains: the blenders, optionally a copy of the base model's image head and LoRA factors.

    Built for one base model by :func:`arrag.faid.attach.build_adapter`, which knows the head and the LoRA
    target shapes; :func:`arrag.faid.attach.attach` puts the parts into that model and takes them out again.
    """

    def __init__(
        self,
        config: FaidConfig,
        width: int,
        head: nn.Module | None = None,
        lora_shapes: dict[str, tuple[int, int]] | None = None,
    ):
        super().__init__()
        self.config = config
        self.width = width
        self.blenders = nn.ModuleList(Blender(width, config.hops) for _ in range(config.blenders))
        self.head = copy.deepcopy(head) if head is not None else None
        if self.head is not None:
            self.head.requires_grad_(True)
        self.lora = nn.ModuleDict()  # module name with dots as "-" -> ModuleDict(A=Linear(in, r), B=Linear(r, out))
        for name, (inputs, outputs) in (lora_shapes or {}).items():
            down, up = nn.Linear(inputs, config.lora_rank, bias=False), nn.Linear(config.lora_rank, outputs, bias=False)
            nn.init.zeros_(up.weight)  # LoRA starts as the identity change (peft's default init)
            self.lora[lora_key(name)] = nn.ModuleDict({"A": down, "B": up})

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def lora_key(module_name: str) -> str:
    """ModuleDict keys cannot hold dots."""
    return module_name.replace(".", "-")
