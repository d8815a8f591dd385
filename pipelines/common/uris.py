"""URIs as every job spells them: fsspec protocols, local or not, joined, made absolute."""

from __future__ import annotations

import os
import posixpath

import fsspec


def protocol_of(uri: str) -> str:
    """``"s3"`` for ``s3://b/k``, ``"file"`` for local paths."""
    protocol = fsspec.core.split_protocol(str(uri))[0]
    return protocol or "file"


def is_local(uri: str) -> bool:
    return protocol_of(uri) in ("file", "local")


def join_uri(base: str, *parts: str) -> str:
    """``join_uri("s3://b/root", "a", "x.png") == "s3://b/root/a/x.png"``; keeps local paths plain."""
    base = str(base)
    if is_local(base) and "://" not in base:
        return os.path.join(base, *parts)
    return posixpath.join(base.rstrip("/"), *parts)


def absolute_uri(uri: str) -> str:
    """Local plain paths made absolute (manifests are read on Ray workers with another cwd)."""
    uri = str(uri)
    return os.path.abspath(uri) if is_local(uri) and "://" not in uri else uri


# Model URIs. A registered version's tag: sha256 of its model.pt, set when it is registered. Every
# load compares it with the bytes it read, so weights replaced in the artifact store are refused.
REGISTRY_SCHEMES = ("models:/", "runs:/")
WEIGHTS_TAG = "weights.sha256"
MODEL_FILE = "model.pt"  # a checkpoint folder's weights, also the logged model's artifact
# MLflow where no server is given (embedded defaults: a fresh clone runs with no servers).
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(explicit: str | None) -> str:
    """The tracking URI a registry command uses: the flag, else $MLFLOW_TRACKING_URI, else the default."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def is_registry_uri(uri: str) -> bool:
    """An MLflow model URI (`models:/...`, `runs:/...`), resolved against the tracking server."""
    return uri.startswith(REGISTRY_SCHEMES)
