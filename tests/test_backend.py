"""The backend contract, run on every backend available without a download."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arrag.backends import Backend, FaidCapable, load_backend, parse_name
from arrag.backends.builtin import tiny_backend
from arrag.models.transformer import encode_captions
from conftest import blob_images

BACKENDS = ["tiny", "tiny:3", "builtin", "janus"]


@pytest.fixture(scope="module")
def janus_folder(tmp_path_factory) -> Path:
    """The tiny random Janus config saved as a checkpoint folder, so it loads by name like a downloaded one."""
    pytest.importorskip("transformers")
    from janus_tiny import tiny_janus_model, tiny_janus_processor

    folder = tmp_path_factory.mktemp("janus")
    tiny_janus_model().save_pretrained(folder)
    tiny_janus_processor().save_pretrained(folder)
    return folder


@pytest.fixture(params=BACKENDS, scope="module")
def any_backend(request) -> Backend:
    if request.param == "janus":
        return load_backend(f"janus:{request.getfixturevalue('janus_folder')}")
    return load_backend(request.param)


def test_a_backend_name_loads_the_same_backend(any_backend):
    """Databases and sidecars store the name: it must round-trip through the registry."""
    again = load_backend(any_backend.name)
    assert again.name == any_backend.name
    assert again.codebook_fingerprint == any_backend.codebook_fingerprint
    assert again.grid == any_backend.grid


def test_the_capabilities_are_declared(any_backend):
    assert isinstance(any_backend, Backend)
    assert isinstance(any_backend, FaidCapable)  # every shipped backend takes FAiD; the protocol allows not to


@pytest.mark.parametrize(
    ("name", "kind", "argument"),
    [
        ("builtin", "builtin", ""),
        ("builtin:/models/world", "builtin", "/models/world"),
        ("tiny", "tiny", ""),
        ("tiny-7", "tiny", "7"),  # the old spelling
        ("tiny:7", "tiny", "7"),
        ("deepseek-community/Janus-Pro-1B", "janus", "deepseek-community/Janus-Pro-1B"),  # the old spelling
        ("janus:deepseek-community/Janus-Pro-1B", "janus", "deepseek-community/Janus-Pro-1B"),
    ],
)
def test_names_parse_to_a_kind_and_argument(name, kind, argument):
    assert parse_name(name) == (kind, argument)


@pytest.mark.parametrize(
    ("name", "message"), [("gpt-image", "available: builtin"), ("tiny:x", "tiny:SEED"), ("janus:", "janus:ID")]
)
def test_bad_names_are_refused_with_what_to_write(name, message):
    with pytest.raises(ValueError, match=message):
        load_backend(name)


def test_protocol_and_shapes(any_backend):
    assert isinstance(any_backend, Backend)
    session = any_backend.start(["a red 7", "two cats"], guidance_scale=5.0)
    step = session.step(None)
    assert step.cond.shape == step.uncond.shape == (2, any_backend.codebook_size)
    step = session.step(torch.tensor([1, 2]))
    assert step.cond.shape == (2, any_backend.codebook_size)
    images = torch.stack([any_backend.preprocess(image) for image in blob_images(3)])
    assert images.shape == (3, 3, any_backend.image_size, any_backend.image_size)
    assert images.min() >= -1
    assert images.max() <= 1
    tokens = any_backend.encode(images)
    assert tokens.shape == (3, any_backend.grid.size)
    latents = any_backend.encode_latents(images)
    assert latents.shape == (3, any_backend.grid.size, any_backend.cell_dim)
    decoded = any_backend.decode(tokens)
    assert decoded.shape == images.shape
    assert decoded.min() >= 0
    assert decoded.max() <= 1
    vectors = any_backend.code_vectors(tokens)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3, any_backend.grid.size))


def test_encode_is_the_normalised_argmin(any_backend):
    """Tokens are the nearest L2-normalised codes of the L2-normalised latents (LlamaGen / Janus)."""
    images = torch.stack([any_backend.preprocess(image) for image in blob_images(2, seed=3)])
    latents = F.normalize(any_backend.encode_latents(images), dim=-1)  # (N, T, d)
    codebook = any_backend.code_vectors(torch.arange(any_backend.codebook_size))  # (V, d)
    distances = ((latents[..., None, :] - codebook) ** 2).sum(-1)  # (N, T, V)
    assert torch.equal(any_backend.encode(images), distances.argmin(-1))


def test_tiny_backends_are_deterministic_per_seed():
    assert tiny_backend(0).codebook_fingerprint == tiny_backend(0).codebook_fingerprint
    assert tiny_backend(0).codebook_fingerprint != tiny_backend(1).codebook_fingerprint


def test_cached_decoding_equals_the_full_forward(backend):
    """Step-by-step logits from the KV cache match one uncached pass over the whole sequence."""
    tokens = torch.randint(0, backend.codebook_size, (2, backend.grid.size), generator=torch.Generator().manual_seed(0))
    text = encode_captions(["a red 7", "two cats"], backend.transformer.config.max_text_len)
    with torch.no_grad():
        full = backend.transformer(text, tokens[:, :-1])[:, text.shape[1] - 1 :]  # (B, T, V)
    session = backend.start(["a red 7", "two cats"], guidance_scale=1.0)
    stepped = [session.step(None).cond] + [session.step(tokens[:, t]).cond for t in range(backend.grid.size - 1)]
    torch.testing.assert_close(torch.stack(stepped, dim=1), full, rtol=1e-4, atol=1e-5)


def test_guidance_rows_do_not_change_the_conditional_logits(backend):
    guided = backend.start(["a blue 3"], guidance_scale=5.0)
    plain = backend.start(["a blue 3"], guidance_scale=1.0)
    for token in [None, torch.tensor([4]), torch.tensor([9])]:
        a, b = guided.step(token), plain.step(token)
        torch.testing.assert_close(a.cond, b.cond, rtol=1e-5, atol=1e-6)
        assert b.uncond is None
        assert not torch.allclose(a.uncond, a.cond)


def test_overlong_captions_are_refused_with_the_limit(backend):
    with pytest.raises(ValueError, match="at most 48"):
        backend.start(["x" * 49], guidance_scale=1.0)


@torch.no_grad()
def test_session_steps_equal_teacher_forcing(any_backend):
    """What a session's steps say, with its cache and guidance layout, is what one teacher-forced pass says:
    the conditional logits for the prompts, the unconditional ones for guidance's empty prompt."""
    prompts, total = ["a red cat", "a blue dog on the sofa"], any_backend.grid.size
    tokens = torch.randint(0, any_backend.codebook_size, (2, total), generator=torch.Generator().manual_seed(0))
    conditional = any_backend.teacher_forced_logits(prompts, tokens)  # (B, T, V)
    unconditional = any_backend.teacher_forced_logits(prompts, tokens, torch.ones(2, dtype=torch.bool))
    session = any_backend.start(prompts, guidance_scale=5.0)
    steps = [session.step(None)] + [session.step(tokens[:, t].to(any_backend.device)) for t in range(total - 1)]
    torch.testing.assert_close(torch.stack([s.cond for s in steps], 1), conditional, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack([s.uncond for s in steps], 1), unconditional, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_torch_cannot_use_is_refused_in_one_line():
    for device, message in (("cuda", "not available to this torch"), ("gpu7", "not a device torch knows")):
        with pytest.raises(ValueError, match=message):
            load_backend("tiny", device)


def test_the_janus_backend_without_transformers_names_the_extra():
    """In a Python where transformers cannot be imported, the registry says what to install."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from arrag.backends import load_backend\n"
        "try:\n    load_backend('janus:some/model')\nexcept ValueError as error:\n    print(error)\n"
    )
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install "arrag[janus]"' in printed
