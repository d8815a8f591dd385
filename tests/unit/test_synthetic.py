"""The synthetic scene generator: determinism, format, class statistics and calibrated difficulty."""

import time

import cv2
import numpy as np
import pytest

from deeplab_core.synthetic import (
    CLASS_NAMES,
    IGNORE_INDEX,
    SyntheticSpec,
    render_scene,
)

SPEC = SyntheticSpec()


def _scenes(spec, seeds):
    images, masks = zip(*(render_scene(spec, seed) for seed in seeds))
    return np.stack(images), np.stack(masks)


def _miou(pred, target, num_classes):
    valid = target != IGNORE_INDEX
    cm = np.bincount(target[valid].astype(np.int64) * num_classes + pred[valid],
                     minlength=num_classes ** 2).reshape(num_classes, num_classes)
    iou = np.diag(cm) / np.maximum(cm.sum(0) + cm.sum(1) - np.diag(cm), 1)
    return float(iou.mean())


def test_same_seed_same_scene_and_different_seeds_differ():
    image_a, mask_a = render_scene(SPEC, 7)
    image_b, mask_b = render_scene(SPEC, 7)
    assert np.array_equal(image_a, image_b) and np.array_equal(mask_a, mask_b)
    image_c, mask_c = render_scene(SPEC, 8)
    assert not np.array_equal(image_a, image_c) and not np.array_equal(mask_a, mask_c)


@pytest.mark.parametrize("height,width", [(96, 128), (33, 47), (384, 512), (375, 500)])
def test_shapes_dtypes_and_mask_values(height, width):
    spec = SyntheticSpec(height=height, width=width)
    for seed in range(3):
        image, mask = render_scene(spec, seed)
        assert image.shape == (height, width, 3) and image.dtype == np.uint8
        assert mask.shape == (height, width) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= set(range(spec.num_classes)) | {IGNORE_INDEX}


def test_fewer_classes_only_uses_those_labels():
    spec = SyntheticSpec(num_classes=3)
    _, masks = _scenes(spec, range(20))
    assert set(np.unique(masks).tolist()) == {0, 1, 2, IGNORE_INDEX}


def test_every_class_appears_with_sensible_frequencies():
    _, masks = _scenes(SPEC, range(48))
    labelled = masks[masks != IGNORE_INDEX]
    frequency = np.bincount(labelled, minlength=SPEC.num_classes) / labelled.size
    assert len(CLASS_NAMES) == SPEC.num_classes
    assert 0.55 < frequency[0] < 0.85  # background dominates, as in VOC (~70 %)
    assert (frequency[1:] > 0.01).all() and (frequency[1:] < 0.15).all()
    scenes_with_class = [(masks == c).any(axis=(1, 2)).mean() for c in range(1, SPEC.num_classes)]
    assert min(scenes_with_class) > 0.3  # every class turns up in many scenes
    ignore_fraction = (masks == IGNORE_INDEX).mean()
    assert 0.01 < ignore_fraction < 0.12  # a thin band, not a blanket


def test_ignore_band_lies_exactly_on_label_boundaries():
    spec_band, spec_plain = SyntheticSpec(ignore_width=1), SyntheticSpec(ignore_width=0)
    for seed in range(5):
        image_band, mask_band = render_scene(spec_band, seed)
        image_plain, mask_plain = render_scene(spec_plain, seed)
        assert np.array_equal(image_band, image_plain)  # the band is in the mask only
        assert IGNORE_INDEX not in mask_plain
        boundary = cv2.morphologyEx(mask_plain, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) != 0
        assert np.array_equal(mask_band == IGNORE_INDEX, boundary)
        assert np.array_equal(mask_band[~boundary], mask_plain[~boundary])


def test_objects_vary_widely_in_scale():
    # Connected components of the object classes: areas spanning well over an order of magnitude.
    _, masks = _scenes(SyntheticSpec(ignore_width=0), range(30))
    areas = []
    for mask in masks:
        for c in range(1, SPEC.num_classes):
            count, _, stats, _ = cv2.connectedComponentsWithStats((mask == c).astype(np.uint8))
            areas.extend(stats[1:, cv2.CC_STAT_AREA].tolist())
    areas = np.array(areas)
    assert np.percentile(areas, 90) / np.percentile(areas, 10) > 20


