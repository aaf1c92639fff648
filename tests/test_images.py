import resource

import numpy as np
import pytest
from PIL import Image

from arrag.images import _RESAMPLE, ImageReadError, Preprocessing, find_images, read_image, to_rgb


def resized_then_cropped(image: Image.Image, size: int, resample: str) -> np.ndarray:
    """The reference: the whole image resized (shorter side to ``size``), then the centre square cropped."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    left, top = (width - size) // 2, (height - size) // 2
    image = image.convert("RGB").resize((width, height), _RESAMPLE[resample])
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32)
    return pixels.transpose(2, 0, 1) / 127.5 - 1


@pytest.mark.parametrize("resample", ["bicubic", "bilinear", "lanczos"])
@pytest.mark.parametrize(
    ("width", "height", "size"), [(123, 77, 64), (77, 123, 64), (640, 480, 32), (17, 29, 48), (84, 194, 64)]
)
def test_preprocessing_gives_the_resized_then_cropped_square(width, height, size, resample):
    noise = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(noise)  # noise: any misplaced or mis-rounded sample shows
    pixels = Preprocessing(size, resample)(image).numpy()
    assert np.allclose(pixels, resized_then_cropped(image, size, resample), atol=1e-6)


def test_an_extreme_aspect_ratio_resamples_only_the_square():
    gradient = np.linspace(0, 255, 65000).round().astype(np.uint8)
    strip = Image.fromarray(np.repeat(gradient[None, :, None], 3, axis=2))  # 65000×1, 273 bytes as a PNG
    # A process-wide high-water mark: it can miss a regression after a bigger earlier peak, never flag a fix.
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pixels = Preprocessing(64)(strip)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib < 200_000  # resize-then-crop: 1.3 GB
    assert pixels.shape == (3, 64, 64)
    assert np.allclose(pixels.numpy(), 0, atol=0.03)  # the middle of the gradient, 127.5 of 255
    assert np.all(np.diff(pixels.numpy(), axis=2) >= 0)


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    gradient = np.linspace(0, 65535, 64)[None, :].repeat(64, axis=0)
    Image.fromarray(gradient.astype(np.uint16)).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    assert image.mode == "RGB"
    expected = np.round(gradient.astype(np.uint16) * (255 / 65535))
    assert np.array_equal(np.asarray(image)[..., 0], expected)
    with Image.open(tmp_path / "deep.png") as deep:  # the tokenizer's preprocessing, given the 16-bit image itself
        assert deep.mode == "I;16"
        pixels = Preprocessing(16)(deep).numpy()
    assert np.all(np.diff(pixels, axis=2) > 0)
    assert pixels.min() < -0.8
    assert pixels.max() > 0.8


def test_32_bit_integer_images_are_scaled_only_beyond_8_bits():
    small = np.arange(256, dtype=np.int32).reshape(16, 16)
    assert Image.fromarray(small).mode == "I"
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(small)))[..., 0], small)
    deep = np.arange(0, 65536, 256, dtype=np.int32).reshape(16, 16)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(deep)))[..., 0], np.round(deep * (255 / 65535)))


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (-3.0, 500.0)])
def test_a_float_tiff_is_scaled_from_0_1_or_else_its_own_range(tmp_path, low, high):
    gradient = np.linspace(low, high, 256, dtype=np.float32)[None, :].repeat(8, axis=0)
    Image.fromarray(gradient).save(tmp_path / "float.tif")
    image = read_image(tmp_path / "float.tif")
    expected = np.round((gradient.astype(np.float64) - low) / (high - low) * 255)
    assert np.array_equal(np.asarray(image)[..., 0], expected)


def test_find_images_follows_symlinked_folders_once_and_drops_repeated_files(tmp_path, caplog):
    (tmp_path / "photos" / "more").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for path in [
        tmp_path / "photos" / "a.png",
        tmp_path / "photos" / "more" / "b.png",
        tmp_path / "elsewhere" / "c.png",
    ]:
        Image.new("RGB", (4, 4)).save(path)
    (tmp_path / "photos" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "photos" / "more" / "loop").symlink_to(tmp_path / "photos")
    found = find_images([tmp_path / "photos", tmp_path / "photos" / "a.png"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "photos/a.png",
        "photos/linked/c.png",
        "photos/more/b.png",
    ]
    assert "dropped 1 duplicate input files" in caplog.text


def test_an_undecodable_stream_is_named_without_an_object_address():
    with pytest.raises(ImageReadError) as refused:
        read_image(b"not an image")
    assert str(refused.value) == "UnidentifiedImageError: cannot identify image file"
