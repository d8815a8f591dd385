"""The model registry: model URIs (pinning an alias to its version, downloading), a version's
tags and its registered weights digest.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from pipelines.common.errors import InputError
from pipelines.common.uris import WEIGHTS_TAG

REFERENCE_MANIFEST_TAG = "val_manifest"  # on a version: what it was measured on; on the model: the reference

def registered_weights_sha256(model_uri: str, client=None) -> str | None:
    """The `weights.sha256` tag of the registered version a `models:/name/<version>` or
    `models:/name@alias` URI names (current tracking URI, or `client`'s); None for other URIs
    (`runs:/`, paths: not registered). Raises InputError for a version without the tag."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([^/]+))", model_uri)
    if match is None:
        return None
    import mlflow

    client = client or mlflow.MlflowClient()
    name, number, alias = match.groups()
    version = (client.get_model_version(name, number) if number
               else client.get_model_version_by_alias(name, alias))
    expected = (version.tags or {}).get(WEIGHTS_TAG)
    if not expected:
        raise InputError(f"version {version.version} of {name!r} has no {WEIGHTS_TAG} tag (registered before "
                         "weight checks): check its model.pt and tag it (docs/operations.md, weight integrity)")
    return expected


@contextmanager
def downloaded_model(uri: str) -> Iterator[str]:
    """A local directory holding the artifacts of a `models:/` or `runs:/` URI (current tracking
    URI), removed after the block."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        yield mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)


def resolve_model_uri(uri: str) -> str:
    """`models:/name@alias` -> `models:/name/<version>`, so every worker loads the same version
    even if the alias moves during a run. Other URIs are returned unchanged."""
    match = re.fullmatch(r"models:/([^/@]+)@([^/]+)", uri)
    if match is None:
        return uri
    import mlflow

    version = mlflow.MlflowClient().get_model_version_by_alias(match.group(1), match.group(2))
    return f"models:/{match.group(1)}/{version.version}"


_MODEL_URI = re.compile(r"models:/([^/@]+)(?:/(\d+)|@([^/]+))?")


def registry_hint(uri: str, client=None) -> str:
    """For a `models:/` URI that did not resolve: what the registry does have, as the end of an
    error line ("; deeplab has aliases champion (v3) and versions 1-4", "; registered models:
    deeplab, other; did you mean deeplab?"). Empty when it cannot say (no registry URI, server
    down, nothing registered)."""
    import difflib

    match = _MODEL_URI.fullmatch(uri)
    if match is None:
        return ""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = client or mlflow.MlflowClient()
    name = match.group(1)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        try:
            names = sorted(m.name for m in client.search_registered_models(max_results=50))
        except MlflowException:
            return ""
        if not names:
            return "; the registry has no registered models yet"
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        return f"; registered models: {', '.join(names)}" + (f"; did you mean {close[0]}?" if close else "")
    try:
        numbers = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    except MlflowException:
        numbers = []
    aliases = ", ".join(f"{alias} (v{version})" for alias, version in sorted((model.aliases or {}).items()))
    if len(numbers) == 1:
        versions = f"version {numbers[0]}"
    elif numbers and numbers[-1] - numbers[0] + 1 == len(numbers):
        versions = f"versions {numbers[0]}-{numbers[-1]}"
    else:
        versions = f"versions {', '.join(map(str, numbers)) or 'none'}"
    return f"; {name} has aliases {aliases or 'none'} and {versions}"


def _version_of(model_uri: str) -> tuple[str, str]:
    """`models:/name/<version>` -> (name, version); aliases must be resolved first."""
    match = re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri)
    if match is None:
        raise ValueError(f"expected models:/<name>/<version>, got {model_uri!r}")
    return match.group(1), match.group(2)


def logged_model_id(version) -> str | None:
    """The logged model a registered version was made from: its `model_id`, or (stores that do
    not keep it, e.g. sqlite) the id in its `models:/m-...` source."""
    source = version.source or ""
    return version.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else None)


def log_model_input(run_id: str, model_uri: str) -> None:
    """The registered version `models:/name/<version>` a run used, as the run's model input (the
    run page links the model). Versions registered without a logged model are left out."""
    import mlflow
    from mlflow.entities import LoggedModelInput

    name, version = _version_of(model_uri)
    client = mlflow.MlflowClient()
    model_id = logged_model_id(client.get_model_version(name, version))
    if model_id:
        client.log_inputs(run_id, models=[LoggedModelInput(model_id)])


def model_version_tags(model_uri: str) -> dict[str, str]:
    """The tags of the registered version `models:/name/<version>` (current tracking URI)."""
    import mlflow

    name, version = _version_of(model_uri)
    return dict(mlflow.MlflowClient().get_model_version(name, version).tags or {})


def set_model_version_tags(model_uri: str, tags: Mapping[str, str]) -> None:
    """Tags on the registered version `models:/name/<version>` (current tracking URI)."""
    import mlflow

    name, version = _version_of(model_uri)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
