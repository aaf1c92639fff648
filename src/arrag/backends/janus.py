"""Janus-Pro through transformers' ``JanusForConditionalGeneration``, behind the backend protocol.

The session does what transformers' ``generate(generation_mode="image")`` does — conditional rows, then
unconditional rows whose prompt tokens other than BOS and begin-of-image are replaced by padding; prefill;
``generation_head`` on the last hidden state; the next input from ``prepare_embeddings_for_image_generation``
— but one step at a time, so arrag's one decoding loop owns guidance, retrieval and sampling.

Tokenizing images differs from transformers on purpose: its quantizer takes the argmin over raw codebook
vectors, while the original Janus / LlamaGen quantizer (``codebook_l2_norm=True``) L2-normalises both the
latents and the codebook first. Patch keys are made of normalised codebook vectors, so arrag tokenizes
with the normalised argmin, as the model was trained.

Shapes: B rows, L prompt tokens, T = R·C image tokens, V codebook size, d code size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, DynamicCache, JanusForConditionalGeneration

from arrag.backends.base import StepLogits
from arrag.config import SamplingConfig
from arrag.faid.attach import FaidTarget
from arrag.images import Preprocessing
from arrag.retrieval.grid import Grid
from arrag.retrieval.keys import codebook_fingerprint

PROMPT_ALLOWANCE = 256  # prompt tokens a memory estimate allows for: templated prompts are far shorter
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def unconditional_ids(model: JanusForConditionalGeneration, input_ids: torch.Tensor) -> torch.Tensor:
    """Guidance's unconditional prompts: every token but BOS and begin-of-image replaced by padding (B, L)."""
    config = model.generation_config
    special = (input_ids == config.bos_token_id) | (input_ids == config.generation_kwargs["boi_token_id"])
    return input_ids.masked_fill(~special, config.pad_token_id)


class JanusSession:
    """One batch of prompts: conditional rows first, unconditional rows second (transformers' layout)."""

    def __init__(
        self,
        model: JanusForConditionalGeneration,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        guidance: bool,
    ):
        if not mask[:, -1].all():
            raise ValueError("Janus prompts must be left-padded: the last position of every row must be a real token")
        self.model, self.guidance, self.batch = model, guidance, input_ids.shape[0]
        if guidance:
            input_ids, mask = torch.cat([input_ids, unconditional_ids(model, input_ids)]), torch.cat([mask, mask])
        self.pending = model.get_input_embeddings()(input_ids)  # (B or 2B, L, D)
        self.mask = mask
        self.cache = DynamicCache(config=model.config.get_text_config())

    def step(self, previous: torch.Tensor | None) -> StepLogits:
        if previous is not None:
            fed = torch.cat([previous, previous]) if self.guidance else previous  # (B or 2B,)
            self.pending = self.model.prepare_embeddings_for_image_generation(fed[:, None])  # (.., 1, D)
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        # Left-padded prompts: positions count real tokens only, as transformers' generate does.
        positions = (self.mask.cumsum(-1) - 1).clamp_min(0)[:, -self.pending.shape[1] :]
        out = self.model.model.language_model(
            inputs_embeds=self.pending,
            attention_mask=self.mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
        )
        logits = self.model.model.generation_head(out.last_hidden_state[:, -1]).float()  # (B or 2B, V)
        if self.guidance:
            cond, uncond = logits.split(self.batch)
            return StepLogits(cond=cond, uncond=uncond)
        return StepLogits(cond=logits)


