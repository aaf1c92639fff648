"""FAiD: the blender against a literal convolution reference, causality, exactness of the zero gate and of
detaching, what training changes, and a tiny Janus trained with FAiD + LoRA."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from arrag.backends.builtin import tiny_backend
from arrag.config import GenerationConfig, RetrievalConfig
from arrag.decoding.loop import generate
from arrag.faid.attach import attached, build_adapter
from arrag.faid.blender import Blender, FaidConfig
from arrag.faid.files import load_adapter
from arrag.faid.train import MemoisedSearch, retrievals, train_faid
from arrag.retrieval.database import PatchDatabase
from arrag.retrieval.grid import Grid, Neighbourhood
from arrag.retrieval.indexes import IndexConfig
from arrag.retrieval.keys import patch_keys
from arrag.retrieval.neighbours import Neighbours
from arrag.training import TrainConfig

PROMPTS = ["a red 7", "two blue cats"]


def randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Random values everywhere, so that no part of a fresh adapter (zero convs, zero LoRA B) hides a bug."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def literal_blend(blender: Blender, grid_states, grid: Grid, target: int, candidates, valid):
    """The paper's blender written out: per candidate and hop, the zero-padded (2h+1)² window of the cell
    states with every cell at or after the target zeroed and the candidate in the centre, through the two
    stacked convolutions; softmax over hops, sigmoid gate, mean over valid candidates."""
    width = grid_states.shape[-1]
    states = grid_states.view(grid.rows, grid.cols, width).permute(2, 0, 1)  # (D, R, C)
    r, c = grid.cell(target)
    hop_weights = torch.softmax(blender.hop_logits, 0)
    outputs = []
    for candidate in blender.norm(candidates):  # (D,)
        fused = 0
        for weight, h, first, second in zip(hop_weights, blender.hops, blender.first, blender.second, strict=True):
            padded = F.pad(states, (h, h, h, h))
            window = padded[:, r : r + 2 * h + 1, c : c + 2 * h + 1].clone()  # (D, 2h+1, 2h+1)
            window[:, h, h:] = 0  # the target and the cells right of it
            window[:, h + 1 :] = 0  # every row below
            window[:, h, h] = candidate
            reduced = F.conv2d(F.conv2d(window[None], first.weight, first.bias), second.weight, second.bias)
            fused = fused + weight * reduced.view(width)
        outputs.append(torch.sigmoid(blender.gate(fused)) * fused)
    outputs = torch.stack(outputs)  # (K, D)
    return (outputs * valid[:, None]).sum(0) / valid.sum().clamp_min(1), outputs * valid[:, None]


def test_blender_equals_the_literal_stacked_convolutions():
    grid, width, k = Grid(5, 6), 8, 3
    blender = Blender(width, (1, 2))
    randomise(blender)
    states = torch.randn(grid.size, width, generator=torch.Generator().manual_seed(1))  # (T, D)
    candidates = torch.randn(grid.size, k, width, generator=torch.Generator().manual_seed(2))  # (T, K, D)
    valid = torch.rand(grid.size, k, generator=torch.Generator().manual_seed(3)) > 0.3
    table = torch.as_tensor(Neighbourhood(hops=2, missing="zero").indices(grid))  # (T, n)
    padded = torch.cat([states, states.new_zeros(1, width)])  # off-grid cells read the zero row
    window = padded[table.where(table >= 0, grid.size)]  # (T, n, D)
    added, smoothed = blender(blender.kernels(), window[None], candidates[None], valid[None])
    for target in range(grid.size):
        expected, expected_smoothed = literal_blend(blender, states, grid, target, candidates[target], valid[target])
        torch.testing.assert_close(added[0, target], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(smoothed[0, target], expected_smoothed, rtol=1e-4, atol=1e-5)
    assert torch.equal(added[0, ~valid.any(-1)], torch.zeros_like(added[0, ~valid.any(-1)]))


@pytest.fixture
def faid_backend():
    """A fresh tiny backend per test: attaching must leave it as it was, and tests check exactly that."""
    return tiny_backend(seed=0)


def random_adapter(backend, **config):
    adapter = build_adapter(FaidConfig(**config), backend.faid_target())
    randomise(adapter)
    return adapter


def random_grids(backend, k: int, seed: int, keep: float = 1.0):
    """Two rows of random tokens (2, T), candidates (2, T, k) and validity (2, T, k), about ``keep`` of it valid."""
    total, generator = backend.grid.size, torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, backend.codebook_size, (2, total), generator=generator)
    candidates = torch.randint(0, backend.codebook_size, (2, total, k), generator=generator)
    valid = torch.rand(2, total, k, generator=generator) < keep
    return tokens, candidates, valid


def teacher_forced(backend, hooks, tokens, candidates, valid):
    hooks.begin()
    hooks.prepare(0, candidates, valid)
    return backend.teacher_forced_logits(PROMPTS, tokens)


@torch.no_grad()
def test_the_prediction_at_t_ignores_tokens_and_retrievals_from_t_on(faid_backend):
    backend, total, k = faid_backend, faid_backend.grid.size, 4
    tokens, candidates, valid = random_grids(backend, k, seed=0)
    with attached(random_adapter(backend, k=k, lora_rank=2), backend.faid_target()) as hooks:
        reference = teacher_forced(backend, hooks, tokens, candidates, valid)
        for t in (0, 9, 30, total - 1):
            changed_tokens, changed_candidates = tokens.clone(), candidates.clone()
            changed_tokens[:, t:] = (tokens[:, t:] + 1) % backend.codebook_size
            changed_candidates[:, t + 1 :] = (candidates[:, t + 1 :] + 1) % backend.codebook_size
            logits = teacher_forced(backend, hooks, changed_tokens, changed_candidates, valid)
            torch.testing.assert_close(logits[:, : t + 1], reference[:, : t + 1], rtol=0, atol=1e-5)
            if t + 1 < total:
                assert not torch.allclose(logits[:, t + 1 :], reference[:, t + 1 :], atol=1e-3)  # later ones do


@torch.no_grad()
def test_step_by_step_decoding_equals_teacher_forcing(faid_backend):
    """A guided session's steps, with the per-layer cell caches, give the one-pass teacher-forced logits."""
    backend, total, k = faid_backend, faid_backend.grid.size, 3
    tokens, candidates, valid = random_grids(backend, k, seed=1, keep=0.8)
    with attached(random_adapter(backend, k=k), backend.faid_target()) as hooks:
        expected = teacher_forced(backend, hooks, tokens, candidates, valid)
        hooks.begin()
        hooks.prepare(0, candidates, torch.zeros_like(valid))
        unconditional_base = backend.teacher_forced_logits(PROMPTS, tokens, torch.ones(2, dtype=torch.bool))
        session = backend.start(PROMPTS, guidance_scale=5.0)
        hooks.begin()
        cond, uncond = [], []
        for t in range(total):
            found = Neighbours(
                distances=torch.zeros(2, k),
                tokens=candidates[:, t],
                image_ids=torch.zeros(2, k, dtype=torch.long),
                positions=torch.zeros(2, k, dtype=torch.long),
                valid=valid[:, t],
            )
            hooks.prepare_step(t, found)
            step = session.step(tokens[:, t - 1] if t else None)
            cond.append(step.cond)
            uncond.append(step.uncond)
    torch.testing.assert_close(torch.stack(cond, 1), expected, rtol=1e-4, atol=1e-4)
    # The unconditional rows got no retrieval: what the adapted model says for the empty caption without it.
    torch.testing.assert_close(torch.stack(uncond, 1), unconditional_base, rtol=1e-4, atol=1e-4)


