"""Attaching a FAiD adapter to a backend's model without forking its code, and detaching it again.

A forward hook on each chosen decoder layer's attention module reads the attention's input (the layer's
normalised hidden states) and returns ``attention output + blended retrieval features``, which the layer adds to
its residual before the MLP: ``h ← h + Attn(norm(h)) + mean_k(w_k·x_k)``. LoRA factors go in through peft's
tuner, the fine-tuned head replaces the base head by module swap; every change is undone by :meth:`FaidHooks.detach`.

Hidden states of image cells are cached per blender layer, so a decoding step gathers only its target's causal
window: O(window), not O(T). The query position that predicts cell t takes image token t−1 as input, so its
normalised hidden state is cell t−1's entry in the cache.

Shapes: N model rows (conditional, then unconditional), S sequence, n queries, K candidates, D width, T = R·C.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from arrag.faid.blender import BlenderKernels, FaidAdapter, FaidConfig, lora_key
from arrag.retrieval.grid import Grid, Neighbourhood
from arrag.retrieval.neighbours import Neighbours


@dataclass
class FaidTarget:
    """What a backend exposes for FAiD: its decoder layers' attention modules and image-token paths."""

    model: nn.Module  # root of the LoRA targets and of every parameter frozen while attached
    attention: list[nn.Module]  # the attention module of every decoder layer, in order
    embed: Callable[[torch.Tensor], torch.Tensor]  # (...) image token ids -> (..., D) input embeddings
    head_owner: nn.Module
    head_name: str  # head_owner.<head_name> maps final hidden states to image-token logits
    lora_pattern: str  # regex (full match) of the module names in ``model`` that get LoRA
    width: int
    grid: Grid

    @property
    def head(self) -> nn.Module:
        return getattr(self.head_owner, self.head_name)

    def lora_modules(self) -> dict[str, nn.Linear]:
        modules = {
            name: module
            for name, module in self.model.named_modules()
            if re.fullmatch(self.lora_pattern, name) and isinstance(module, nn.Linear)
        }
        if not modules:
            raise ValueError(f"no linear module of the model matches the LoRA pattern {self.lora_pattern!r}")
        return modules


def build_adapter(config: FaidConfig, target: FaidTarget) -> FaidAdapter:
    """A fresh adapter for ``target``'s model: new blenders, a head copy and LoRA factors as configured."""
    shapes = (
        {name: (m.in_features, m.out_features) for name, m in target.lora_modules().items()}
        if config.lora_rank
        else None
    )
    config.layers(len(target.attention))  # refuse more blenders than layers now
    return FaidAdapter(config, target.width, target.head if config.train_head else None, shapes)


