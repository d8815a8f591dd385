"""Every MLflow call of the project, in one package: runs (runs.py), model logging and
registration and loading from any URI (models.py), registry access: model URIs, version tags,
aliases, the promotion lock (registry.py). Other modules import this package, never mlflow for
these (promotion's rule stays in pipelines/promotion, its registry reads and writes are here).

mlflow (and torch) are imported inside the functions: importing this package stays cheap for Ray
workers and for `--help`.
"""

from pipelines.common.uris import MODEL_FILE, REGISTRY_SCHEMES, WEIGHTS_TAG, is_registry_uri
from pipelines.tracking.models import (
    MODEL_ARTIFACT,
    TORCH_EXPORT_DIR,
    file_sha256,
    load_model,
    log_checkpoint_model,
    register_imported_model,
    registered_version_of_run,
)
from pipelines.tracking.registry import (
    REFERENCE_MANIFEST_TAG,
    downloaded_model,
    log_model_input,
    logged_model_id,
    model_version_tags,
    registered_weights_sha256,
    registry_hint,
    resolve_model_uri,
    set_model_version_tags,
)
from pipelines.tracking.runs import (
    RunLogger,
    check_reachable,
    fail_fast_http,
    find_or_create_run,
    finish_run,
    log_dataset_inputs,
    log_finished_run,
    log_tuning_run,
    tracking_uri_set,
)

__all__ = [
    "MODEL_ARTIFACT", "MODEL_FILE", "REFERENCE_MANIFEST_TAG", "REGISTRY_SCHEMES", "TORCH_EXPORT_DIR", "WEIGHTS_TAG", "RunLogger", "check_reachable",
    "downloaded_model", "fail_fast_http", "file_sha256", "find_or_create_run", "finish_run", "is_registry_uri",
    "load_model", "log_checkpoint_model", "log_dataset_inputs", "log_finished_run", "log_model_input",
    "log_tuning_run", "logged_model_id",
    "model_version_tags", "register_imported_model", "registered_version_of_run", "registered_weights_sha256",
    "registry_hint", "resolve_model_uri", "set_model_version_tags", "tracking_uri_set",
]
