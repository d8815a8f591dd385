"""The test-time recipe a model version carries beside its tuned CRF set (`crf.*`, crf_settings.py).

Tags on the registered version:

    tta.scales   comma-separated test scales, e.g. "0.75,1.0,1.25"
    tta.flip     "true" / "false"
    tta.source   who chose them (tune_crf: searched with the CRF; training: its validation)

`pipelines/segment.py`, `pipelines/tune_crf.py` and the Segmenter use them when the user gives no
scales / flip of their own; a version without them runs on the defaults, as before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pipelines.common.errors import InputError

SCALES_TAG, FLIP_TAG, SOURCE_TAG = "tta.scales", "tta.flip", "tta.source"


def tags_for(scales: Sequence[float], flip: bool, source: str) -> dict[str, str]:
    return {SCALES_TAG: ",".join(repr(float(s)) for s in scales), FLIP_TAG: str(bool(flip)).lower(),
            SOURCE_TAG: source}


def from_tags(tags: Mapping[str, str], source: str = "the model version") -> dict[str, Any]:
    """`{"scales": (...), "flip": bool}` for the tags present; a value that cannot be used is one
    InputError naming the tag (a typo must not silently fall back to the defaults)."""
    recipe: dict[str, Any] = {}
    if SCALES_TAG in tags:
        text = tags[SCALES_TAG]
        try:
            scales = tuple(float(v) for v in text.split(",") if v.strip())
            if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
                raise ValueError
        except ValueError:
            raise InputError(f"tag {SCALES_TAG}={text!r} of {source} is refused: expected comma-separated "
                             "positive numbers") from None
        recipe["scales"] = scales
    if FLIP_TAG in tags:
        text = tags[FLIP_TAG].strip().lower()
        if text not in ("true", "false"):
            raise InputError(f"tag {FLIP_TAG}={tags[FLIP_TAG]!r} of {source} is refused: expected true or false")
        recipe["flip"] = text == "true"
    return recipe


def applied(cfg, model_uri: str):
    """`cfg` (a config with the `tta` section, segmentation/config.py: WithTTA) with the registered
    version's recipe for the TTA fields the user did not set (YAML, flags, overrides); other
    models: `cfg` as it is."""
    import dataclasses

    from pipelines import tracking

    unset = {"scales", "flip"} - set(cfg.tta_given)
    if not unset or not model_uri.startswith("models:/"):
        return cfg
    tuned = from_tags(tracking.model_version_tags(model_uri), model_uri)
    update = {k: v for k, v in tuned.items() if k in unset}
    return cfg.model_copy(update={"tta": dataclasses.replace(cfg.tta, **update)}) if update else cfg
