"""Dense CRF: validation, the no-pairwise identity, boundary refinement and width/height order."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from deeplab_core.constants import CRFParams
from deeplab_core.crf import dense_crf

NUM_CLASSES = 3
HEIGHT, WIDTH = 60, 90  # non-square on purpose: DenseCRF2D takes (width, height)


def piecewise_scene(noise_std: float = 8.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Constant-colour regions (a disc, a box, background) with mild pixel noise."""
    gt = np.zeros((HEIGHT, WIDTH), np.uint8)
    cv2.circle(gt, (30, 30), 18, 1, -1)
    cv2.rectangle(gt, (55, 8), (84, 52), 2, -1)
    colours = np.array([[40, 40, 40], [210, 50, 50], [50, 190, 70]], np.float32)
    noise = np.random.default_rng(seed).normal(0, noise_std, (HEIGHT, WIDTH, 3))
    image = np.clip(colours[gt] + noise, 0, 255).astype(np.uint8)
    return image, gt


def sloppy_probs(gt: np.ndarray, shift: int = 4, sigma: float = 3.0, mix: float = 0.3) -> np.ndarray:
    """What a coarse network gives: the ground truth displaced by `shift` px, blurred, flattened."""
    one_hot = np.eye(NUM_CLASSES, dtype=np.float32)[gt].transpose(2, 0, 1)
    one_hot = np.roll(one_hot, (shift, shift), axis=(1, 2))
    blurred = np.stack([cv2.GaussianBlur(c, (0, 0), sigma) for c in one_hot])
    probs = (1 - mix) * blurred + mix / NUM_CLASSES
    return (probs / probs.sum(0, keepdims=True)).astype(np.float32)


def boundary_miou(pred: np.ndarray, gt: np.ndarray, width: int = 4) -> float:
    """mIoU over the pixels within `width` px of a ground-truth boundary."""
    kernel = np.ones((3, 3), np.uint8)
    edge = cv2.morphologyEx(gt, cv2.MORPH_GRADIENT, kernel) > 0
    band = cv2.dilate(edge.astype(np.uint8), np.ones((2 * width + 1,) * 2, np.uint8)) > 0
    ious = []
    for c in range(NUM_CLASSES):
        p, g = (pred == c) & band, (gt == c) & band
        union = (p | g).sum()
        if union:
            ious.append((p & g).sum() / union)
    return float(np.mean(ious))


def test_no_pairwise_keeps_argmax():
    image, gt = piecewise_scene()
    probs = sloppy_probs(gt)
    refined = dense_crf(image, probs, params=CRFParams(iterations=3, pos_w=0, bi_w=0))
    assert refined.shape == probs.shape and refined.dtype == np.float32
    np.testing.assert_array_equal(refined.argmax(0), probs.argmax(0))
    # With no pairwise term mean-field is softmax(-unary), i.e. the input probabilities.
    np.testing.assert_allclose(refined, probs, atol=1e-4)


def test_crf_snaps_boundaries_to_colour_edges():
    image, gt = piecewise_scene()
    probs = sloppy_probs(gt)
    before = boundary_miou(probs.argmax(0), gt)
    refined = dense_crf(image, probs)  # DeepLab v2 defaults
    after = boundary_miou(refined.argmax(0), gt)
    # Measured: 0.46 -> 0.98 on this scene; the smoothness kernel alone (bi_w=0) gives 0.45.
    assert before < 0.55
    assert after > before + 0.3, (before, after)
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-4)


def test_non_square_image_keeps_layout():
    """Regions are asymmetric and the image is 60 x 90: swapping width and height either raises in
    pydensecrf or scrambles the pairwise neighbourhoods, so the refined labels would not match."""
    image, gt = piecewise_scene()
    refined = dense_crf(image, sloppy_probs(gt, shift=1, sigma=1.0), params=CRFParams(iterations=5))
    assert refined.shape == (NUM_CLASSES, HEIGHT, WIDTH)
    assert (refined.argmax(0) == gt).mean() > 0.98
    # The transposed problem gives the transposed answer.
    image_t = np.ascontiguousarray(image.transpose(1, 0, 2))
    probs_t = np.ascontiguousarray(sloppy_probs(gt, shift=1, sigma=1.0).transpose(0, 2, 1))
    refined_t = dense_crf(image_t, probs_t, params=CRFParams(iterations=5))
    assert refined_t.shape == (NUM_CLASSES, WIDTH, HEIGHT)
    assert (refined_t.argmax(0) == gt.T).mean() > 0.98


def test_accepts_float16_read_only_and_non_contiguous_inputs():
    """The batch job hands over float16 probabilities and read-only arrays (Ray's object store)."""
    image, gt = piecewise_scene()
    probs = sloppy_probs(gt)
    reference = dense_crf(image, probs, params=CRFParams(iterations=3))
    flipped_back = dense_crf(image[:, ::-1][:, ::-1], probs.astype(np.float16), params=CRFParams(iterations=3))
    np.testing.assert_allclose(flipped_back, reference, atol=2e-3)
    frozen_image, frozen_probs = image.copy(), probs.copy()
    frozen_image.flags.writeable = False
    frozen_probs.flags.writeable = False
    np.testing.assert_array_equal(dense_crf(frozen_image, frozen_probs, params=CRFParams(iterations=3)), reference)


@pytest.mark.parametrize(
    "image, probs, match",
    [
        (np.zeros((4, 5, 3), np.float32), np.full((2, 4, 5), 0.5, np.float32), "uint8"),
        (np.zeros((4, 5), np.uint8), np.full((2, 4, 5), 0.5, np.float32), "H x W x 3"),
        (np.zeros((4, 5, 3), np.uint8), np.full((2, 5, 4), 0.5, np.float32), "does not match"),
        (np.zeros((4, 5, 3), np.uint8), np.full((4, 5), 0.5, np.float32), "C x H x W"),
        (np.zeros((4, 5, 3), np.uint8), np.ones((2, 4, 5), np.int64), "float"),
        (np.zeros((4, 5, 3), np.uint8), np.ones((1, 4, 5), np.float32), "at least 2"),
    ],
)
def test_rejects_bad_shapes(image, probs, match):
    with pytest.raises(ValueError, match=match):
        dense_crf(image, probs)
