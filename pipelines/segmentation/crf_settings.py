"""Which dense-CRF parameters a run uses, and how a model version carries its tuned set.

Precedence, lowest first: the DeepLab v2 defaults (`CRFParams()`), the set `pipelines/tune_crf.py`
stored on the model version (tags `crf.<field>`), then what the user gave (YAML, flags,
`crf_params.<field>=` overrides). `CRFSettings` keeps the user's fields as None when not given, so
"not given" and "given the default value" stay distinguishable.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from pydantic import ConfigDict, Field, model_validator

from deeplab_core.constants import CRFParams
from pipelines.common.config import Section
from pipelines.common.errors import InputError

TAG_PREFIX = "crf."
# The kernel parameters a tuning run searches and stores; iterations stay the run's own choice.
TUNED_FIELDS = ("bi_w", "bi_xy_std", "bi_rgb_std", "pos_w", "pos_xy_std")
MANIFEST_TAG, SCORE_TAG, DEFAULT_SCORE_TAG = "crf.manifest", "crf.score", "crf.default_score"
ITERATIONS_TAG = "crf.iterations"  # the iterations the tuned set was scored with (provenance)

SOURCE_DEFAULT, SOURCE_TUNED, SOURCE_EXPLICIT = "default", "tuned", "explicit"


class CRFSettings(Section):
    """User-given CRF fields; None = not given (then the tuned set or the defaults apply)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    iterations: int | None = Field(None, ge=1)
    pos_w: float | None = Field(None, ge=0)
    pos_xy_std: float | None = Field(None, gt=0)
    bi_w: float | None = Field(None, ge=0)
    bi_xy_std: float | None = Field(None, gt=0)
    bi_rgb_std: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _from_params(cls, value: Any) -> Any:
        # A whole CRFParams (e.g. from Python callers) counts as every field given.
        return dataclasses.asdict(value) if isinstance(value, CRFParams) else value

    def given(self) -> dict[str, float | int]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


def tags_for(params: CRFParams, manifest: str, score: float, default_score: float) -> dict[str, str]:
    """Model-version tags recording a tuned set, where it was measured and how it scored."""
    tags = {TAG_PREFIX + name: repr(float(getattr(params, name))) for name in TUNED_FIELDS}
    tags.update({MANIFEST_TAG: manifest, SCORE_TAG: repr(float(score)),
                 DEFAULT_SCORE_TAG: repr(float(default_score)), ITERATIONS_TAG: str(params.iterations)})
    return tags


def tuned_from_tags(tags: Mapping[str, str], source: str = "the model version") -> dict[str, float] | None:
    """The tuned kernel parameters in a version's tags; None unless all are there. Each value must
    pass the checks a `--crf-*` flag passes (a `*_std` of 0 crashes pydensecrf's worker, and Ray
    retries it forever): else one InputError naming the tag and `source`."""
    if not all(TAG_PREFIX + name in tags for name in TUNED_FIELDS):
        return None
    values = {}
    for name in TUNED_FIELDS:
        text = tags[TAG_PREFIX + name]
        try:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError("not a finite number")
            CRFSettings(**{name: value})
        except (TypeError, ValueError) as err:  # pydantic's ValidationError is a ValueError
            errors = getattr(err, "errors", None)
            reason = errors()[0]["msg"] if callable(errors) else str(err)
            raise InputError(f"tag {TAG_PREFIX}{name}={text!r} of {source} is refused: {reason}") from None
        values[name] = value
    return values


def resolve(settings: CRFSettings, tuned: Mapping[str, float] | None) -> tuple[CRFParams, str]:
    """The parameters to run with and where they came from: `default`, `tuned`, `explicit`, or
    `tuned+explicit` (tuned set with some fields given by the user)."""
    given = settings.given()
    values = {**(dict(tuned) if tuned else {}), **given}
    params = CRFParams(**values)
    overrides_kernel = any(name in given for name in TUNED_FIELDS)
    if tuned and not all(name in given for name in TUNED_FIELDS):
        source = SOURCE_TUNED + ("+" + SOURCE_EXPLICIT if overrides_kernel else "")
    else:
        source = SOURCE_EXPLICIT if overrides_kernel else SOURCE_DEFAULT
    return params, source


def params_json(params: CRFParams) -> str:
    return json.dumps(dataclasses.asdict(params), sort_keys=True)
