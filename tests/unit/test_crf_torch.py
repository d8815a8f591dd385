"""The torch dense CRF backend against pydensecrf: same labels, same probabilities, same mIoU gain.

pydensecrf is the reference implementation of the model; the torch backend must reproduce it
(to float32 rounding), not merely refine boundaries too.
"""

from __future__ import annotations

import sys

import cv2
import numpy as np
import pytest
import torch

from deeplab_core.constants import MIN_PROB, CRFParams
from deeplab_core.crf import dense_crf
from deeplab_core.crf_torch import dense_crf_torch
from deeplab_core.metrics import confusion_matrix, segmentation_metrics
from deeplab_core.permutohedral import PermutohedralLattice


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On 2 shared cores, OpenMP threads waiting for each other make the many small lattice ops of
    these tests 10-50x slower; one thread keeps the module at seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def scene(height: int, width: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An image of ellipses and boxes, one colour per class plus pixel noise, and its labels."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((height, width), np.uint8)
    for label in rng.permutation(np.arange(1, num_classes).repeat(2)):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(2, max(3, width // 4))), int(rng.integers(2, max(3, height // 4))))
        if rng.random() < 0.5:
            cv2.ellipse(gt, centre, axes, float(rng.uniform(0, 180)), 0, 360, int(label), -1)
        else:
            cv2.rectangle(gt, (centre[0] - axes[0], centre[1] - axes[1]), (centre[0] + axes[0], centre[1] + axes[1]),
                          int(label), -1)
    colours = rng.uniform(20, 235, (num_classes, 3)).astype(np.float32)
    image = np.clip(colours[gt] + rng.normal(0, 10, (height, width, 3)), 0, 255).astype(np.uint8)
    return image, gt


def noisy_probs(gt: np.ndarray, num_classes: int, seed: int = 0, shift: int = 3, sigma: float = 2.5) -> np.ndarray:
    """A coarse network's output: the labels displaced and blurred, with per-pixel noise."""
    rng = np.random.default_rng(seed)
    one_hot = np.eye(num_classes, dtype=np.float32)[gt].transpose(2, 0, 1)
    one_hot = np.roll(one_hot, (shift, shift), axis=(1, 2))
    if min(gt.shape) > 1:
        one_hot = np.stack([cv2.GaussianBlur(c, (0, 0), sigma) for c in one_hot])
    logits = 4 * one_hot + rng.normal(0, 0.6, one_hot.shape).astype(np.float32)
    probs = np.exp(logits - logits.max(0))
    return (probs / probs.sum(0, keepdims=True)).astype(np.float32)


def miou(labels: np.ndarray, gt: np.ndarray, num_classes: int) -> float:
    return segmentation_metrics(confusion_matrix(labels, gt, num_classes))["mIoU"]


def assert_matches(ours: np.ndarray, reference: np.ndarray, min_agreement: float = 0.995, atol: float = 1e-4) -> None:
    agreement = (ours.argmax(0) == reference.argmax(0)).mean()
    assert agreement >= min_agreement, agreement
    np.testing.assert_allclose(ours, reference, atol=atol)


@pytest.fixture(scope="module")
def voc_scene() -> dict:
    """VOC-size 500 x 375, 21 classes, DeepLab v2 defaults, both backends run once."""
    image, gt = scene(375, 500, 21)
    probs = noisy_probs(gt, 21)
    return {"image": image, "gt": gt, "probs": probs,
            "reference": dense_crf(image, probs), "ours": dense_crf(image, probs, backend="torch")}


def test_voc_size_matches_pydensecrf(voc_scene):
    # Measured: 100% of labels, max |difference| ~1e-6.
    assert voc_scene["ours"].shape == (21, 375, 500) and voc_scene["ours"].dtype == np.float32
    assert_matches(voc_scene["ours"], voc_scene["reference"])


def test_miou_gain_matches_pydensecrf(voc_scene):
    gt, probs = voc_scene["gt"], voc_scene["probs"]
    unary = miou(probs.argmax(0), gt, 21)
    gain_reference = miou(voc_scene["reference"].argmax(0), gt, 21) - unary
    gain_ours = miou(voc_scene["ours"].argmax(0), gt, 21) - unary
    assert gain_reference > 0.02, (unary, gain_reference)  # the CRF has something to fix here
    assert abs(gain_ours - gain_reference) < 0.005, (gain_ours, gain_reference)


@pytest.mark.parametrize(
    "height, width, num_classes, params",
    [
        (37, 53, 5, {}),
        (53, 37, 2, {}),  # transposed size: x is the column
        (29, 31, 21, {"bi_xy_std": 10, "bi_rgb_std": 13, "iterations": 5}),
        (1, 61, 3, {}),
        (61, 1, 2, {"pos_xy_std": 3}),
        (1, 1, 2, {}),
        (37, 53, 5, {"pos_w": 0}),  # bilateral only
        (37, 53, 5, {"bi_w": 0}),  # Gaussian only
    ],
)
def test_odd_sizes_and_parameters_match_pydensecrf(height, width, num_classes, params):
    image, gt = scene(height, width, num_classes, seed=height * width)
    probs = noisy_probs(gt, num_classes, seed=1, shift=1)
    assert_matches(dense_crf(image, probs, backend="torch", params=CRFParams(**params)), dense_crf(image, probs, params=CRFParams(**params)))


def test_small_dark_image_matches_pydensecrf_lattice():
    """pydensecrf also inserts the lattice simplex of a zero feature when H*W is not a multiple of
    4 (SIMD padding); near the origin of the feature space that relays the blur. Without copying
    it the difference on this 5 x 5 image is 0.32 in probability."""
    rng = np.random.default_rng(445324990)
    image = rng.integers(0, 40, (5, 5, 3)).astype(np.uint8)
    probs = rng.dirichlet(np.ones(3), (5, 5)).transpose(2, 0, 1).astype(np.float32)
    params = {"pos_w": 0, "bi_w": 10, "bi_xy_std": 2.3, "bi_rgb_std": 15, "iterations": 3}
    np.testing.assert_allclose(dense_crf(image, probs, backend="torch", params=CRFParams(**params)),
                               dense_crf(image, probs, params=CRFParams(**params)), atol=1e-4)


def test_zero_weights_give_the_renormalised_input():
    image, gt = scene(20, 30, 4)
    probs = noisy_probs(gt, 4)
    probs[0, :3, :3] = 0  # clipped to MIN_PROB, not -log(0)
    refined = dense_crf(image, probs, backend="torch", params=CRFParams(pos_w=0, bi_w=0))
    expected = np.clip(probs, MIN_PROB, 1) / np.clip(probs, MIN_PROB, 1).sum(0, keepdims=True)
    np.testing.assert_allclose(refined, expected, atol=1e-6)
    assert not np.allclose(dense_crf(image, probs, backend="torch", params=CRFParams(bi_w=0)), expected, atol=1e-3)


def test_batch_equals_per_image_calls():
    scenes = [scene(24, 40, 6, seed=s) for s in range(3)]
    images = torch.from_numpy(np.stack([image for image, _ in scenes]))
    probs = torch.from_numpy(np.stack([noisy_probs(gt, 6, seed=s) for s, (_, gt) in enumerate(scenes)]))
    batched = dense_crf_torch(images, probs, params=CRFParams(iterations=5))
    assert batched.shape == (3, 6, 24, 40) and batched.dtype == torch.float32
    for i in range(3):
        single = dense_crf_torch(images[i:i + 1], probs[i:i + 1], params=CRFParams(iterations=5))
        torch.testing.assert_close(batched[i:i + 1], single, rtol=0, atol=1e-6)
    # Images of a batch are independent: changing one leaves the others' results alone.
    assert not torch.allclose(batched[0], batched[1], atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_device_matches_pydensecrf(device):
    image, gt = scene(37, 53, 5, seed=7)
    probs = noisy_probs(gt, 5, seed=7)
    refined = dense_crf_torch(torch.from_numpy(image)[None].to(device), torch.from_numpy(probs)[None].to(device))
    assert refined.device.type == device
    assert_matches(refined[0].cpu().numpy(), dense_crf(image, probs))
    np.testing.assert_allclose(dense_crf(image, probs, backend="torch", device=device), refined[0].cpu().numpy())


def test_float16_read_only_and_flipped_inputs():
    image, gt = scene(30, 40, 3)
    probs = noisy_probs(gt, 3)
    reference = dense_crf(image, probs, backend="torch", params=CRFParams(iterations=3))
    frozen = image[:, ::-1][:, ::-1]
    frozen.flags.writeable = False
    np.testing.assert_allclose(dense_crf(frozen, probs.astype(np.float16), backend="torch", params=CRFParams(iterations=3)),
                               reference, atol=2e-3)


def test_torch_backend_needs_no_pydensecrf(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # "import pydensecrf" now raises
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    image, gt = scene(10, 12, 2)
    probs = noisy_probs(gt, 2)
    assert dense_crf(image, probs, backend="torch").shape == (2, 10, 12)
    with pytest.raises(ImportError):
        dense_crf(image, probs)


def test_rejects_unknown_backend_and_misplaced_device():
    image, probs = np.zeros((4, 5, 3), np.uint8), np.full((2, 4, 5), 0.5, np.float32)
    with pytest.raises(ValueError, match="pydensecrf, torch"):
        dense_crf(image, probs, backend="cuda")
    with pytest.raises(ValueError, match="only used by the torch backend"):
        dense_crf(image, probs, device="cpu")


@pytest.mark.parametrize(
    "images, probs, match",
    [
        (torch.zeros(1, 4, 5, 3), torch.full((1, 2, 4, 5), 0.5), "uint8"),
        (torch.zeros(1, 3, 4, 5, dtype=torch.uint8), torch.full((1, 2, 4, 5), 0.5), "N x H x W x 3"),
        (np.zeros((1, 4, 5, 3), np.uint8), torch.full((1, 2, 4, 5), 0.5), "tensor, got ndarray"),
        (torch.zeros(1, 4, 5, 3, dtype=torch.uint8), torch.full((1, 2, 5, 4), 0.5), "does not match"),
        (torch.zeros(1, 4, 5, 3, dtype=torch.uint8), torch.full((2, 4, 5), 0.5), "N x C x H x W"),
        (torch.zeros(1, 4, 5, 3, dtype=torch.uint8), torch.ones(1, 2, 4, 5, dtype=torch.int64), "float"),
        (torch.zeros(1, 4, 5, 3, dtype=torch.uint8), torch.ones(1, 1, 4, 5), "at least 2"),
        (torch.zeros(2, 4, 5, 3, dtype=torch.uint8), torch.ones(1, 2, 4, 5), "1 images but images has 2"),
    ],
)
def test_dense_crf_torch_rejects_bad_inputs(images, probs, match):
    with pytest.raises(ValueError, match=match):
        dense_crf_torch(images, probs)


def test_lattice_rejects_keys_beyond_64_bits():
    features = torch.rand(1, 100, 5) * 1e6  # stds far too small for the feature range
    with pytest.raises(ValueError, match="64 bits"):
        PermutohedralLattice.build(features)
