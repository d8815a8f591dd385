"""The InferencePlan: what the workers compute, decided once per run on the driver from the model
and the job's settings (segmentation, evaluation, a future caller), identical for every batch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deeplab_core.constants import CRFParams, TTASettings
from deeplab_core.crf import choose_backend
from pipelines.segmentation.columns import (
    CM,
    CM_CRF,
    CM_PLAIN,
    CM_TTA,
    ERROR_STAGE,
    HAS_GT,
    ID,
    SECONDS_CRF,
    SECONDS_DECODE,
    SECONDS_MODEL,
    STATUS,
    WRITE_COLUMNS,
)
from pipelines.segmentation.poison import Guard


@dataclass(frozen=True)
class InferencePlan:
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tta: TTASettings
    max_pixels: int | None
    crf: bool  # the output masks are CRF-refined
    crf_params: CRFParams
    crf_backend: str  # "pydensecrf" (CPU tasks after the model) or "torch" (inside the model actor)
    table: bool  # evaluation table: confusion matrices for plain, +MS+flip, +CRF
    score: bool  # one confusion matrix for the output masks (evaluate_model)
    overlays: bool
    max_input_pixels: int
    storage_options: Mapping[str, Any] | None
    guard: Guard | None = None  # worker deaths per batch/input (None: Ray's own retries only)
    autocast: bool | None = None  # bf16 autocast of the forwards (precision.py); None: on for CUDA only
    runtime: str = "torch"  # the model actors' runtime: torch, or onnx (runtime.py: they get an OnnxGraph)

    @classmethod
    def for_model(cls, model, meta: Mapping[str, Any], *, gpu: bool, crf_backend: str = "auto",
                  **settings: Any) -> InferencePlan:
        """The plan for `model` (class count, the normalisation it was trained with) with the CRF
        backend chosen for where the model runs (`crf_backend` auto/pydensecrf/torch)."""
        # On the driver only: the workers that import this module (decode, write) never load torch.
        from pipelines.data.checkpoints import normalisation_of, num_classes_of

        mean, std = normalisation_of(meta, model)
        return cls(num_classes=num_classes_of(model), mean=mean, std=std,
                   crf_backend=choose_backend(crf_backend, gpu), **settings)

    @property
    def run_crf(self) -> bool:
        return self.crf or self.table

    @property
    def with_masks(self) -> bool:
        return self.table or self.score

    @property
    def crf_in_model(self) -> bool:
        return self.run_crf and self.crf_backend == "torch"

    def summary_columns(self, write: bool = False) -> list[str]:
        """The per-image columns that reach the driver (no pixels)."""
        columns = [ID, STATUS, ERROR_STAGE, SECONDS_DECODE, SECONDS_MODEL]
        if write:
            columns += WRITE_COLUMNS
        if self.run_crf:
            columns.append(SECONDS_CRF)
        if self.with_masks:
            columns.append(HAS_GT)
        if self.table:
            columns += [CM_PLAIN, CM_TTA, CM_CRF]
        if self.score:
            columns.append(CM)
        return columns