class FaidHooks:
    """An adapter attached to one model; created by :func:`attach`, undone by :meth:`detach`.

    Per forward pass the caller says which image positions the last n sequence positions predict
    (:meth:`prepare`), after :meth:`begin` has reset the per-layer caches for a new batch. The retrieved candidates
    are for the first rows of the model's batch; rows beyond them (the unconditional rows of guidance, which
    sessions put after the conditional ones) get none.
    """

    def __init__(self, adapter: FaidAdapter, target: FaidTarget):
        self.adapter, self.target, self.grid = adapter, target, target.grid
        self.layers = adapter.config.layers(len(target.attention))
        offsets = Neighbourhood(hops=max(adapter.config.hops), missing="zero").indices(target.grid)  # (T, n)
        # Off-grid cells read the extra zero row at index T of each cache.
        self.window = torch.as_tensor(offsets).where(torch.as_tensor(offsets) >= 0, target.grid.size)
        self._flags = [(p, p.requires_grad) for p in target.model.parameters()]
        target.model.requires_grad_(False)
        self._lora = self._inject_lora() if adapter.config.lora_rank else None
        self._base_head = target.head if adapter.head is not None else None
        if adapter.head is not None:
            setattr(target.head_owner, target.head_name, adapter.head)
        adapter.requires_grad_(True)
        self._handles = [
            target.attention[layer].register_forward_hook(partial(self._blend, i), with_kwargs=True)
            for i, layer in enumerate(self.layers)
        ]
        self.states: list[torch.Tensor] = []
        self.kernels: list[BlenderKernels] = []
        self.count: int | None = None
        self.begin()

    def _inject_lora(self) -> nn.Module:
        from peft import LoraConfig, LoraModel

        config = self.adapter.config
        names = list(self.target.lora_modules())
        had_config = hasattr(self.target.model, "peft_config")
        lora = LoraModel(
            self.target.model,
            LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.alpha,
                lora_dropout=config.lora_dropout,
                target_modules=self.target.lora_pattern,
            ),
            "default",
        )
        self._had_peft_config = had_config
        for name in names:  # peft's layers compute with the adapter's own factors
            layer, factors = self.target.model.get_submodule(name), self.adapter.lora[lora_key(name)]
            layer.lora_A["default"], layer.lora_B["default"] = factors["A"], factors["B"]
            layer.train(layer.base_layer.training)  # new modules start in training mode: LoRA dropout would run
        return lora

    def detach(self) -> None:
        """Remove hooks, LoRA layers and the head swap; restore every base parameter's ``requires_grad``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._lora is not None:
            self._lora.unload()  # puts each wrapped layer's untouched base_layer back
            if not self._had_peft_config and hasattr(self.target.model, "peft_config"):
                del self.target.model.peft_config
            self._lora = None
        if self._base_head is not None:
            setattr(self.target.head_owner, self.target.head_name, self._base_head)
            self._base_head = None
        for parameter, flag in self._flags:
            parameter.requires_grad_(flag)
        self.states, self.kernels, self.count = [], [], None

    def begin(self) -> None:
        """Start a batch: empty caches (sized by the batch's first forward), kernels composed once for its passes."""
        self.states = []
        self.kernels = [blender.kernels() for blender in self.adapter.blenders]

    def prepare(self, first: int, tokens: torch.Tensor, valid: torch.Tensor) -> None:
        """The next forward's last n sequence positions predict cells ``first … first+n−1``.

        Args:
            first: raster position predicted by the first of them.
            tokens: (B, n, K) retrieved token ids for the first B model rows and each position.
            valid: (B, n, K) False where nothing was retrieved (ineligible positions, padding).
        """
        if not self.kernels:
            raise RuntimeError("call begin() before prepare()")
        rows, n, k = tokens.shape
        if valid.shape != tokens.shape or first + n > self.grid.size:
            raise ValueError(f"tokens {tuple(tokens.shape)} / valid {tuple(valid.shape)} do not fit this grid")
        reference = self.adapter.blenders[0].hop_logits
        self.targets = torch.arange(first, first + n, device=reference.device)  # (n,)
        embedded = self.target.embed(tokens.reshape(rows, n * k).to(reference.device))  # (B, n·K, D)
        self.features = embedded.reshape(rows, n, k, -1).to(reference.dtype)
        self.valid = valid.to(reference.device)
        self.count = n

    def prepare_step(self, position: int, found: Neighbours | None) -> None:
        """One decoding step predicting ``position``: the conditional rows get ``found``'s first k neighbours;
        None: nothing was retrieved for this position."""
        if found is None:
            rows, k = 1, 1
            tokens, valid = torch.zeros(rows, 1, k, dtype=torch.long), torch.zeros(rows, 1, k, dtype=torch.bool)
        else:
            k = self.adapter.config.k
            tokens, valid = found.tokens[:, None, :k].cpu(), found.valid[:, None, :k].cpu()  # (B, 1, ≤k)
        self.prepare(position, tokens, valid)

    def _fit_rows(self, rows: int) -> None:
        """Size the caches for a batch of ``rows`` model rows on its first forward; pad the candidates of the
        rows that got none (guidance's unconditional rows) with nothing valid."""
        if not self.states:
            reference = self.adapter.blenders[0].hop_logits
            self.states = [reference.new_zeros(rows, self.grid.size + 1, self.adapter.width) for _ in self.layers]
        if rows != self.states[0].shape[0] or rows < self.features.shape[0]:
            raise ValueError(f"a forward of {rows} rows in a batch of {self.states[0].shape[0]} model rows")
        missing = rows - self.features.shape[0]
        if missing:
            self.features = torch.cat([self.features, self.features.new_zeros(missing, *self.features.shape[1:])])
            self.valid = torch.cat([self.valid, self.valid.new_zeros(missing, *self.valid.shape[1:])])

    def _blend(self, index: int, module: nn.Module, args: tuple, kwargs: dict, output):
        if self.count is None:
            raise RuntimeError("a FAiD-augmented layer ran without prepare(): say which positions it predicts")
        normed = args[0] if args else kwargs["hidden_states"]  # (N, S, D) the attention's input
        attended = output[0] if isinstance(output, tuple) else output  # (N, S, D)
        if index == 0:
            self._fit_rows(normed.shape[0])
        n, states = self.count, self.states[index]
        query = normed[:, -n:].to(states.dtype)  # (N, n, D)
        cells, has_cell = self.targets - 1, self.targets >= 1
        states[:, cells[has_cell]] = query[:, has_cell]  # the position predicting t holds cell t−1
        window = states[:, self.window.to(states.device)[self.targets]]  # (N, n, win, D)
        added, self.features = self.adapter.blenders[index](self.kernels[index], window, self.features, self.valid)
        if index == len(self.layers) - 1:
            self.count = None  # the next forward needs its own prepare()
        blended = torch.cat([attended[:, :-n], attended[:, -n:] + added.to(attended.dtype)], dim=1)  # (N, S, D)
        return (blended, *output[1:]) if isinstance(output, tuple) else blended


def attach(adapter: FaidAdapter, target: FaidTarget) -> FaidHooks:
    """Put ``adapter`` into ``target``'s model; the base parameters are frozen until :meth:`FaidHooks.detach`."""
    if adapter.width != target.width:
        raise ValueError(f"the adapter is {adapter.width} wide, the model {target.width}")
    return FaidHooks(adapter, target)


@contextmanager
def attached(adapter: FaidAdapter, target: FaidTarget) -> Iterator[FaidHooks]:
    hooks = attach(adapter, target)
    try:
        yield hooks
    finally:
        hooks.detach()