def _colour_features(images):
    return images.reshape(-1, 3).astype(np.float64)


def _local_features(images):
    """Colour plus local texture statistics (grey-level std at three window sizes, colour minus
    its local mean, gradient magnitude): the cheapest "spatial" classifier input."""
    rows = []
    for image in images:
        colour = image.astype(np.float32)
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
        parts = [colour]
        for k in (5, 11, 21):
            mean = cv2.blur(grey, (k, k))
            parts.append(np.sqrt(np.maximum(cv2.blur(grey * grey, (k, k)) - mean * mean, 0))[..., None])
            parts.append(colour - cv2.blur(colour, (k, k)))
        gx, gy = cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1)
        parts.append(np.sqrt(gx * gx + gy * gy)[..., None])
        features = np.concatenate(parts, axis=-1)
        rows.append(features.reshape(-1, features.shape[-1]))
    return np.concatenate(rows).astype(np.float64)


def _gaussian_classifier(features, labels, num_classes):
    """Per-class full-covariance Gaussian with class priors (the Bayes-optimal classifier if the
    features were Gaussian per class)."""
    models = []
    for c in range(num_classes):
        x = features[labels == c]
        cov = np.cov(x.T) + 1e-3 * np.eye(features.shape[1])
        models.append((x.mean(0), np.linalg.inv(cov), np.linalg.slogdet(cov)[1], np.log(len(x) / len(features))))

    def predict(queries):
        scores = [
            -0.5 * np.einsum("ij,jk,ik->i", queries - mean, inv, queries - mean) - 0.5 * logdet + log_prior
            for mean, inv, logdet, log_prior in models
        ]
        return np.argmax(np.stack(scores, axis=1), axis=1)

    return predict


def test_per_pixel_colour_classifiers_stay_below_calibrated_ceiling():
    """Calibration guard (docs/data.md): a pixel's colour must not give its class away, while
    local spatial statistics must. Measured at the defaults: nearest class mean ~0.06 mIoU,
    Gaussian colour classifier ~0.12 (= predicting background everywhere), Gaussian on local
    texture features ~0.25."""
    num_classes = SPEC.num_classes
    train_images, train_masks = _scenes(SPEC, range(24))
    test_images, test_masks = _scenes(SPEC, range(1000, 1024))
    train_labels, test_labels = train_masks.reshape(-1), test_masks.reshape(-1)
    valid = train_labels != IGNORE_INDEX

    colour = _colour_features(train_images)[valid]
    class_means = np.stack([colour[train_labels[valid] == c].mean(0) for c in range(num_classes)])
    test_colour = _colour_features(test_images)
    nearest_mean = ((test_colour[:, None, :] - class_means[None]) ** 2).sum(-1).argmin(1)
    ncm_miou = _miou(nearest_mean, test_labels, num_classes)

    gaussian_colour = _gaussian_classifier(colour, train_labels[valid], num_classes)
    colour_miou = _miou(gaussian_colour(test_colour), test_labels, num_classes)

    local = _local_features(train_images)[valid]
    gaussian_local = _gaussian_classifier(local, train_labels[valid], num_classes)
    local_miou = _miou(gaussian_local(_local_features(test_images)), test_labels, num_classes)

    background_only = _miou(np.zeros_like(test_labels), test_labels, num_classes)
    assert ncm_miou < 0.12
    assert colour_miou < background_only + 0.04  # colour adds (almost) nothing over "all background"
    assert local_miou > colour_miou + 0.08  # the signal is spatial


def test_render_time_is_a_few_milliseconds():
    render_scene(SPEC, 0)
    start = time.process_time()
    for seed in range(20):
        render_scene(SPEC, seed)
    per_scene = (time.process_time() - start) / 20
    assert per_scene < 0.02  # ~3 ms measured on one core; generous for loaded CI machines


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 1},
        {"num_classes": len(CLASS_NAMES) + 1},
        {"height": 4},
        {"min_objects": 5, "max_objects": 2},
        {"min_object_size": 0.0},
        {"min_object_size": 0.5, "max_object_size": 0.2},
        {"noise_std": -1.0},
        {"colour_spread": -0.5},
        {"ignore_width": -1},
    ],
)
def test_bad_spec_raises(kwargs):
    with pytest.raises(ValueError):
        SyntheticSpec(**kwargs)
