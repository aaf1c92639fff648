"""One training loop for every model the project trains: AdamW, warm-up + cosine schedule, gradient
accumulation, periodic checkpoints and exact resume.

The caller supplies ``loss_at(step, micro)``, which builds its own batch deterministically from the step
number, so a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    accumulation: int = 1
    checkpoint_every: int = 200
    seed: int = 0
    bf16: bool = False  # autocast matmuls to bfloat16 (fast on CPUs with AMX / AVX512-BF16)
    ema_decay: float | None = None  # keep an exponential moving average of the weights and save it instead

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.accumulation < 1:
            raise ValueError("steps, batch_size and accumulation must be >= 1")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    ratio = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.learning_rate * ratio


def save_weights(model: nn.Module, directory: Path, description: dict) -> None:
    """model.safetensors + config.json (model config, data, command) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(description, indent=2))


def train(
    model: nn.Module,
    loss_at: Callable[[int, int], tuple[torch.Tensor, dict[str, float]]],
    config: TrainConfig,
    out: Path,
    description: dict,
    on_checkpoint: Callable[[int], None] | None = None,
) -> nn.Module:
    """Train ``model``'s trainable parameters, resuming from ``out/checkpoint.pt`` if it exists.

    Args:
        loss_at: (step, micro-batch index) -> (loss, numbers to show); deterministic in its arguments.
        description: written to ``config.json`` beside the final weights (configs, data, command).
        on_checkpoint: called with the step after each checkpoint (e.g. to sample images).
    """
    out.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
    )
    # A small model trained for few steps samples noticeably better from averaged weights.
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay)) if config.ema_decay else None
    start = 0
    checkpoint_path = out / CHECKPOINT_FILE
    if checkpoint_path.exists():
        # Our own checkpoint, and weights_only=True never runs code from the file.
        state = torch.load(checkpoint_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        if ema is not None and "ema" in state:  # otherwise the average starts from the resumed weights
            ema.load_state_dict(state["ema"])
        logger.info("resuming from step %d of %d", start, config.steps)
    trainable = sum(p.numel() for p in params)
    print(f"training {trainable:,} parameters for {config.steps} steps (from step {start}) -> {out}")
    (out / "train-config.json").write_text(json.dumps({"train": asdict(config), **description}, indent=2))
    model.train()
    began = time.perf_counter()
    with tqdm(total=config.steps, initial=start, desc="training", unit="step") as progress:
        for step in range(start, config.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, config)
            shown: dict[str, float] = {}
            for micro in range(config.accumulation):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                    loss, shown = loss_at(step, micro)
                (loss / config.accumulation).backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(model)
            progress.update(1)
            progress.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
            done = step + 1
            if done % config.checkpoint_every == 0 or done == config.steps:
                tmp = checkpoint_path.with_suffix(".tmp")
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done}
                if ema is not None:
                    state["ema"] = ema.state_dict()
                torch.save(state, tmp)
                os.replace(tmp, checkpoint_path)
                if on_checkpoint is not None:
                    on_checkpoint(done)
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())
    model.eval()
    seconds = round(time.perf_counter() - began)
    description = {
        **description,
        "train": asdict(config),
        "resumed_from_step": start,
        "train_seconds_this_run": seconds,
    }
    save_weights(model, out, description)
    return model
