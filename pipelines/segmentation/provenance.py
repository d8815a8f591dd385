"""What made an output's masks, and when a run makes them again (``--redo``).

Each ledger entry (ledger.py) records the model that made it (``models:/name/<version>`` for a
registered model, ``runs:/...`` as given, ``sha256:<hex>`` of the weights for a checkpoint) and the
settings that change the masks: scales, flip, fusion, the CRF set (or no CRF), overlays; the CRF
backend that ran is recorded beside them. A run compares its own with each settled ``ok`` entry:

- ``--redo changed`` (the default): entries made by another model or settings are segmented again.
  An output is then what its model and settings make: after a promotion of ``@champion``, the next
  scheduled run re-segments the output with the new version (a killed run's checkpoints keep what
  it re-did, so a long backfill continues over the following ticks).
- ``--redo none``: settled entries stay as they are (one line says how many differ).
- ``--redo all``: every listed input is segmented again.

Entries written before these fields existed (null) never count as different: an upgrade re-does
nothing by itself (``--redo all`` re-does them). The CRF backend counts only when the run names one
(``--crf-backend pydensecrf|torch``): ``auto`` is "whatever fits the hardware", and the two
backends compute the same mean-field CRF. The model's runtime (``--runtime torch|onnx``) and number
format (``--precision``) are not recorded: an ONNX graph is used only when it matches the eager
model (labels equal, runtime.py), so switching runtimes re-does nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from deeplab_core.constants import CRFParams

REDO_CHANGED, REDO_ALL, REDO_NONE = "changed", "all", "none"
REDO_CHOICES = (REDO_CHANGED, REDO_ALL, REDO_NONE)


@dataclass(frozen=True)
class MadeBy:
    """The model and settings of this run, as ledger entries record them."""

    model: str
    settings: str  # canonical JSON (settings_key)
    crf_backend: str | None = None  # None: auto (not compared)


def model_identity(model_uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """A registry URI as pinned (``models:/name/<version>``, ``runs:/...``); a checkpoint as the
    SHA-256 of its weights file (a path says nothing about what is in it)."""
    from pipelines.data.storage import get_fs
    from pipelines.tracking import MODEL_FILE, is_registry_uri

    if is_registry_uri(model_uri):
        return model_uri
    fs, path = get_fs(model_uri, storage_options)
    if fs.isdir(path):
        path = path.rstrip("/") + "/" + MODEL_FILE
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def settings_key(scales: tuple[float, ...], flip: bool, fusion: str, crf: CRFParams | None, overlays: bool) -> str:
    """The settings that change what a run writes, as one comparable string."""
    return json.dumps({"scales": [float(s) for s in scales], "flip": bool(flip), "fusion": fusion,
                       "crf": asdict(crf) if crf is not None else None, "overlays": bool(overlays)},
                      sort_keys=True)


def made_differently(listed: pa.Table, settled: pa.Table, made: MadeBy,
                     index: pa.Array | None = None) -> np.ndarray:
    """Per listed input (order of ``listed``: columns ``id, uri``): settled ``ok`` by another model,
    other settings, or (when this run names one) another CRF backend. Unknown never counts.
    ``index``: ledger.match's, if the caller has it already."""
    import pyarrow.compute as pc

    from pipelines.segmentation.ledger import match

    n = listed.num_rows
    if n == 0 or settled.num_rows == 0:
        return np.zeros(n, bool)
    # The same hash lookup as ledger.select: no join over the whole ledger on every tick.
    index = match(listed, settled) if index is None else index
    joined = settled.select(["status", "model", "settings", "crf_backend"]).take(index)

    def differs(column: str, value: str) -> pa.ChunkedArray:
        return pc.fill_null(pc.not_equal(joined[column], pa.scalar(value)), False)

    other = pc.or_(differs("model", made.model), differs("settings", made.settings))
    if made.crf_backend is not None:
        other = pc.or_(other, differs("crf_backend", made.crf_backend))
    ok = pc.fill_null(pc.equal(joined["status"], "ok"), False)
    return pc.and_(ok, other).to_numpy(zero_copy_only=False)


def _settings_diff(old: str, new: str) -> str:
    """``scales [0.5, 1.0] -> [1.0]; crf ...``: the fields that differ."""
    try:
        before, after = json.loads(old), json.loads(new)
    except (TypeError, ValueError):
        return "settings"
    parts = [f"{key} {json.dumps(before.get(key))} -> {json.dumps(after.get(key))}"
             for key in sorted(after) if before.get(key) != after.get(key)]
    return "; ".join(parts) or "settings"


def redo_line(count: int, example: Mapping[str, Any], made: MadeBy, redo: str) -> str:
    """The one line a run prints when settled inputs were made differently."""
    what = []
    if example.get("model") and example["model"] != made.model:
        what.append(f"model {example['model']} -> {made.model}")
    if example.get("settings") and example["settings"] != made.settings:
        what.append(_settings_diff(example["settings"], made.settings))
    if made.crf_backend and example.get("crf_backend") and example["crf_backend"] != made.crf_backend:
        what.append(f"CRF backend {example['crf_backend']} -> {made.crf_backend}")
    action = ("segmenting them again (--redo changed)" if redo == REDO_CHANGED
              else "kept as they are (--redo none; --redo changed segments them again)")
    return f"[segment] {count} settled input(s) were made differently ({'; '.join(what)}): {action}"
