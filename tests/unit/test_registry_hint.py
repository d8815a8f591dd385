"""A models:/ URI that does not resolve says what the registry has (names, aliases, versions)."""

from __future__ import annotations

import mlflow
import pytest

from pipelines import tracking
from pipelines.common.errors import InputError
from pipelines.segmentation.pipeline import load_checked_model


@pytest.fixture
def registry(sqlite_tracking_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    client = mlflow.MlflowClient(sqlite_tracking_uri)
    client.create_registered_model("deeplab")
    for _ in range(3):
        client.create_model_version("deeplab", source=str(tmp_path))
    client.set_registered_model_alias("deeplab", "champion", "2")
    client.set_registered_model_alias("deeplab", "challenger", "3")
    with tracking.tracking_uri_set(sqlite_tracking_uri):
        yield client


def test_an_unknown_alias_lists_the_aliases_and_versions(registry):
    with pytest.raises(InputError) as err:
        load_checked_model("models:/deeplab@champoin", None, load=False)
    assert str(err.value).startswith("cannot load model models:/deeplab@champoin: ")
    assert str(err.value).endswith("; deeplab has aliases challenger (v3), champion (v2) and versions 1-3")


def test_an_unknown_name_lists_the_registered_models_with_the_closest(registry):
    assert tracking.registry_hint("models:/deeplap@champion") == (
        "; registered models: deeplab; did you mean deeplab?")
    assert tracking.registry_hint("models:/other/1") == "; registered models: deeplab"


def test_an_unknown_version_lists_the_versions(registry):
    assert tracking.registry_hint("models:/deeplab/7") == (
        "; deeplab has aliases challenger (v3), champion (v2) and versions 1-3")
    registry.delete_model_version("deeplab", "2")  # gaps: the versions one by one (its alias goes with it)
    assert tracking.registry_hint("models:/deeplab/7") == "; deeplab has aliases challenger (v3) and versions 1, 3"


def test_no_hint_for_paths_or_an_empty_registry(sqlite_tracking_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with tracking.tracking_uri_set(sqlite_tracking_uri):
        assert tracking.registry_hint("/checkpoints/best") == ""
        assert tracking.registry_hint("models:/deeplab@champion") == "; the registry has no registered models yet"


def test_promote_names_what_exists(registry):
    from pipelines.tracking.promotion import UsageError, resolve_candidate

    with pytest.raises(UsageError, match=r"'deeplb' does not exist; registered models: deeplab; did you mean deeplab\?"):
        resolve_candidate(registry, "deeplb", "latest")
    with pytest.raises(UsageError, match=r"has no version 9; deeplab has aliases .* and versions 1-3$"):
        resolve_candidate(registry, "deeplab", "9")