class JanusBackend:
    """Janus / Janus-Pro text-to-image generation and VQ tokenization."""

    def __init__(self, model: JanusForConditionalGeneration, processor: Any, name: str):
        check_janus_config(model.config)
        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.device = next(model.parameters()).device
        vq = model.model.vqmodel
        side = model.config.vq_config.num_patches
        self.grid = Grid(side, side)
        self.codebook_size = vq.quantize.embedding.num_embeddings
        self.cell_dim = vq.quantize.embedding.embedding_dim
        self.image_size = model.config.vq_config.num_patches * 2 ** (len(model.config.vq_config.channel_multiplier) - 1)
        self.codebook_fingerprint = codebook_fingerprint(vq.quantize.embedding.weight.float())
        # The VQ model takes [-1, 1] centre crops (AR-RAG's img2code: Resize, CenterCrop, Normalize(0.5, 0.5)),
        # not the processor's CLIP normalisation and square padding.
        self.preprocessing = Preprocessing(self.image_size)
        self.sampling = SamplingConfig()  # Janus-Pro's own generation settings: guidance 5, temperature 1

    def prompt_ids(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Janus's chat template with the image-start token, left-padded -> (input_ids, attention_mask)."""
        texts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "text", "text": prompt}]}], add_generation_prompt=True
            )
            for prompt in prompts
        ]
        # Left padding, whatever the tokenizer's default: the next-token logits are read at the last position.
        batch = self.processor(
            text=texts, generation_mode="image", padding=True, padding_side="left", return_tensors="pt"
        )
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def start(self, prompts: Sequence[str], guidance_scale: float) -> JanusSession:
        input_ids, mask = self.prompt_ids(prompts)
        return JanusSession(self.model, input_ids, mask, guidance_scale != 1.0)

    def session_bytes(self, rows: int, guidance: bool) -> int:
        text = self.model.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        positions = PROMPT_ALLOWANCE + self.grid.size
        per_row = 2 * text.num_hidden_layers * positions * text.num_key_value_heads * head_dim  # keys and values
        return rows * (2 if guidance else 1) * per_row * next(self.model.parameters()).element_size()

    def faid_target(self) -> FaidTarget:
        language_model = self.model.model.language_model
        return FaidTarget(
            model=self.model,
            attention=[layer.self_attn for layer in language_model.layers],
            embed=self.model.prepare_embeddings_for_image_generation,
            head_owner=self.model.model,
            head_name="generation_head",
            # The language model only: the vision tower has q/k/v projections too.
            lora_pattern=r".*language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
            width=language_model.config.hidden_size,
            grid=self.grid,
        )

    def teacher_forced_logits(
        self, prompts: Sequence[str], tokens: torch.Tensor, unconditional: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T) ground-truth tokens -> (B, T, V) logits of every image position given the tokens before it.

        Rows where ``unconditional`` is True get the unconditional prompt of guidance (padding but for BOS and
        begin-of-image), as :class:`JanusSession` builds it.
        """
        input_ids, mask = self.prompt_ids(prompts)
        if unconditional is not None:
            dropped = unconditional.to(self.device)[:, None]  # (B, 1)
            input_ids = torch.where(dropped, unconditional_ids(self.model, input_ids), input_ids)
        embeds = torch.cat(
            [
                self.model.get_input_embeddings()(input_ids),  # (B, L, D)
                self.model.prepare_embeddings_for_image_generation(tokens[:, :-1].to(self.device)),  # (B, T-1, D)
            ],
            dim=1,
        )
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], tokens.shape[1] - 1)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        hidden = self.model.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions
        ).last_hidden_state  # (B, L+T-1, D)
        return self.model.model.generation_head(hidden[:, -tokens.shape[1] :]).float()  # (B, T, V)

    def _normalised_codebook(self) -> torch.Tensor:
        return F.normalize(self.model.model.vqmodel.quantize.embedding.weight.float(), dim=-1)  # (V, d)

    @torch.no_grad()
    def code_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._normalised_codebook()[tokens.to(self.device)]

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.preprocessing(image)

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        vq = self.model.model.vqmodel
        pixels = images.to(self.device, next(vq.parameters()).dtype)
        z = vq.quant_conv(vq.encoder(pixels)).float()  # (N, d, R, C)
        return F.normalize(z.flatten(2).transpose(1, 2), dim=-1)  # (N, R·C, d)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return (self.encode_latents(images) @ self._normalised_codebook().T).argmax(-1)  # (N, R·C)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        pixels = self.model.model.vqmodel.decode(tokens.to(self.device)).float()  # (N, 3, H, W) in ~[-1, 1]
        return ((pixels + 1) / 2).clamp(0, 1)


def check_janus_config(config: Any) -> None:
    """Raise ValueError unless a JanusConfig can generate images (transformers' own tests' config cannot)."""
    text, vq = config.text_config, config.vq_config
    factor = 2 ** (len(vq.channel_multiplier) - 1)
    problems = []
    if config.vision_config.num_image_tokens != vq.num_patches**2:
        problems.append(
            f"vision num_image_tokens {config.vision_config.num_image_tokens} != num_patches² {vq.num_patches**2}"
        )
    if not vq.projection_dim == vq.image_token_embed_dim == text.hidden_size:
        problems.append(
            f"vq projection_dim {vq.projection_dim} and image_token_embed_dim {vq.image_token_embed_dim} must "
            f"equal the language model's hidden_size {text.hidden_size}"
        )
    if vq.base_channels % 32:
        problems.append(f"vq base_channels {vq.base_channels} must be a multiple of 32 (GroupNorm groups)")
    if config.vision_config.image_size // config.vision_config.patch_size != vq.num_patches:
        problems.append("vision image_size / patch_size must equal the VQ grid side")
    if problems:
        raise ValueError(
            f"this Janus config cannot generate images (VQ downsampling {factor}×): " + "; ".join(problems)
        )


def load_janus(name_or_path: str, device: str = "cpu", dtype: str = "float32") -> JanusBackend:
    """Load a Janus-Pro checkpoint (hub id or local folder) and its processor."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    try:
        model = JanusForConditionalGeneration.from_pretrained(name_or_path, dtype=DTYPES[dtype])
        processor = AutoProcessor.from_pretrained(name_or_path)
    except OSError as error:
        if Path(name_or_path).exists():
            raise
        raise FileNotFoundError(
            f"could not load {name_or_path!r}: it is not a local folder and not in the Hugging Face cache, and "
            f"the hub could not be reached ({type(error).__name__}). On a machine with access run "
            f"`huggingface-cli download {name_or_path} --local-dir DIR`, copy DIR here and load the backend janus:DIR."
        ) from error
    name = str(Path(name_or_path).resolve()) if Path(name_or_path).exists() else name_or_path
    return JanusBackend(model.to(device), processor, f"janus:{name}")
