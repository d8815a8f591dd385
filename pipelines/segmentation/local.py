"""`segment.py --local`: the Segmenter over a file or folder in this process, no Ray, no ledger.

For a handful of images (a try, a demo, a laptop): masks go where the batch job puts them
(`<output>/masks/<id>.png`, ids as it derives them), with the same model recipe; nothing is
recorded, so every run segments every input again.
"""

from __future__ import annotations

import time

from pipelines.common.redaction import redact_urls
from pipelines.common.uris import absolute_uri
from pipelines.data.storage import write_atomically
from pipelines.segmentation.config import SegmentConfig
from pipelines.segmentation.io import OutputLayout, list_inputs
from pipelines.segmentation.report import format_scales
from pipelines.segmentation.segmenter import Segmenter


def segmenter_for(cfg: SegmentConfig) -> Segmenter:
    """The Segmenter with the settings `cfg` gives; scales / flip the user did not set come from
    the version's recipe (tags), as in the batch job."""
    given = cfg.tta_given
    return Segmenter.from_uri(
        cfg.model, tracking_uri=cfg.tracking_uri, device=cfg.device,
        scales=cfg.tta.scales if "scales" in given else None, flip=cfg.tta.flip if "flip" in given else None,
        crf=cfg.crf, crf_params=cfg.crf_params.given(), crf_backend=cfg.crf_backend, fusion=cfg.tta.fusion,
        max_pixels=cfg.max_pixels, max_input_pixels=cfg.max_input_pixels, storage_options=cfg.storage_options,
        runtime=cfg.runtime)


def run_local(cfg: SegmentConfig) -> tuple[int, int]:
    """Segments every listed input; returns (ok, errors). An input that cannot be read or
    decoded is one line and counts as an error; it does not stop the others."""
    from pipelines.segmentation.stages.write import _png_bytes

    started = time.monotonic()
    output = absolute_uri(cfg.output).rstrip("/")
    listing = list_inputs(absolute_uri(cfg.input), cfg.storage_options, exclude_prefix=output)
    segmenter = segmenter_for(cfg)
    crf = f"CRF {segmenter.crf_backend}" if segmenter.crf else "no CRF"
    print(f"[segment] local: {len(listing.items)} input(s); model {segmenter.model_uri} on {segmenter.device.type}; "
          f"scales {format_scales(segmenter.scales)}, flip {segmenter.flip}, {crf}", flush=True)
    layout, ok, errors = OutputLayout(output), 0, len(listing.errors)
    for error in listing.errors:
        print(f"[segment] {error.id}: {error.reason}", flush=True)
    for item in listing.items:
        try:
            mask = segmenter(item.uri)
            write_atomically(layout.mask_uri(item.id), _png_bytes(mask), cfg.storage_options)
        except Exception as err:  # noqa: BLE001 - one bad input is a line, not the end of the run
            errors += 1
            print(f"[segment] {item.id}: {redact_urls(f'{type(err).__name__}: {err}')[:300]}", flush=True)
            continue
        ok += 1
    print(f"[segment] local: {ok} ok, {errors} error(s) in {time.monotonic() - started:.1f} s; masks under "
          f"{redact_urls(layout.uri('masks'))}", flush=True)
    return ok, errors
