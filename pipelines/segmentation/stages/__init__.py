"""The Ray Data stages of batch segmentation (run on workers), one module each:

    decode.py  (CPU tasks)   id, uri, mask_uri -> + image, [gt, has_gt], status, seconds_decode
    model.py   (actor pool)  -> + label, [probs], [label_plain, label_tta], seconds_model
    crf.py     (CPU tasks, or in the model actor with the torch backend) -> label refined, [label_crf]
    score.py   (with ground truth) -> confusion matrices per image and variant
    write.py   masks, overlays; -> + output_uri, overlay_uri, classes; pixels dropped
               (score and write run in the CRF task, else in one 0-CPU task: masks as made)

`plan.py` holds the InferencePlan every stage reads; the column names are
`pipelines.segmentation.columns`. Every stage runs its batch under poison.guarded: an input that
kills its worker process ends as an error row of that stage instead of making Ray retry it
without end. `pipelines.segmentation.pipeline` composes the stages into a Ray Data pipeline.
"""

from pipelines.segmentation.columns import *  # noqa: F401,F403 - the column names, as before the split
from pipelines.segmentation.stages.crf import crf_stage
from pipelines.segmentation.stages.decode import decode_stage
from pipelines.segmentation.stages.model import ModelStage
from pipelines.segmentation.stages.plan import InferencePlan
from pipelines.segmentation.stages.score import score_stage
from pipelines.segmentation.stages.write import WriteSpec, write_stage

__all__ = ["InferencePlan", "ModelStage", "WriteSpec", "crf_stage", "decode_stage",
           "score_stage", "write_stage"]
