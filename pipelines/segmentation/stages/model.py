"""Model stage (actor pool, GPU when present): one model per actor (the PyTorch model, or with
`--runtime onnx` an ONNX Runtime session of the driver's checked graph, runtime.py); each batch
grouped by image size and run through the plan's test-time augmentation (`deeplab_core.tta.predict`). With the
torch CRF backend the CRF runs here too, on the actor's device (probabilities never leave it)."""

from __future__ import annotations

import sys
import time

import numpy as np

from pipelines.segmentation.columns import (
    ERROR_REASON,
    ERROR_STAGE,
    GT,
    HAS_GT,
    ID,
    IMAGE,
    LABEL,
    LABEL_PLAIN,
    LABEL_TTA,
    PROBS,
    SECONDS_DECODE,
    SECONDS_MODEL,
    STATUS,
    STATUS_OK,
    URI,
    mark_error,
    object_array,
    placeholder_mask,
    writable_status,
)
from pipelines.segmentation.poison import guarded
from pipelines.segmentation.stages.crf import refine_group, with_crf_labels
from pipelines.segmentation.stages.plan import InferencePlan


class ModelStage:
    """-> + label, [probs for a CRF stage], [label_plain, label_tta for the table], seconds_model."""

    def __init__(self, model_ref, plan: InferencePlan, device: str, num_threads: int) -> None:
        import torch

        from pipelines.segmentation.runtime import runtime_model

        # A Ray object ref on a worker; the model itself in-process (engine.py), which imports no Ray.
        ray = sys.modules.get("ray")
        model = ray.get(model_ref) if ray is not None and isinstance(model_ref, ray.ObjectRef) else model_ref
        if device == "cpu":
            torch.set_num_threads(max(1, num_threads))  # torch still resizes and fuses the TTA views
        self.device = torch.device(device)
        # onnx: an ONNX Runtime session with the actor's threads, built from the driver's checked graph
        self.model = runtime_model(model, plan.runtime, num_threads).to(self.device).eval()
        # NHWC on CPU: oneDNN's convolutions skip their reorders (precision.py); ONNX Runtime takes NCHW
        self.channels_last = device == "cpu" and plan.runtime == "torch"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.plan = plan

    def _probs(self, images: list[np.ndarray], tta):
        import torch

        from deeplab_core.transforms import normalize
        from deeplab_core.tta import predict

        batch = torch.stack([normalize(img, self.plan.mean, self.plan.std) for img in images])
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        # Scoring (evaluate_model: promotion, registered metrics) runs in float32 like training's
        # validation, so the numbers compared are the same computation; masks follow the plan's precision.
        return predict(self.model, batch, tta, self.plan.max_pixels,
                       autocast=False if self.plan.score else self.plan.autocast)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return guarded(self.plan.guard, "model", batch, self._run)

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        plan, n = self.plan, len(batch[ID])
        batch = writable_status(dict(batch))
        labels = [placeholder_mask()] * n
        plain_labels = [placeholder_mask()] * n
        probs_out = [np.zeros((plan.num_classes, 1, 1), np.float16)] * n
        seconds = np.zeros(n)
        crf_labels: list[np.ndarray | None] = [None] * n
        crf_seconds = np.zeros(n)
        for group in _groups_by_shape(batch, together=self.device.type != "cpu"):
            start = time.perf_counter()
            images = [batch[IMAGE][i] for i in group]
            try:
                probs = self._probs(images, plan.tta)
                plain = probs if (not plan.table or plan.tta.is_plain) else self._probs(images, plan.tta.plain())
            except Exception as err:  # noqa: BLE001 - e.g. out of memory on one huge image
                for i in group:
                    mark_error(batch, i, "model", f"{type(err).__name__}: {err}")
                continue
            if plan.crf_in_model:
                refine_group(batch, group, images, probs, plan, crf_labels, crf_seconds)
            probs_np = probs.float().cpu().numpy()
            label_np = probs_np.argmax(1).astype(np.uint8)
            plain_np = plain.argmax(1).cpu().numpy().astype(np.uint8) if plan.table else None
            elapsed = (time.perf_counter() - start) / len(group)
            for j, i in enumerate(group):
                labels[i] = label_np[j]
                seconds[i] = elapsed
                if plan.run_crf and not plan.crf_in_model:
                    probs_out[i] = probs_np[j].astype(np.float16)  # half the bytes across the object store
                if plan.table:
                    plain_labels[i] = plain_np[j]
        out = {k: batch[k] for k in (ID, URI, STATUS, ERROR_STAGE, ERROR_REASON, SECONDS_DECODE)}
        out.update({LABEL: object_array(labels), SECONDS_MODEL: seconds})
        if plan.table:
            out.update({LABEL_PLAIN: object_array(plain_labels), LABEL_TTA: object_array(labels)})
        if plan.with_masks:
            out.update({HAS_GT: batch[HAS_GT], GT: batch[GT]})
        if plan.crf_in_model:  # probabilities never leave the device; no CRF stage follows
            if plan.overlays:
                out[IMAGE] = batch[IMAGE]
            return with_crf_labels(out, plan, crf_labels, crf_seconds)
        if plan.run_crf or plan.overlays:
            out[IMAGE] = batch[IMAGE]
        if plan.run_crf:
            out[PROBS] = object_array(probs_out)
        return out


def _groups_by_shape(batch: dict[str, np.ndarray], together: bool = True) -> list[list[int]]:
    """The batch's usable images in forward passes: same-sized ones together on a GPU; one by one
    on a CPU, where a batch gains no parallelism and its larger activations cost page faults
    (64 images of 375x500, fp32, batch 4: 18.6 s, 7.7 s of it system time; one by one: 12.0 s)."""
    groups: dict[tuple, list[int]] = {}
    for i, status in enumerate(batch[STATUS]):
        if status == STATUS_OK:
            groups.setdefault(batch[IMAGE][i].shape if together else (i,), []).append(i)
    return list(groups.values())
