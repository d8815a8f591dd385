"""The smaller holes of a shared deployment (issue 22), each checked where it is closed."""

from __future__ import annotations

import pytest

from pipelines.segmentation.io import check_id


@pytest.mark.parametrize("bad", ["a?versionId=3", "b#frag", "c*", "d[1]", "e{x}", "f%2Fg"])
def test_ids_with_characters_special_to_a_store_are_refused(bad):
    """`a?versionId=3` would be written as `masks/a` on S3: another id's mask, never finished."""
    with pytest.raises(ValueError, match="special to URLs"):
        check_id(bad)
