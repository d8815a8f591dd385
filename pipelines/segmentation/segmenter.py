"""A segmenter you can call: one model version with its own recipe, in this process, no Ray.

    from pipelines.segmentation.segmenter import Segmenter
    seg = Segmenter.from_uri("models:/deeplab@champion", tracking_uri="sqlite:///mlflow.db")
    mask = seg("street.jpg")                 # H x W uint8 class ids
    masks = seg(["a.jpg", "b.png"])          # a list, one per image (any sizes)
    probs = seg.probs(image_array)           # C x H x W float32 (before the CRF)

The recipe is the version's: normalisation from the checkpoint, test scales and flip from its
`tta.*` tags (recipe.py), the tuned CRF set from its `crf.*` tags (crf_settings.py), the CRF
backend by device (torch on a GPU, pydensecrf on CPU), as `pipelines/segment.py` applies them;
arguments given override each part. The masks are the batch job's masks for the same inputs
(tests/integration/test_segmenter.py). The computation is deeplab_core's (tta.predict,
crf.refine); this module only loads, decodes and wires.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from deeplab_core.constants import DEFAULT_SCALES, CRFParams, TTASettings

Image = Union[np.ndarray, str, Path]  # H x W x 3 uint8 RGB, or a path / fsspec URI of an image file


class Segmenter:
    """Masks and probabilities for images, with one model and its recipe (see the module doc)."""

    def __init__(self, model, *, mean: Sequence[float], std: Sequence[float],
                 scales: Sequence[float] = DEFAULT_SCALES, flip: bool = True, fusion: str = "mean",
                 max_pixels: int | None = None, crf: bool = True, crf_params: CRFParams | None = None,
                 crf_backend: str = "auto", device: str = "auto", model_uri: str | None = None,
                 max_input_pixels: int | None = None,
                 storage_options: Mapping[str, Any] | None = None, runtime: str = "torch") -> None:
        import torch

        from deeplab_core.crf import choose_backend
        from pipelines.segmentation import runtime as runtimes
        from pipelines.segmentation.config import DEFAULT_MAX_INPUT_PIXELS, DEFAULT_TILE_PIXELS
        from pipelines.segmentation.engine import local_device

        runtimes.check_available(runtime)
        device = local_device(device)
        runtimes.check_device(runtime, device == "cuda")
        self.device = torch.device(device)
        # runtime "onnx": the model exported and checked (runtime.py), run by ONNX Runtime on this
        # process's torch threads; predict's TTA is the same either way.
        self.runtime = runtime
        self.model = runtimes.runtime_model(runtimes.prepare(model.eval(), runtime), runtime,
                                            torch.get_num_threads()).to(self.device).eval()
        self.mean, self.std = tuple(mean), tuple(std)
        self.tta = TTASettings(tuple(scales), bool(flip), fusion)
        self.scales, self.flip, self.fusion = self.tta.scales, self.tta.flip, self.tta.fusion
        self.max_pixels = DEFAULT_TILE_PIXELS if max_pixels is None else max_pixels
        self.crf, self.crf_params = bool(crf), crf_params or CRFParams()
        self.crf_backend = choose_backend(crf_backend, self.device.type == "cuda")
        self.model_uri = model_uri
        self.max_input_pixels = max_input_pixels or DEFAULT_MAX_INPUT_PIXELS
        self.storage_options = storage_options

    @classmethod
    def from_uri(cls, uri: str, *, tracking_uri: str | None = None, device: str = "auto",
                 scales: Sequence[float] | None = None, flip: bool | None = None, crf: bool = True,
                 crf_params: Mapping[str, float] | CRFParams | None = None, crf_backend: str = "auto",
                 storage_options: Mapping[str, Any] | None = None, runtime: str = "torch",
                 **kwargs: Any) -> Segmenter:
        """`models:/name@alias`, `models:/name/<version>`, `runs:/...` or a checkpoint dir / file;
        None arguments come from the version's recipe (tags), then the defaults."""
        from pipelines import tracking
        from pipelines.data.checkpoints import normalisation_of
        from pipelines.segmentation import crf_settings, recipe
        from pipelines.segmentation.pipeline import load_checked_model
        from pipelines.segmentation.runtime import check_available

        check_available(runtime)  # before the model is fetched

        with tracking.tracking_uri_set(tracking_uri):
            model_uri, model, meta = load_checked_model(uri, storage_options)
            tags = tracking.model_version_tags(model_uri) if model_uri.startswith("models:/") else {}
            params, _ = crf_settings.for_model(crf_params, model_uri)
        tuned = recipe.from_tags(tags, model_uri)
        mean, std = normalisation_of(meta, model)
        return cls(model, mean=mean, std=std,
                   scales=scales if scales is not None else tuned.get("scales", DEFAULT_SCALES),
                   flip=flip if flip is not None else tuned.get("flip", True),
                   crf=crf, crf_params=params, crf_backend=crf_backend, device=device, model_uri=model_uri,
                   storage_options=storage_options, runtime=runtime, **kwargs)

    # ------------------------------------------------------------------ inputs

    def read(self, image: Image) -> np.ndarray:
        """An image as H x W x 3 uint8 RGB: arrays as they are, files decoded as the batch job
        decodes them (same checks, same size limit)."""
        if isinstance(image, np.ndarray):
            return image
        from pipelines.data.decode import decode_image
        from pipelines.data.storage import get_fs

        fs, path = get_fs(str(image), self.storage_options)
        return decode_image(fs.cat_file(path), self.max_input_pixels)

    def _batch(self, images: Image | Sequence[Image]) -> tuple[list[np.ndarray], bool]:
        """(images, whether one image was given)."""
        if isinstance(images, (str, Path)) or (isinstance(images, np.ndarray) and images.ndim == 3):
            return [self.read(images)], True
        return [self.read(image) for image in images], False

    # ------------------------------------------------------------------ outputs

    def _probs(self, images: list[np.ndarray]):
        """Probabilities (torch, on the device) per same-size group, in input order."""
        import torch

        from deeplab_core.transforms import normalize
        from deeplab_core.tta import predict

        out: list = [None] * len(images)
        groups: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(image.shape, []).append(i)
        for group in groups.values():
            batch = torch.stack([normalize(images[i], self.mean, self.std) for i in group])
            probs = predict(self.model, batch, self.tta, self.max_pixels)
            for j, i in enumerate(group):
                out[i] = probs[j]
        return out

    def probs(self, images: Image | Sequence[Image]) -> np.ndarray | list[np.ndarray]:
        """Class probabilities C x H x W (float32) after scales and flip, before the CRF; a list
        for a list of images."""
        batch, single = self._batch(images)
        probs = [p.float().cpu().numpy() for p in self._probs(batch)]
        return probs[0] if single else probs

    def __call__(self, images: Image | Sequence[Image]) -> np.ndarray | list[np.ndarray]:
        """Masks H x W (uint8 class ids), CRF-refined unless `crf=False`; a list for a list."""
        import torch

        from deeplab_core.crf import refine

        batch, single = self._batch(images)
        masks = []
        for image, probs in zip(batch, self._probs(batch)):
            if not self.crf:
                masks.append(probs.argmax(0).to(torch.uint8).cpu().numpy())
            elif self.crf_backend == "torch":
                masks.append(refine([np.ascontiguousarray(image)], probs.float()[None], self.crf_params, "torch")[0])
            else:
                # float16 as the batch job hands probabilities to its CRF tasks: the same masks.
                half = probs.float().cpu().numpy().astype(np.float16)
                masks.append(refine([image], [half], self.crf_params, "pydensecrf")[0])
        return masks[0] if single else masks
