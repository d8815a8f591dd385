"""MLflow "model from code" for a DeepLab checkpoint.

Logged as code (not a pickle), so registering a model never pickles Python objects; the weights
live beside it as the `checkpoint` artifact (`model.pt`) and load with `weights_only=True`.
`mlflow.pyfunc.load_model(uri).predict(images)` takes uint8 N x H x W x 3 images and returns
N x H x W class indices (plain single-scale inference; the batch job adds TTA and CRF).
"""

from __future__ import annotations

import mlflow
import numpy as np


class DeepLabPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from pipelines.common.uris import WEIGHTS_TAG
        from pipelines.data.checkpoints import model_from_checkpoint_file, normalisation_of

        # The digest recorded when the model was logged: a replaced model.pt is refused.
        expected = (context.model_config or {}).get(WEIGHTS_TAG)
        self.model, self.meta = model_from_checkpoint_file(context.artifacts["checkpoint"], expected_sha256=expected)
        self.model.eval()
        # The checkpoint's own, else the model's (converted weights), else ImageNet's: as the batch job.
        self.normalisation = normalisation_of(self.meta, self.model)

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:  # noqa: ARG002
        import torch

        from deeplab_core.transforms import normalize

        # The signature names its one tensor, so MLflow may hand it over as {"images": array}.
        images = np.asarray(model_input["images"] if isinstance(model_input, dict) else model_input)
        if images.ndim == 3:
            images = images[None]
        batch = torch.stack([normalize(img, *self.normalisation) for img in images])
        with torch.inference_mode():
            return self.model(batch).argmax(1).to(torch.uint8).numpy()


mlflow.models.set_model(DeepLabPyfunc())
