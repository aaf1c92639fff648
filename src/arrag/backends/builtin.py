"""The project's own generator: :class:`ImageTransformer` over the tokens of a :class:`VQModel`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from arrag.backends.base import StepLogits
from arrag.config import SamplingConfig
from arrag.faid.attach import FaidTarget
from arrag.images import Preprocessing
from arrag.models.transformer import (
    ImageTransformer,
    TransformerConfig,
    encode_captions,
    unconditional_captions,
)
from arrag.models.vq import VQConfig, VQModel
from arrag.retrieval.grid import Grid
from arrag.retrieval.keys import codebook_fingerprint
from arrag.training import CONFIG_FILE, WEIGHTS_FILE


class BuiltinSession:
    """Conditional and unconditional rows stacked as halves of one batch, with one KV cache."""

    def __init__(self, model: ImageTransformer, prompts: Sequence[str], guidance: bool, device: torch.device):
        self.model = model
        self.batch = len(prompts)
        max_len = model.config.max_text_len
        text = encode_captions(list(prompts), max_len)  # (B, L+1)
        if guidance:
            text = torch.cat([text, unconditional_captions(self.batch, max_len)])  # (2B, L+1)
        self.text: torch.Tensor | None = text.to(device)
        self.guidance = guidance
        self.cache = model.new_cache(text.shape[0])

    def step(self, previous: torch.Tensor | None) -> StepLogits:
        if previous is None:
            logits = self.model(self.text, None, self.cache)[:, -1]  # (B or 2B, V)
        else:
            fed = previous.repeat(2) if self.guidance else previous  # (B or 2B,)
            logits = self.model(None, fed[:, None], self.cache)[:, -1]
        if self.guidance:
            cond, uncond = logits.chunk(2)
            return StepLogits(cond=cond, uncond=uncond)
        return StepLogits(cond=logits)


@dataclass
class BuiltinBackend:
    """A backend over the built-in transformer and VQ tokenizer (random for ``tiny``; trained when shipped)."""

    name: str
    transformer: ImageTransformer
    vq: VQModel
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        self.transformer.to(self.device).eval()
        self.vq.to(self.device).eval()
        side = self.vq.config.grid_size
        self.grid = Grid(side, side)
        if self.transformer.config.image_tokens != self.grid.size:
            raise ValueError(
                f"the transformer emits {self.transformer.config.image_tokens} tokens, the tokenizer's grid "
                f"has {self.grid.size}"
            )
        if self.transformer.config.codebook_size != self.vq.config.codebook_size:
            raise ValueError("the transformer and the tokenizer disagree on the codebook size")
        self.codebook_size = self.vq.config.codebook_size
        self.cell_dim = self.vq.config.code_dim
        self.image_size = self.vq.config.image_size
        self.preprocessing = Preprocessing(self.image_size)  # [-1, 1] centre crops, as the VQ was trained
        self.codebook_fingerprint = codebook_fingerprint(self.vq.codebook.weight)

    def start(self, prompts: Sequence[str], guidance_scale: float) -> BuiltinSession:
        return BuiltinSession(self.transformer, prompts, guidance_scale != 1.0, self.device)

    def session_bytes(self, rows: int, guidance: bool) -> int:
        config = self.transformer.config
        model_rows = rows * (2 if guidance else 1)
        per_row = 2 * config.layers * config.max_len * config.width  # keys and values, every layer and position
        return model_rows * (per_row + config.codebook_size) * self.transformer.head.weight.element_size()

    def faid_target(self) -> FaidTarget:
        model = self.transformer
        return FaidTarget(
            model=model,
            attention=[block.attention for block in model.blocks],
            embed=model.image_embedding,
            head_owner=model,
            head_name="head",
            lora_pattern=r"blocks\.\d+\.attention\.(qkv|out)",
            width=model.config.width,
            grid=self.grid,
        )

    def teacher_forced_logits(
        self, prompts: Sequence[str], tokens: torch.Tensor, unconditional: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T) ground-truth tokens -> (B, T, V) logits of every image position given the tokens before it.

        Rows where ``unconditional`` is True see the empty caption that guidance contrasts with.
        """
        model = self.transformer
        texts = ["" if unconditional is not None and bool(unconditional[i]) else p for i, p in enumerate(prompts)]
        text = encode_captions(texts, model.config.max_text_len).to(self.device)  # (B, L+1)
        return model(text, tokens[:, :-1].to(self.device))[:, -tokens.shape[1] :]  # (B, T, V)

    @torch.no_grad()
    def code_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vq.normalised_codebook()[tokens.to(self.device)]

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.preprocessing(image)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vq.quantize(self.encode_latents(images))  # (N, R·C)

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        return self.vq.latents(images.to(self.device))  # (N, R·C, d)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return ((self.vq.decode_codes(tokens.to(self.device)) + 1) / 2).clamp(0, 1)  # (N, 3, H, W)


def load_vq(directory: Path) -> VQModel:
    """A trained VQ tokenizer from its folder (model.safetensors + config.json with a "vq" entry)."""
    config = json.loads((directory / CONFIG_FILE).read_text())["vq"]
    model = VQModel(VQConfig(**{**config, "channels": tuple(config["channels"])}))
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return model.eval()


def load_transformer(directory: Path) -> ImageTransformer:
    """A trained generator from its folder (model.safetensors + config.json with a "transformer" entry)."""
    model = ImageTransformer(TransformerConfig(**json.loads((directory / CONFIG_FILE).read_text())["transformer"]))
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return model.eval()


BUILTIN_DIR = Path(__file__).resolve().parent.parent / "assets" / "builtin"


def recommended_sampling(directory: Path) -> SamplingConfig:
    """The sampling recorded beside a trained generator's weights (its ``config.json``), else the defaults."""
    return SamplingConfig(**json.loads((directory / CONFIG_FILE).read_text()).get("sampling", {}))


def builtin_backend(directory: Path = BUILTIN_DIR, device: str | torch.device = "cpu") -> BuiltinBackend:
    """The trained built-in model: ``directory`` holds ``tokenizer/`` and ``generator/`` weight folders; the
    generator's ``config.json`` may record the sampling it is meant to be decoded with."""
    for part in ("tokenizer", "generator"):
        if not (directory / part / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"{directory / part} has no {WEIGHTS_FILE}; train it with arrag train {part} --out {directory / part}"
            )
    name = "builtin" if directory.resolve() == BUILTIN_DIR else f"builtin:{directory.resolve()}"
    generator = directory / "generator"
    return BuiltinBackend(
        name,
        load_transformer(generator),
        load_vq(directory / "tokenizer"),
        torch.device(device),
        recommended_sampling(generator),
    )


TINY_VQ = VQConfig(codebook_size=64, code_dim=8, channels=(16, 32, 32), image_size=32)


def tiny_backend(seed: int = 0, device: str | torch.device = "cpu") -> BuiltinBackend:
    """A deterministic randomly initialised backend (8×8 tokens, 64 codes) for tests and quick checks."""
    config = TransformerConfig(
        codebook_size=TINY_VQ.codebook_size,
        image_tokens=TINY_VQ.grid_size**2,
        max_text_len=48,
        width=64,
        layers=2,
        heads=4,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer, vq = ImageTransformer(config), VQModel(TINY_VQ)
    return BuiltinBackend(f"tiny:{seed}", transformer, vq, torch.device(device))
