"""Before a job runs on a Ray cluster of several nodes: every path its Ray workers touch must be
one that every node reaches.

A local path (or `memory://`) on a multi-node cluster is the driver's disk only: checkpoints fail
late ("Unable to set up cluster storage"), a worker reads an empty folder, and a sqlite tracking
URI silently becomes a separate database on whichever node rank 0 lands on. So such paths are
refused here, in one line that names them and says what to use instead, unless the user says they
are on a filesystem every node mounts at the same place (NFS): `--shared-fs` (training also:
`run.shared_fs=true`).

"Several nodes" means: another node is alive, or the driver's own node has no CPU for workers
(an autoscaling cluster whose head runs no tasks will put every worker elsewhere).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping

from pipelines.common.errors import InputError
from pipelines.common.redaction import redact_urls
from pipelines.common.uris import protocol_of

SHARED_FS_FLAG = "--shared-fs"
_NODE_LOCAL_PROTOCOLS = ("file", "local", "memory")
_FILE_TRACKING_SCHEMES = ("sqlite:", "file:")


def is_node_local(uri: str) -> bool:
    """Whether `uri` lives on one machine (a local path, file://, memory://)."""
    return protocol_of(uri) in _NODE_LOCAL_PROTOCOLS


def is_node_local_tracking(uri: str) -> bool:
    """Whether an MLflow tracking URI is a file on one machine (sqlite, file:, a plain path)
    rather than a server or a database every node connects to."""
    if uri == "databricks" or uri.startswith("databricks:"):
        return False
    return uri.startswith(_FILE_TRACKING_SCHEMES) or "://" not in uri  # plain path: a file store


def cluster_nodes() -> tuple[int, bool]:
    """(alive nodes, whether the driver's node has CPUs for workers) of the connected cluster."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    alive = [node for node in ray.nodes() if node.get("Alive")]
    driver_cpus = next((node.get("Resources", {}).get("CPU", 0) for node in alive if node["NodeID"] == here), 0)
    return len(alive), driver_cpus > 0


def needs_shared_paths() -> tuple[bool, str]:
    """(whether the job's workers may run on another node than the driver, the cluster in words).
    Without RAY_ADDRESS and no Ray connected, the job starts its own one-node Ray: False."""
    if not os.environ.get("RAY_ADDRESS"):
        ray = sys.modules.get("ray")  # not imported for this: a no-op tick never loads Ray
        if ray is None or not ray.is_initialized():
            return False, "a local Ray"
    from pipelines.common.ray_session import ensure_ray

    ensure_ray()
    nodes, driver_runs_workers = cluster_nodes()
    if nodes > 1:
        return True, f"this Ray cluster has {nodes} nodes"
    if not driver_runs_workers:
        return True, "this Ray cluster's head runs no workers (they start on other nodes)"
    return False, "a one-node Ray cluster"


def refusal(paths: Mapping[str, str], tracking: Mapping[str, str], cluster: str) -> str | None:
    """The one-line refusal for node-local `paths` ({setting: URI}) and `tracking` URIs, or None."""
    local = {name: uri for name, uri in paths.items() if uri and is_node_local(uri)}
    files = {name: uri for name, uri in tracking.items() if uri and is_node_local_tracking(uri)}
    if not local and not files:
        return None
    parts = []
    if local:
        shown = ", ".join(f"{name}={redact_urls(uri)}" for name, uri in local.items())
        parts.append(f"{shown}: use s3://bucket/... (or another object store) for {'it' if len(local) == 1 else 'each'}")
    if files:
        shown = ", ".join(f"{name}={redact_urls(uri)}" for name, uri in files.items())
        parts.append(f"{shown}: use an MLflow server every node reaches (http://<host>:5000)")
    return (f"{cluster}, and these paths are on one node's disk: {'; '.join(parts)}; "
            f"or pass {SHARED_FS_FLAG} if they are on a filesystem every node mounts at the same place (NFS)")


def check_shared_paths(paths: Mapping[str, str | None], tracking: Mapping[str, str | None] | None = None,
                       shared_fs: bool = False, uris: Iterable[tuple[str, str]] = ()) -> None:
    """Raises one InputError when the job's Ray workers may run on other nodes and a path they
    use is on this node only. `paths`: {setting name: URI}; `tracking`: {setting: MLflow tracking
    URI} used by the workers; `uris`: (where, URI) pairs found inside inputs (manifest rows), of
    which the first node-local one is named when `paths` themselves are shared. Connects to the
    cluster to count its nodes."""
    if shared_fs:
        return
    multi, cluster = needs_shared_paths()
    if not multi:
        return
    named = {name: uri for name, uri in paths.items() if uri}
    if not any(is_node_local(uri) for uri in named.values()):  # else the rows are under a named path
        for where, uri in uris:
            if uri and is_node_local(uri):
                named[where] = uri
                break
    message = refusal(named, {name: uri for name, uri in (tracking or {}).items() if uri}, cluster)
    if message:
        raise InputError(message)
