"""Janus-Pro through transformers, on tiny random configurations built here (no download)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from arrag.backends.janus import JanusBackend, check_janus_config, load_janus
from arrag.build import BuildConfig, build_database
from arrag.config import GenerationConfig, RetrievalConfig, SamplingConfig
from arrag.decoding.loop import generate
from arrag.retrieval.database import PatchDatabase
from janus_tiny import tiny_janus_config, tiny_janus_model, tiny_janus_processor


@pytest.fixture(scope="module")
def janus() -> JanusBackend:
    return JanusBackend(tiny_janus_model(), tiny_janus_processor(), "tiny-janus")


def package_photos() -> list[Path]:
    """Real photos shipped inside the scikit-image and scikit-learn wheels (read from disk, not imported)."""
    photos = []
    for package, folder, names in [
        ("skimage", "data", ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png"]),
        ("sklearn", "datasets/images", ["china.jpg", "flower.jpg"]),
    ]:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            pytest.skip(f"{package} is not installed")
        root = Path(next(iter(spec.submodule_search_locations))) / folder
        photos += [root / name for name in names]
    return photos


@pytest.mark.parametrize(("guidance", "seed"), [(5.0, 0), (2.5, 3)])  # transformers needs CFG > 1
def test_tokens_equal_transformers_generate(janus, guidance, seed):
    """Retrieval off: arrag's loop draws exactly the tokens of transformers' generate(generation_mode='image')."""
    prompt = "a red cat on the sofa"
    inputs = janus.processor(
        text=janus.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": prompt}]}], add_generation_prompt=True
        ),
        generation_mode="image",
        return_tensors="pt",
    )
    torch.manual_seed(seed)
    reference = janus.model.generate(
        **inputs, generation_mode="image", do_sample=True, guidance_scale=guidance, top_k=0, temperature=1.0
    )
    ours = generate(janus, [prompt], GenerationConfig(sampling=SamplingConfig(guidance_scale=guidance)), seeds=[seed])
    assert torch.equal(ours.tokens, reference)


def test_encode_is_the_normalised_argmin_and_decode_round_trips(janus):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vq = janus.model.model.vqmodel
    with torch.no_grad():
        z = F.normalize(vq.quant_conv(vq.encoder(images)).flatten(2).transpose(1, 2), dim=-1)  # (N, T, d)
        codebook = F.normalize(vq.quantize.embedding.weight, dim=-1)
        expected = torch.cdist(z, codebook[None].expand(2, -1, -1)).argmin(-1)
    assert torch.equal(janus.encode(images), expected)
    assert janus.encode_latents(images).shape == (2, 16, 8)
    decoded = janus.decode(expected)
    assert decoded.shape == (2, 3, 16, 16)
    assert decoded.min() >= 0
    assert decoded.max() <= 1


def stored_entries(database: PatchDatabase) -> tuple[np.ndarray, np.ndarray]:
    """Every stored key and its next token, read back from the index (not through search)."""
    keys = database.index.reconstruct_n(0, len(database))  # (N, D) in entry order
    return keys, np.asarray(database.next_tokens)


def test_text_to_image_with_daid_on_a_database_of_real_photos(janus, tmp_path):
    report = build_database(janus, package_photos(), tmp_path / "db", BuildConfig(batch_size=3))
    assert report.images_added == 7
    assert report.skipped == []
    database = PatchDatabase.load(tmp_path / "db")
    assert len(database) == 7 * 3 * 2  # 4×4 grid: rows 1-3, columns 1-2 have all four L neighbours
    config = GenerationConfig(
        method="daid", retrieval=RetrievalConfig(weight=1.0, temperature=1e-6, k=1), num_images_per_prompt=2
    )
    out = generate(janus, ["a red cat", "a blue dog on the sofa"], config, database)
    assert out.images.shape == (4, 3, 16, 16)
    keys, values = stored_entries(database)
    codebook = janus.code_vectors(torch.arange(janus.codebook_size)).numpy()
    grid = janus.grid
    for row in range(4):
        for t in database.positions:
            r, c = grid.cell(t)
            cells = [(r - 1, c - 1), (r - 1, c), (r - 1, c + 1), (r, c - 1)]
            query = np.concatenate([codebook[out.tokens[row, grid.index(a, b)]] for a, b in cells])
            distances = ((keys - query) ** 2).sum(-1)
            assert out.tokens[row, t].item() in set(values[distances <= distances.min() + 1e-4].tolist())
            assert out.records.image_ids[row, t] >= 0


def test_a_batch_of_prompts_of_different_lengths_equals_single_runs(janus):
    """Left padding, positions and the CFG halves are per row: batching changes nothing (greedy decoding)."""
    prompts = ["a cat", "a red dog on the sofa", "the photo of a blue cat on a sofa"]
    greedy = GenerationConfig(sampling=SamplingConfig(top_k=1, guidance_scale=3.0))
    batch = generate(janus, prompts, greedy)
    for row, prompt in enumerate(prompts):
        assert torch.equal(generate(janus, [prompt], greedy).tokens[0], batch.tokens[row]), prompt


def test_configurations_that_cannot_generate_are_refused():
    with pytest.raises(ValueError, match="image_token_embed_dim"):
        check_janus_config(tiny_janus_config(projection_dim=10))
    config = tiny_janus_config()
    config.vision_config.num_image_tokens = 4
    with pytest.raises(ValueError, match="num_image_tokens"):
        check_janus_config(config)


def test_a_model_missing_offline_gives_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="local folder"):
        load_janus("deepseek-community/Janus-Pro-1B")


def test_a_saved_janus_folder_loads_through_the_registry(janus, tmp_path):
    from arrag.backends import load_backend

    janus.model.save_pretrained(tmp_path / "janus")
    janus.processor.save_pretrained(tmp_path / "janus")
    loaded = load_backend(str(tmp_path / "janus"))
    assert loaded.codebook_fingerprint == janus.codebook_fingerprint
    assert loaded.grid == janus.grid
