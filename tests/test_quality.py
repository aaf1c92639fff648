"""Offline image-quality statistics: the EfficientNet-Lite0 network, Fréchet distance and KID, digit features."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from arrag.evaluation.quality import (
    EfficientNetLite0Features,
    ImageQuality,
    QualityConfig,
    as_float_images,
    compare,
    extract_features,
    quality_from_features,
)
from arrag.models.efficientnet_lite import SameConv2d, load_efficientnet_lite0, normalise
from conftest import blob_images


def stack(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])  # (N, H, W, 3) uint8


def blurred(images: np.ndarray, radius: float) -> np.ndarray:
    return stack([Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)) for image in images])


def test_same_padding_puts_the_odd_pixel_right_and_below_like_tensorflow():
    conv = SameConv2d(1, 1, 3, 2, bias=False)
    conv.weight.data.fill_(1.0)
    out = conv(torch.ones(1, 1, 4, 4))  # TF SAME: output 2×2, padding 0 before and 1 after
    assert out.shape == (1, 1, 2, 2)
    assert out[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]
    assert conv(torch.ones(1, 1, 5, 5)).shape == (1, 1, 3, 3)  # odd: one pixel each side


def test_efficientnet_lite0_recognises_the_cat_and_the_espresso():
    """Architecture, weights and input scaling together: ImageNet classes of two real photos."""
    data = pytest.importorskip("skimage.data")
    cat = as_float_images(data.chelsea()[None])
    espresso = as_float_images(data.coffee()[None])
    network = load_efficientnet_lite0()
    with torch.no_grad():
        top = [network(normalise(image)).argmax(-1).item() for image in (cat, espresso)]
    assert 281 <= top[0] <= 285  # the domestic cat classes (tabby, tiger cat, Persian, Siamese, Egyptian cat)
    assert top[1] == 967  # espresso


@pytest.fixture(scope="module")
def efficientnet() -> EfficientNetLite0Features:
    return EfficientNetLite0Features()


@pytest.fixture(scope="module")
def blob_sets() -> dict[str, np.ndarray]:
    real, other = stack(blob_images(24, seed=0)), stack(blob_images(24, seed=1))
    noise = np.random.default_rng(0).normal(0, 40, other.shape)
    noisy = np.clip(other + noise, 0, 255).astype(np.uint8)
    return {"real": real, "other": other, "blurred": blurred(other, 2.0), "noisy": noisy}


@pytest.fixture(scope="module")
def blob_features(efficientnet, blob_sets) -> dict[str, torch.Tensor]:
    return {name: extract_features(efficientnet, images) for name, images in blob_sets.items()}


def test_identical_sets_are_at_distance_zero_and_degraded_sets_are_further(blob_features):
    config = QualityConfig(kid_subsets=10)
    scores = {
        name: quality_from_features(blob_features["real"], features, "EfficientNet-Lite0 features", config)
        for name, features in blob_features.items()
    }
    assert abs(scores["real"].frechet_distance) < 1e-3
    assert scores["other"].frechet_distance > 1.0  # same kind of picture, other samples: not zero either
    for degraded in ("blurred", "noisy"):
        assert scores[degraded].frechet_distance > 2 * scores["other"].frechet_distance
        assert scores[degraded].kid > scores["other"].kid
    assert scores["real"].kid < scores["other"].kid


def test_statistics_are_deterministic_and_kid_subsets_follow_the_seed(efficientnet, blob_sets):
    real, blurred = blob_sets["real"][:12], blob_sets["blurred"][:12]
    config = QualityConfig(kid_subsets=5, kid_subset_size=6, seed=3)
    first = compare(real, blurred, efficientnet, config)
    again = compare(real, blurred, efficientnet, config)
    assert first == again
    assert first.kid_subset_size == 6 and first.real_images == first.generated_images == 12
    other_seed = compare(
        real, blurred, efficientnet, QualityConfig(batch_size=5, kid_subsets=5, kid_subset_size=6, seed=4)
    )
    assert other_seed.frechet_distance == pytest.approx(first.frechet_distance, rel=1e-6)  # other batches
    assert other_seed.kid != first.kid


def test_every_image_layout_gives_the_same_features(efficientnet, blob_sets):
    channels_last = blob_sets["real"][:4]  # (4, H, W, 3) uint8
    as_uint8 = torch.from_numpy(channels_last).permute(0, 3, 1, 2)
    features = [extract_features(efficientnet, images) for images in (channels_last, as_uint8, as_uint8 / 255.0)]
    assert features[0].shape == (4, 1280)
    torch.testing.assert_close(features[0], features[1], rtol=0, atol=0)
    torch.testing.assert_close(features[0], features[2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        as_float_images(as_uint8.float())
    with pytest.raises(ValueError, match="N, H, W, 3"):
        as_float_images(channels_last.astype(np.float32))


def test_image_quality_names_say_which_features(efficientnet, blob_sets):
    real, blurred = blob_sets["real"][:12], blob_sets["blurred"][:12]
    quality = ImageQuality([efficientnet], QualityConfig(kid_subsets=5))
    first = quality(real, blurred)
    assert set(first) == {
        "Fréchet distance (EfficientNet-Lite0 features)",
        "KID (EfficientNet-Lite0 features)",
        "KID std (EfficientNet-Lite0 features)",
    }
    assert not any("FID" in name for name in first)
    direct = compare(real, blurred, efficientnet, QualityConfig(kid_subsets=5))
    assert first == direct.named()
    assert quality(real, blurred) == first  # the real features come from the cache


@pytest.fixture(scope="module")
def world():
    from arrag.world.report import eval_scenes, load_checker

    return load_checker(), eval_scenes(200, seed=21)[1], eval_scenes(200, seed=22)[1]


def test_digit_embeddings_are_what_the_classifier_reads_and_cover_every_object(world):
    from arrag.world.checker import object_crops
    from arrag.world.features import object_features

    checker, scenes, _ = world
    crops = torch.from_numpy(np.concatenate([object_crops(scene) for scene in scenes[:8]]))[:, None]
    classifier = checker.classifier
    with torch.no_grad():
        torch.testing.assert_close(classifier.head[-1](classifier.embed(crops)), classifier(crops))
    embeddings, owners = object_features(classifier, scenes[:8])
    assert embeddings.shape == (len(crops), 128)
    assert np.bincount(owners, minlength=8).tolist() == [len(checker.detect(scene)) for scene in scenes[:8]]


@pytest.mark.parametrize(("unit", "factor"), [("objects", 3.0), ("scene", 1.2)])  # measured: 4.7 and 1.5
def test_digit_features_tell_blurred_scenes_from_real_ones(world, unit, factor):
    from arrag.world.features import DigitFeatures

    checker, real, other = world
    features = DigitFeatures(checker.classifier, unit)
    assert features.name.startswith("digit-classifier features")
    config = QualityConfig(kid_subsets=10, kid_subset_size=100)
    same = compare(real, real, features, config)
    fresh = compare(real, other, features, config)
    degraded = compare(real, blurred(other, 1.5), features, config)
    assert abs(same.frechet_distance) < 1e-3
    assert degraded.frechet_distance > factor * fresh.frechet_distance
    assert degraded.kid > fresh.kid
