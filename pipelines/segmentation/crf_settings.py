"""Which dense-CRF parameters a run uses, and how a model version carries its tuned set.

Precedence, lowest first: the DeepLab v2 defaults (`CRFParams()`), the set `pipelines/tune_crf.py`
stored on the model version (tags `crf.<field>`), then what the user gave (YAML, flags,
`crf_params.<field>=` overrides). `CRFSettings` keeps the user's fields as None when not given, so
"not given" and "given the default value" stay distinguishable.

Everything here is derived from `deeplab_core.constants.CRFParams` (names, bounds, help): adding a
CRF field there adds its setting, flag, tag and search axis.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, get_type_hints

from pydantic import ConfigDict, Field, create_model, model_validator

from deeplab_core.constants import CRFParams
from pipelines.common.config import Section
from pipelines.common.errors import InputError

TAG_PREFIX = "crf."
# The kernel parameters a tuning run searches and stores; iterations stay the run's own choice.
TUNED_FIELDS = CRFParams.tuned_fields()
MANIFEST_TAG, SCORE_TAG, DEFAULT_SCORE_TAG = "crf.manifest", "crf.score", "crf.default_score"
ITERATIONS_TAG = "crf.iterations"  # the iterations the tuned set was scored with (provenance)

SOURCE_DEFAULT, SOURCE_TUNED, SOURCE_EXPLICIT = "default", "tuned", "explicit"


class _CRFSettingsBase(Section):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _from_params(cls, value: Any) -> Any:
        # A whole CRFParams (e.g. from Python callers) counts as every field given.
        return dataclasses.asdict(value) if isinstance(value, CRFParams) else value

    def given(self) -> dict[str, float | int]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


def _setting(field: dataclasses.Field) -> tuple[Any, Any]:
    """A CRFParams field as an optional setting with the field's bound and help."""
    bound = {"gt" if field.metadata["strict"] else "ge": field.metadata["minimum"]}
    return get_type_hints(CRFParams)[field.name] | None, Field(None, description=field.metadata["help"], **bound)

CRFSettings = create_model(
    "CRFSettings", __base__=_CRFSettingsBase, __module__=__name__,
    __doc__="User-given CRF fields; None = not given (then the tuned set or the defaults apply).",
    **{f.name: _setting(f) for f in dataclasses.fields(CRFParams)})


def as_params(params: CRFParams, prefix: str = "") -> dict[str, float | int]:
    """The one flat form of a set: `{prefix + field: value}` (MLflow params use prefix `crf_`)."""
    return {prefix + name: value for name, value in dataclasses.asdict(params).items()}


def params_json(params: CRFParams) -> str:
    """The set as the results files' `crf_params` column and the log lines write it."""
    return json.dumps(as_params(params), sort_keys=True)


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


def for_model(settings: CRFSettings | CRFParams | None, model_uri: str) -> tuple[CRFParams, str]:
    """The CRF parameters of a run on `model_uri` and their source: a registered version's tuned
    set (tags from pipelines/tune_crf.py) under the user's explicit fields, else defaults +
    explicit. The one resolution every job uses (segmentation, evaluation, promotion)."""
    from pipelines import tracking

    if not isinstance(settings, _CRFSettingsBase):
        settings = CRFSettings.model_validate(settings or {})
    tuned = None
    if model_uri.startswith("models:/"):
        tuned = tuned_from_tags(tracking.model_version_tags(model_uri), model_uri)
    return resolve(settings, tuned)