def test_gates_at_zero_give_the_base_model_exactly(faid_backend, database):
    backend = faid_backend
    adapter = random_adapter(backend, k=8, train_head=False)
    with torch.no_grad():
        for blender in adapter.blenders:
            blender.gate[-1].bias.fill_(-float("inf"))  # sigmoid(−inf) = 0: every candidate gated off
    config = GenerationConfig(num_images_per_prompt=2, seed=3)
    plain = generate(backend, PROMPTS, config)
    blended = generate(
        backend, PROMPTS, GenerationConfig(method="faid", num_images_per_prompt=2, seed=3), database, faid=adapter
    )
    assert torch.equal(plain.tokens, blended.tokens)
    open_gates = random_adapter(backend, k=8, train_head=False)
    changed = generate(
        backend, PROMPTS, GenerationConfig(method="faid", num_images_per_prompt=2, seed=3), database, faid=open_gates
    )
    assert not torch.equal(plain.tokens, changed.tokens)  # the same adapter with open gates does change them


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_an_optimiser_step_changes_only_the_adapter(faid_backend):
    backend = faid_backend
    base = snapshot(backend.transformer)
    adapter = build_adapter(FaidConfig(k=4, lora_rank=4), backend.faid_target())  # the fresh init training starts from
    before = snapshot(adapter)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, backend.codebook_size, (2, backend.grid.size), generator=generator)
    candidates = torch.randint(0, backend.codebook_size, (2, backend.grid.size, 4), generator=generator)
    with attached(adapter, backend.faid_target()) as hooks:
        trainable = {id(p) for p in backend.transformer.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in [*adapter.lora.parameters(), *adapter.head.parameters()]}  # base frozen
        optimizer = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)
        logits = teacher_forced(backend, hooks, tokens, candidates, torch.ones_like(candidates, dtype=torch.bool))
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        optimizer.step()
    after = snapshot(adapter)
    for name in ("blenders.0.second.0.weight", "blenders.1.second.1.bias", "head.weight"):
        assert not torch.equal(before[name], after[name]), name
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("lora.") and n.endswith("B.weight"))
    for name, value in snapshot(backend.transformer).items():
        assert torch.equal(value, base[name]), name  # the frozen backbone is bit-identical


