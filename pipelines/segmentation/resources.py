"""Does the job's resource plan fit the cluster it runs on? Checked before Ray Data starts.

Ray Data waits for resources without end and without a word: on a 2-CPU machine a model actor
of 2 CPUs left the decode tasks (0.5 CPU) no CPU, and no mask came. What must fit: every model
actor at once, and beside them room for a decode task and, with the CPU CRF, for a CRF task
(the writes need no CPU). The check places the actors on the nodes' CPUs/GPUs (first fit,
largest first) and refuses a plan that does not fit, with one line saying what would.
Refused rather than adapted: the actor size is the user's choice of torch threads per model,
and a run quietly slower than asked is harder to notice than an exit code 2 with the fitting
value in it. (A cluster that autoscales may grow to
fit; its nodes are counted as they are now.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DECODE_CPUS = 0.5  # below the model actor's 1: Ray Data does not fuse decode into the actors
CRF_CPUS = 1.0  # pydensecrf: one process per image at a time


@dataclass(frozen=True)
class Unit:
    """One actor or task that must be running for the pipeline to move."""

    name: str
    cpus: float
    gpus: float = 0.0


def pipeline_units(num_model_actors: int, cpus_per_model_actor: float, gpu: bool,
                   cpu_crf: bool) -> tuple[list[Unit], list[Unit]]:
    """(the model actors, which hold their resources for the whole run; the tasks, each of which
    must find room beside them: one decode task, one CRF task with the CPU CRF)."""
    actor = Unit("model actor", 1.0, 1.0) if gpu else Unit("model actor", cpus_per_model_actor)
    tasks = [Unit("decode task", DECODE_CPUS)] + ([Unit("CRF task", CRF_CPUS)] if cpu_crf else [])
    return [actor] * num_model_actors, tasks


def fits(actors: Sequence[Unit], tasks: Sequence[Unit], nodes: Sequence[Mapping[str, float]]) -> bool:
    """Whether the actors can all hold their CPUs/GPUs at once on these nodes (first fit,
    largest first) and each task then still has room on some node. Tasks come and go: the
    decode and CRF tasks need not run at the same time (on 2 CPUs they take turns beside a
    1-CPU actor), but one that never gets room stalls the stream for good."""
    free = [[float(n.get("CPU", 0)), float(n.get("GPU", 0))] for n in nodes]

    def room(node: list[float], unit: Unit) -> bool:
        return node[0] + 1e-9 >= unit.cpus and node[1] + 1e-9 >= unit.gpus

    for actor in sorted(actors, key=lambda u: (u.gpus, u.cpus), reverse=True):
        node = next((node for node in free if room(node, actor)), None)
        if node is None:
            return False
        node[0] -= actor.cpus
        node[1] -= actor.gpus
    return all(any(room(node, task) for node in free) for task in tasks)


def plan_problem(num_model_actors: int, cpus_per_model_actor: float, gpu: bool, cpu_crf: bool,
                 nodes: Sequence[Mapping[str, float]]) -> str | None:
    """None when the plan fits the nodes, else one line: what it needs, what the cluster has,
    and the settings that fit (fewer CPUs per actor, else fewer actors)."""
    actors, tasks = pipeline_units(num_model_actors, cpus_per_model_actor, gpu, cpu_crf)
    if fits(actors, tasks, nodes):
        return None
    actor = actors[0]
    need = (f"{num_model_actors} model actor(s) of {actor.cpus:g} CPU"
            + (f" + {actor.gpus:g} GPU" if actor.gpus else "")
            + " must run with room beside them for " + " and ".join(f"a {t.name} ({t.cpus:g} CPU)" for t in tasks))
    have = ", ".join(f"{n.get('CPU', 0):g} CPU" + (f" + {n.get('GPU', 0):g} GPU" if n.get("GPU") else "")
                     for n in nodes) or "no nodes"
    hint = _what_fits(num_model_actors, cpus_per_model_actor, gpu, cpu_crf, nodes)
    return f"resource plan does not fit the cluster: {need}; its nodes have {have}; {hint}"


def _what_fits(num_model_actors: int, cpus: float, gpu: bool, cpu_crf: bool,
               nodes: Sequence[Mapping[str, float]]) -> str:
    if not gpu:
        steps = [c / 2 for c in range(int(cpus * 2) - 1, 0, -1)]  # 0.5-CPU steps below the asked size
        for smaller in steps:
            if fits(*pipeline_units(num_model_actors, smaller, gpu, cpu_crf), nodes):
                return f"what fits: --cpus-per-model-actor {smaller:g}"
    for fewer in range(num_model_actors - 1, 0, -1):
        size = 1.0 if gpu else min(cpus, 1.0)
        if fits(*pipeline_units(fewer, size, gpu, cpu_crf), nodes):
            return f"what fits: --num-model-actors {fewer}" + ("" if gpu else f" --cpus-per-model-actor {size:g}")
    none = "no setting of --num-model-actors / --cpus-per-model-actor fits"
    return none + (" (--no-crf frees a CPU)" if cpu_crf else "")


def cluster_nodes() -> list[dict[str, float]]:
    """The CPU/GPU totals of the cluster's live nodes (the connected Ray cluster)."""
    import ray

    return [{"CPU": n["Resources"].get("CPU", 0.0), "GPU": n["Resources"].get("GPU", 0.0)}
            for n in ray.nodes() if n.get("Alive")]
