"""Batch segmentation pieces without Ray: id checks, atomic writes, config validation, input
listing.
"""

from __future__ import annotations

import io
import os
from datetime import datetime, timezone

import pytest
from PIL import Image

from deeplab_core.constants import DEFAULT_SCALES
from pipelines.data.decode import BadInput, decode_image
from pipelines.data.manifest import write_manifest
from pipelines.segmentation.config import SegmentConfig
from pipelines.segmentation.io import (
    check_id,
    list_inputs,
    write_atomically,
)

UNSAFE_IDS = ["../escape", "a/../../b", "/etc/passwd", "s3://other/x", "C:evil", "back\\slash",
              "nul\x00byte", "a//b", "./here", "trailing/"]


# --------------------------------------------------------------------------- fixtures


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("bad", UNSAFE_IDS + ["", "tab\there", "~root"])
def test_check_id_rejects_keys_that_escape(bad):
    with pytest.raises(ValueError):
        check_id(bad)


@pytest.mark.parametrize("good", ["img_001", "cam1/2024/frame 7", "a.b.c", "x..y", "über"])
def test_check_id_accepts_relative_keys(good):
    assert check_id(good) == good


def test_default_scales_match_tta():
    from deeplab_core.tta import DEFAULT_SCALES as TTA_SCALES

    assert DEFAULT_SCALES == TTA_SCALES


def test_write_atomically_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "masks" / "a.png"
    write_atomically(str(target), b"first")
    assert target.read_bytes() == b"first"

    def crash(src, dst):
        raise OSError("killed mid-rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_atomically(str(target), b"second, never visible")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.png"]  # temp file cleaned up


def test_list_inputs_from_a_prefix(tmp_path):
    root = tmp_path / "incoming"
    (root / "cam1").mkdir(parents=True)
    for rel in ("a.jpg", "cam1/b.PNG", "dup.jpg", "dup.png", "notes.txt", ".hidden.jpg", ".tmp-0123abcd",
                "out/masks/x.png"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    old = datetime(2024, 1, 1, tzinfo=timezone.utc).timestamp()
    os.utime(root / "a.jpg", (old, old))

    listing = list_inputs(str(root), exclude_prefix=str(root / "out"))
    # A hidden image is an input like any other (never a silent drop); our temp files are not.
    assert [i.id for i in listing.items] == [".hidden", "a", "cam1/b", "dup"]
    assert [(e.id, e.stage) for e in listing.errors] == [("dup", "id")]
    assert listing.read == 5 and [(e.id, e.stage) for e in listing.errors] == [("dup", "id")]
    a = listing.items[1]  # what the ledger compares to tell a changed input
    assert (a.size, a.etag, a.mtime) == (1, None, datetime(2024, 1, 1, tzinfo=timezone.utc))

    recent = list_inputs(str(root), since=datetime(2025, 1, 1, tzinfo=timezone.utc),
                         exclude_prefix=str(root / "out"))
    assert [i.id for i in recent.items] == [".hidden", "cam1/b", "dup"] and recent.read == 4


def test_a_missing_input_folder_is_an_input_error_and_an_empty_one_is_not(tmp_path):
    from pipelines.common.errors import InputError

    with pytest.raises(InputError, match="does not exist"):
        list_inputs(str(tmp_path / "typo"))
    (tmp_path / "empty").mkdir()
    assert list_inputs(str(tmp_path / "empty")).read == 0


def test_since_is_rejected_for_manifests(tmp_path):
    uri = write_manifest([{"id": "a", "image_uri": "/x/a.jpg"}], str(tmp_path / "m.csv"))
    with pytest.raises(ValueError, match="prefix"):
        list_inputs(uri, since=datetime.now(timezone.utc))
    with pytest.raises(ValueError, match="ISO"):
        SegmentConfig(model="m", input="i", output="o", since="yesterday-ish")


# --------------------------------------------------------------------------- end to end


# --------------------------------------------------------------------------- resume and watermark




def test_a_tiny_file_with_a_huge_image_is_refused_by_the_default_budget():
    """A 7000 x 7000 1-bit PNG is a few KB; decoded and run through six scales it took a worker
    past 8 GB. The batch job's default cap refuses it from its header, before any decoding."""
    buffer = io.BytesIO()
    Image.new("1", (7000, 7000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 20_000
    cfg = SegmentConfig(model="m", input="i", output="o")
    with pytest.raises(BadInput) as info:
        decode_image(buffer.getvalue(), cfg.max_input_pixels)
    assert info.value.stage == "image" and "exceeds" in info.value.reason
    assert cfg.max_pixels == 2048 * 1024  # and whatever passes is tiled above a Cityscapes frame
