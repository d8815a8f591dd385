"""CRF parameter precedence (defaults < tuned version tags < explicit), the tags' round trip,
segment.py's CRF flags, results parts from before the CRF columns, and TTA's small-scale warning.
"""

from __future__ import annotations

import dataclasses
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from deeplab_core import tta
from deeplab_core.constants import CRFParams
from pipelines import segment
from pipelines.segmentation import crf_settings
from pipelines.segmentation.config import SegmentConfig
from pipelines.common.errors import InputError
from pipelines.segmentation.crf_settings import CRFSettings, resolve, tags_for, tuned_from_tags
from pipelines.segmentation.io import RESULTS_SCHEMA, read_results

TUNED = {"bi_w": 5.0, "bi_xy_std": 20.0, "bi_rgb_std": 10.0, "pos_w": 2.0, "pos_xy_std": 1.5}


def test_defaults_without_tuned_set_or_flags():
    assert resolve(CRFSettings(), None) == (CRFParams(), "default")


def test_tuned_set_is_used_and_explicit_fields_win():
    params, source = resolve(CRFSettings(), TUNED)
    assert (dataclasses.asdict(params), source) == ({**TUNED, "iterations": 10}, "tuned")
    params, source = resolve(CRFSettings(bi_w=7, iterations=3), TUNED)
    assert (params.bi_w, params.bi_xy_std, params.iterations, source) == (7, 20.0, 3, "tuned+explicit")
    params, source = resolve(CRFSettings(iterations=3), TUNED)  # iterations are not a kernel field
    assert source == "tuned"
    assert resolve(CRFSettings(bi_w=7), None)[1] == "explicit"
    assert resolve(CRFSettings(**TUNED), {k: 1.0 for k in TUNED})[1] == "explicit"


def test_a_whole_crfparams_counts_as_given():
    settings = CRFSettings.model_validate(CRFParams(iterations=3))
    assert settings.given() == dataclasses.asdict(CRFParams(iterations=3))
    cfg = SegmentConfig(model="m", input="i", output="o", crf_params=CRFParams(iterations=3))
    assert resolve(cfg.crf_params, TUNED) == (CRFParams(iterations=3), "explicit")


def test_tags_round_trip_and_incomplete_tags_are_ignored():
    params = CRFParams(iterations=5, **TUNED)
    tags = tags_for(params, "s3://b/val.parquet", 0.71, 0.69)
    assert tags["crf.manifest"] == "s3://b/val.parquet" and float(tags["crf.score"]) == 0.71
    assert float(tags["crf.default_score"]) == 0.69
    assert tuned_from_tags(tags) == TUNED
    assert tuned_from_tags({k: v for k, v in tags.items() if k != "crf.bi_w"}) is None
    # A registry tag passes the checks a --crf-* flag passes: one line naming the tag and the version.
    for key, value in (("crf.pos_w", "nan"), ("crf.bi_xy_std", "0"), ("crf.pos_xy_std", "-1"), ("crf.bi_w", "x")):
        with pytest.raises(InputError, match=rf"^tag {key}='{value}' of models:/m/3 is refused: "):
            tuned_from_tags({**tags, key: value}, "models:/m/3")


def test_segment_flags_and_overrides_set_only_what_they_name():
    args = segment.build_parser().parse_args(
        ["--model", "m", "--input", "i", "--output", "o", "--crf-bi-w", "6", "--crf-iterations", "4",
         "crf_params.pos_xy_std=2"])
    cfg = segment.config_from_args(args)
    assert cfg.crf_params.given() == {"bi_w": 6.0, "iterations": 4, "pos_xy_std": 2}
    plain = segment.config_from_args(segment.build_parser().parse_args(["--model", "m", "--input", "i", "--output", "o"]))
    assert plain.crf_params.given() == {}


def test_results_parts_without_the_crf_columns_still_read(tmp_path):
    old_schema = pa.schema([f for f in RESULTS_SCHEMA if f.name not in ("crf_source", "crf_params")])
    row = {"id": "a", "uri": "u", "output_uri": "o", "overlay_uri": None, "status": "ok", "classes": [0],
           "seconds_decode": 0.1, "seconds_model": 0.2, "seconds_crf": None, "run_id": "r", "model_uri": "m",
           "finished_at": pa.scalar(0, pa.timestamp("us", tz="UTC")).as_py()}
    (tmp_path / "results").mkdir()
    pq.write_table(pa.Table.from_pylist([row], schema=old_schema), tmp_path / "results" / "old.parquet")
    new = dict(row, id="b", crf_source="tuned", crf_params=crf_settings.params_json(CRFParams()))
    pq.write_table(pa.Table.from_pylist([new], schema=RESULTS_SCHEMA), tmp_path / "results" / "new.parquet")
    table = read_results(str(tmp_path)).sort_by("id").to_pylist()
    assert [(r["id"], r["crf_source"]) for r in table] == [("a", None), ("b", "tuned")]


class _Strided(nn.Module):
    """A 'network' with output stride 16 (1x1 conv), for the scale warning."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.config = {"output_stride": 16}

    def forward(self, x):
        return self.conv(x)


def test_small_scales_are_reported_once(caplog):
    model = _Strided()
    images = torch.zeros(1, 3, 96, 128)
    with caplog.at_level(logging.WARNING, logger="deeplab_core.tta"):
        tta.predict_probs(model, images, scales=(0.5, 1.0), flip=False)
        tta.predict_probs(model, images, scales=(0.5, 1.0), flip=False)
    messages = [r.getMessage() for r in caplog.records if r.name == "deeplab_core.tta"]
    assert len(messages) == 1 and "scale 0.5" in messages[0] and "3.0 feature cells" in messages[0]
    assert tta.warn_small_scales(model, 96, 128, (0.5, 0.75, 1.0)) == [0.5]
    assert tta.warn_small_scales(nn.Conv2d(3, 2, 1), 8, 8, (0.1,)) == []  # no stride known: no check


@pytest.mark.parametrize("bad", [{"bi_w": -1}, {"iterations": 0}, {"bi_xy_std": 0}, {"bogus": 1}])
def test_bad_crf_settings_are_rejected(bad):
    with pytest.raises(ValueError):
        CRFSettings(**bad)
