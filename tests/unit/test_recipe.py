"""The recipe tags (pipelines/segmentation/recipe.py): written, read, refused, applied to unset fields only."""

from __future__ import annotations

import pytest

from pipelines.common.errors import InputError
from pipelines.segmentation import recipe
from pipelines.segmentation.config import SegmentConfig


def test_tags_round_trip_and_bad_values_are_refused_by_name():
    tags = recipe.tags_for((0.75, 1.0), False, "tune_crf")
    assert recipe.from_tags(tags) == {"scales": (0.75, 1.0), "flip": False}
    assert recipe.from_tags({}) == {}
    with pytest.raises(InputError, match="tta.scales='0,1' of models:/m/1 is refused"):
        recipe.from_tags({"tta.scales": "0,1"}, "models:/m/1")
    with pytest.raises(InputError, match="tta.flip='yes'"):
        recipe.from_tags({"tta.flip": "yes"})


def test_only_fields_the_user_left_unset_take_the_recipe():
    given = SegmentConfig(model="m", input="i", output="o", scales=(1.0,))
    assert recipe.applied(given, "./checkpoint") is given  # not a registered version: nothing to read
    assert {"scales"} <= given.tta_given and "flip" not in given.tta_given
