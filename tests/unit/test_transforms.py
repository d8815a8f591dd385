"""Statistical and exact checks of the DeepLab train/eval transforms."""

import pickle

import numpy as np
import pytest
import torch

from deeplab_core.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    mean_pixel,
    normalize,
)


def _image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _reference_normalize(image):
    """(x / 255 - mean) / std in float64, channel first."""
    x = (image.astype(np.float64) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return torch.from_numpy(x.transpose(2, 0, 1).astype(np.float32))


def test_normalize_matches_formula_including_views():
    image = _image(37, 53)
    expected = _reference_normalize(image)
    out = normalize(image, IMAGENET_MEAN, IMAGENET_STD)
    assert out.dtype == torch.float32 and out.shape == (3, 37, 53)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # Strided and flipped views (what a crop/flip produces) are handled too.
    torch.testing.assert_close(normalize(image[5:30, 10:40]), expected[:, 5:30, 10:40], atol=1e-5, rtol=0)
    torch.testing.assert_close(normalize(image[:, ::-1]), expected.flip(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(20, 30), (90, 70), (400, 600)])
def test_output_is_exactly_the_crop_size(size):
    transform = TrainTransform(crop_size=65)
    image, mask = _image(*size), np.zeros(size, np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = transform(image, mask, rng)
        assert x.shape == (3, 65, 65) and x.dtype == torch.float32
        assert y.shape == (65, 65) and y.dtype == torch.int64


def test_rectangular_crop_and_default_voc_size():
    x, y = TrainTransform(crop_size=(48, 80))(_image(30, 40), np.zeros((30, 40), np.uint8), np.random.default_rng(1))
    assert x.shape == (3, 48, 80) and y.shape == (48, 80)
    x, y = TrainTransform()(_image(375, 500), np.zeros((375, 500), np.uint8), np.random.default_rng(1))
    assert x.shape == (3, 513, 513) and y.shape == (513, 513)


def test_sampled_parameters_cover_the_configured_ranges():
    transform = TrainTransform(crop_size=100, scale_range=(0.5, 1.5), flip_prob=0.5)
    rng = np.random.default_rng(0)
    params = [transform.sample_params(rng, 200, 300) for _ in range(3000)]
    scales = np.array([p.scale for p in params])
    assert scales.min() >= 0.5 and scales.max() <= 1.5
    assert scales.min() < 0.52 and scales.max() > 1.48  # covers the whole range
    counts, _ = np.histogram(scales, bins=5, range=(0.5, 1.5))
    assert counts.min() > 0.8 * len(scales) / 5  # roughly uniform
    flips = np.mean([p.flip for p in params])
    assert 0.45 < flips < 0.55
    for p in params:  # the crop window always starts inside the padded, scaled image
        scaled_h, scaled_w = p.scaled_size
        assert 0 <= p.top <= max(scaled_h, 100) - 100 and 0 <= p.left <= max(scaled_w, 100) - 100
    lefts = np.array([p.left for p in params if p.scale > 1.4])
    span = 1.4 * 300 - 100  # the smallest possible range of offsets in this subset
    assert lefts.min() < 0.05 * span and lefts.max() > 0.95 * span


def test_applied_scale_measured_through_an_object_of_known_size():
    # A 40x40 square of label 1 in a 100x100 image; the crop (200) holds the whole scaled image,
    # so the label-1 area after the transform is (40 * s)^2.
    transform = TrainTransform(crop_size=200, scale_range=(0.5, 1.5), flip_prob=0.5)
    image = _image(100, 100)
    mask = np.zeros((100, 100), np.uint8)
    mask[30:70, 30:70] = 1
    rng = np.random.default_rng(3)
    measured = []
    for _ in range(200):
        params = transform.sample_params(rng, 100, 100)
        _, y = transform.apply(image, mask, params)
        side = np.sqrt((y == 1).sum().item())
        measured.append(side / 40)
        assert abs(side / 40 - params.scale) < 1.5 / 40  # within rounding of one pixel
    measured = np.array(measured)
    assert measured.min() < 0.55 and measured.max() > 1.45
    assert measured.min() >= 0.5 - 1 / 40 and measured.max() <= 1.5 + 1 / 40


def test_padding_uses_mean_pixel_and_ignore_index_never_zero():
    transform = TrainTransform(crop_size=64, scale_range=(1.0, 1.0), flip_prob=0.0)
    image = _image(20, 30)
    mask = np.zeros((20, 30), np.uint8)  # all background: a zero pad would be invisible otherwise
    x, y = transform(image, mask, np.random.default_rng(0))
    padded = y == 255
    assert padded.sum().item() == 64 * 64 - 20 * 30
    assert (y[:20, :30] == 0).all()  # the image itself sits at the top-left, unchanged
    assert x[:, padded].abs().max().item() < 0.02  # mean pixel normalises to ~0
    torch.testing.assert_close(x[:, :20, :30], _reference_normalize(image), atol=1e-5, rtol=0)
    assert mean_pixel(IMAGENET_MEAN) == (124, 116, 104)


def test_padding_with_custom_ignore_index():
    transform = TrainTransform(crop_size=32, scale_range=(0.5, 0.5), ignore_index=254)
    _, y = transform(_image(20, 20), np.full((20, 20), 3, np.uint8), np.random.default_rng(0))
    assert set(torch.unique(y).tolist()) == {3, 254}


def test_flip_prob_one_mirrors_flip_prob_zero():
    image = _image(150, 210)
    mask = np.random.default_rng(1).integers(0, 21, (150, 210)).astype(np.uint8)
    for seed in range(5):
        x0, y0 = TrainTransform(crop_size=120, flip_prob=0.0)(image, mask, np.random.default_rng(seed))
        x1, y1 = TrainTransform(crop_size=120, flip_prob=1.0)(image, mask, np.random.default_rng(seed))
        torch.testing.assert_close(x1, x0.flip(-1), atol=0, rtol=0)
        assert torch.equal(y1, y0.flip(-1))


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_mask_values_are_preserved_without_interpolation(dtype):
    values = np.array([0, 3, 9, 20])
    mask = values[np.random.default_rng(0).integers(0, 4, (60, 80))].astype(dtype)
    # Blocky labels, so an interpolating resize would create in-between values.
    mask = np.kron(mask[:15, :20], np.ones((4, 4), dtype))
    transform = TrainTransform(crop_size=90, scale_range=(0.3, 2.7))
    rng = np.random.default_rng(1)
    for _ in range(30):
        _, y = transform(_image(60, 80), mask, rng)
        assert y.dtype == torch.int64
        assert set(torch.unique(y).tolist()) <= {0, 3, 9, 20, 255}


def test_mask_stays_aligned_with_the_image():
    # Label = "pixel is bright": after any scale/crop/flip the labels must still match the image.
    image = np.zeros((80, 120, 3), np.uint8)
    image[20:60, 30:90] = 255
    mask = (image[..., 0] > 0).astype(np.uint8)
    transform = TrainTransform(crop_size=100)
    rng = np.random.default_rng(2)
    for _ in range(20):
        x, y = transform(image, mask, rng)
        bright = x[0] > 1.0  # normalised 255 is ~2.2, normalised 0 is ~-2.1, the mean pad ~0
        agree = (bright == (y == 1))[y != 255].float().mean().item()
        assert agree > 0.98  # only the one-pixel bilinear rim may differ


def test_seeded_rng_is_deterministic_and_seeds_differ():
    transform = TrainTransform(crop_size=64)
    image, mask = _image(100, 90), np.random.default_rng(5).integers(0, 5, (100, 90)).astype(np.uint8)
    a = transform(image, mask, np.random.default_rng(42))
    b = transform(image, mask, np.random.default_rng(42))
    c = transform(image, mask, np.random.default_rng(43))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    x, y = transform(image, None)  # rng=None: a fresh generator; mask optional
    assert x.shape == (3, 64, 64) and y is None


def test_eval_transform_keeps_size_and_matches_normalize():
    image = _image(45, 67)
    mask = np.random.default_rng(0).integers(0, 21, (45, 67)).astype(np.uint8)
    x, y = EvalTransform()(image, mask)
    assert x.shape == (3, 45, 67) and y.shape == (45, 67) and y.dtype == torch.int64
    assert torch.equal(x, normalize(image, IMAGENET_MEAN, IMAGENET_STD))
    assert torch.equal(y, torch.from_numpy(mask.astype(np.int64)))
    assert EvalTransform()(image, None)[1] is None


def test_transforms_are_picklable_dataclasses():
    transform = TrainTransform(crop_size=(32, 48), scale_range=(0.75, 1.25), flip_prob=0.3)
    restored = pickle.loads(pickle.dumps(transform))
    assert restored == transform and restored.crop_hw == (32, 48)
    assert pickle.loads(pickle.dumps(EvalTransform())) == EvalTransform()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"crop_size": 0},
        {"crop_size": -5},
        {"crop_size": (10, 0)},
        {"scale_range": (0.0, 1.0)},
        {"scale_range": (-1.0, 1.0)},
        {"scale_range": (1.5, 0.5)},
        {"flip_prob": 1.5},
        {"flip_prob": -0.1},
        {"std": (0.2, 0.0, 0.2)},
        {"mean": (0.5, 0.5)},
        {"ignore_index": 300},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        TrainTransform(**kwargs)


@pytest.mark.parametrize("transform", [TrainTransform(crop_size=16), EvalTransform()])
def test_bad_inputs_raise(transform):
    good_mask = np.zeros((20, 20), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        transform(_image(20, 20).astype(np.float32), good_mask)
    with pytest.raises(ValueError, match="HxWx3"):
        transform(np.zeros((20, 20), np.uint8), good_mask)
    with pytest.raises(ValueError, match="HxWx3"):
        transform(np.zeros((20, 20, 4), np.uint8), good_mask)
    with pytest.raises(ValueError, match="does not match"):
        transform(_image(20, 20), np.zeros((20, 21), np.uint8))
    with pytest.raises(ValueError, match="integer"):
        transform(_image(20, 20), np.zeros((20, 20), np.float32))
    with pytest.raises(TypeError):
        transform(torch.zeros(20, 20, 3, dtype=torch.uint8), good_mask)
