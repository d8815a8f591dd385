"""Explicit resume: a run name continues only the run it was started as.

A run records the config fields that define its model and data (`FINGERPRINT_FILE` in the run's
directory under `run.storage_path`). A re-run with the same name and the same fingerprint resumes
from its latest checkpoint (so a killed job simply continues); a different fingerprint stops
before anything starts, naming the fields that differ. `run.resume=force` continues anyway (for
deliberate changes, e.g. more iterations of a different schedule) and records the new fingerprint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pipelines.common.config import flatten
from pipelines.common.errors import InputError
from pipelines.common.redaction import redact
from pipelines.common.uris import join_uri
from pipelines.data.storage import get_fs
from pipelines.training.config import TrainConfig

FINGERPRINT_FILE = "deeplab_fingerprint.json"
_NOT_IDENTITY = ("data.storage_options", "data.max_pixels")  # how data is read, not what it is


def fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """The flattened `model.*` and `data.*` fields (JSON values), without storage settings and with
    passwords in URIs redacted (the file is stored beside the checkpoints)."""
    tree = cfg.model_dump(mode="json", include={"model", "data"})
    return redact({key: value for key, value in flatten(tree).items()
                   if not key.startswith(_NOT_IDENTITY)})


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def check_resume(cfg: TrainConfig, run_dir: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether `run_dir` holds an earlier run of this config (True: it will be resumed). Raises
    InputError if it holds a run of another model or data; records the fingerprint otherwise."""
    fs, path = get_fs(join_uri(run_dir, FINGERPRINT_FILE), storage_options)
    current = fingerprint(cfg)
    try:
        recorded = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        recorded = None
    if recorded is not None and recorded != current and cfg.run.resume != "force":
        changed = differences(recorded, current)
        shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise InputError(f"run {cfg.run.name!r} in {cfg.run.storage_path} was started with another model/data "
                         f"config ({shown}); start a new run with run.name=<new name>, or continue this one "
                         f"with run.resume=force")
    if recorded != current:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, json.dumps(current, indent=1, sort_keys=True).encode())
    return recorded is not None