def test_detach_restores_the_base_model(faid_backend):
    backend = faid_backend
    model = backend.transformer
    tokens = torch.randint(0, backend.codebook_size, (2, backend.grid.size), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = backend.teacher_forced_logits(PROMPTS, tokens)
    base, modules = snapshot(model), dict(model.named_modules())
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    adapter = random_adapter(backend, lora_rank=2)
    with attached(adapter, backend.faid_target()):
        assert type(model.blocks[0].attention.qkv).__name__ == "Linear" and model.head is adapter.head
        assert model.blocks[0].attention.qkv is not modules["blocks.0.attention.qkv"]  # peft's wrapper
    assert dict(model.named_modules()) == modules  # the very same module objects, nothing added
    assert all(not m._forward_hooks for m in model.modules())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert snapshot(model).keys() == base.keys() and all(torch.equal(v, base[k]) for k, v in snapshot(model).items())
    with torch.no_grad():
        assert torch.equal(backend.teacher_forced_logits(PROMPTS, tokens), expected)


def test_memoised_retrievals_equal_direct_searches(backend, database):
    tokens = torch.randint(0, backend.codebook_size, (3, backend.grid.size), generator=torch.Generator().manual_seed(2))
    tokens[1] = tokens[0]  # repeated neighbourhoods come from the memo
    search = MemoisedSearch(database, 5, probes=None)
    candidates, valid = retrievals(backend, search, tokens)
    spec = database.spec
    keys = patch_keys(backend.code_vectors(tokens), database.positions, spec.grid, spec.neighbourhood)  # (B, P, D)
    direct = database.search(keys.reshape(-1, keys.shape[-1]), 5)
    assert torch.equal(candidates[:, database.positions].reshape(-1, 5), direct.tokens)
    assert valid[:, database.positions].all()
    ineligible = np.setdiff1d(np.arange(backend.grid.size), database.positions)
    assert not valid[:, ineligible].any()


def test_the_training_ivf_probes_what_it_is_told(backend, database):
    """With every cell probed the IVF copy finds the exact distances; with one cell it misses some."""
    queries = np.random.default_rng(0).normal(size=(200, database.spec.key_dim)).astype(np.float32)
    exact = database.search(torch.from_numpy(queries), 5).distances
    every = MemoisedSearch(database, 5, probes=64, lists=8)
    assert every.index.nprobe == 8  # capped at the number of cells, on the IVF index itself
    torch.testing.assert_close(every.nearest(queries)[0], exact, rtol=1e-5, atol=1e-5)
    one = MemoisedSearch(database, 5, probes=1, lists=8)
    assert (one.nearest(queries)[0] > exact + 1e-4).any()


def test_a_database_that_stores_ids_is_searched_as_it_is_during_training(backend, database):
    """An IVF database cannot hand its keys to an IVF copy; training searches it directly, tokens included."""
    keys = database.index.reconstruct_n(0, len(database))  # (N, D)
    ivf = PatchDatabase(database.spec, index_config=IndexConfig("IVF4,Flat", search_params="nprobe=4"))
    ivf.train(keys)
    grids = torch.randint(0, backend.codebook_size, (6, backend.grid.size), generator=torch.Generator().manual_seed(5))
    ivf.add(grids, backend.code_vectors(grids), [f"g{i}" for i in range(6)])
    search = MemoisedSearch(ivf, 5, probes=16)
    assert search.index is None
    queries = keys[:50]
    distances, tokens, valid = search.nearest(queries)
    assert torch.equal(distances, ivf.search(torch.from_numpy(queries), 5).distances)
    direct = ivf.search(torch.from_numpy(queries), 5)
    assert torch.equal(tokens, direct.tokens) and valid.all()
    assert torch.equal(direct.tokens, grids[direct.image_ids, direct.positions])


def test_tiny_janus_with_faid_and_lora_trains_then_generates(tmp_path):
    from arrag.backends.janus import JanusBackend
    from conftest import blob_images, database_from_images
    from janus_tiny import tiny_janus_model, tiny_janus_processor

    janus = JanusBackend(tiny_janus_model(), tiny_janus_processor(), "tiny-janus")
    database, _ = database_from_images(janus, blob_images(40, seed=3), Neighbourhood())
    train_images = torch.stack([janus.preprocess(im) for im in blob_images(16, seed=4)])
    tokens = janus.encode(train_images).numpy()
    captions = ["a red cat", "a blue dog", "the red sofa", "a photo of a cat"] * 4
    config = FaidConfig(k=4, lora_rank=4)
    train_config = TrainConfig(steps=12, batch_size=8, learning_rate=3e-3, warmup_steps=2, checkpoint_every=6)
    adapter = train_faid(janus, captions, tokens, database, tmp_path, config, train_config, caption_dropout=0.2)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    lora_names = [name for name in adapter.state_dict() if name.startswith("lora.")]
    assert lora_names and all("language_model" in name and "self_attn" in name for name in lora_names)
    reloaded = load_adapter(tmp_path, janus)
    out = generate(
        janus, ["a red cat"], GenerationConfig(method="faid", retrieval=RetrievalConfig(k=8)), database, faid=reloaded
    )
    assert out.tokens.shape == (1, janus.grid.size) and (out.tokens >= 0).all()
    assert not any(m._forward_hooks for m in janus.model.modules())


def test_training_from_sampled_queries_saves_an_adapter_the_cli_generates_with(tmp_path, backend, database):
    from arrag.cli import main

    generator = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, backend.codebook_size, (12, backend.grid.size), generator=generator).numpy()
    captions = ["a red 7", "two blue 3s", "a 5 left of a 1"] * 4
    train_config = TrainConfig(steps=3, batch_size=4, learning_rate=1e-3, warmup_steps=1, checkpoint_every=3)
    out = tmp_path / "adapter"
    adapter = train_faid(
        backend, captions, tokens, database, out, FaidConfig(k=4), train_config, "sampled", 0.5, {"command": "test"}
    )
    description = json.loads((out / "config.json").read_text())
    assert description["query_source"] == "sampled" and description["command"] == "test"
    assert description["trainable_parameters"] == adapter.trainable_parameters()
    saved = set(load_file(out / "model.safetensors"))
    assert saved == set(adapter.state_dict()) and not any("blocks" in name for name in saved)  # adapter only
    with pytest.raises(ValueError, match="weights"):
        load_adapter(out, tiny_backend(seed=1))  # another base model
    database.save(tmp_path / "db")
    args = ["generate", "a red 7", "--backend", "tiny", "--db", str(tmp_path / "db"), "--method", "faid"]
    assert main([*args, "--faid", str(out), "--out", str(tmp_path / "images")]) == 0
    sidecars = list((tmp_path / "images").glob("*.json"))
    assert sidecars and json.loads(sidecars[0].read_text())["config"]["method"] == "faid"
    assert main(args) == 2  # no adapter is shipped for the tiny backend
