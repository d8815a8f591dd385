"""engine auto's rule (pipelines/segmentation/engine.py) as a pure function, and the signal it
takes from the lease: a run that died before this one."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import pytest

from pipelines.segmentation import engine, lease

SMALL = dict(inputs=12, local_max_inputs=64, cpu_crf=False, attached=False, previous_died=False,
             local_max_crf_inputs=16)


def test_auto_runs_a_small_plain_job_in_this_process():
    chosen, why = engine.choose("auto", **SMALL)
    assert chosen == engine.LOCAL
    assert engine.engine_line(chosen, 12, why) == ("[segment] 12 input(s): segmenting in this process "
                                                   "(--engine auto; Ray above 64 inputs, 16 with the CPU CRF)")
    assert engine.choose("auto", **{**SMALL, "inputs": 64})[0] == engine.LOCAL  # the threshold is inclusive
    assert engine.choose("auto", **{**SMALL, "cpu_crf": True, "inputs": 16})[0] == engine.LOCAL


@pytest.mark.parametrize("change, reason", [
    ({"cpu_crf": True, "inputs": 17}, "more than local_max_crf_inputs=16 inputs with the CPU CRF"),
    ({"inputs": 65}, "more than local_max_inputs=64"),
    ({"previous_died": True}, "died"),
    ({"attached": True}, "attached to a Ray cluster"),
])
def test_auto_keeps_ray_for_the_cpu_crf_many_inputs_a_dead_run_or_a_cluster(change, reason):
    chosen, why = engine.choose("auto", **{**SMALL, **change})
    assert chosen == engine.RAY and reason in why
    assert engine.engine_line(chosen, 12, why).startswith("[segment] 12 input(s): segmenting on Ray (--engine auto")


def test_an_engine_given_is_the_engine_used():
    worst = {**SMALL, "cpu_crf": True, "inputs": 10**6, "previous_died": True, "attached": True}
    assert engine.choose("local", **worst) == (engine.LOCAL, "--engine local")
    assert engine.choose("ray", **SMALL) == (engine.RAY, "--engine ray")


def test_ray_address_or_a_joined_ray_means_a_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert engine.attached_to_cluster()
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: True))  # a Ray joined here
    assert engine.attached_to_cluster()


def test_the_lease_tells_whether_the_previous_run_died(tmp_path):
    out = str(tmp_path / "out")
    first = lease.acquire(out, "first", ttl_s=0.3)
    assert not first.previous_died  # no run before it
    first.release()
    second = lease.acquire(out, "second", ttl_s=0.3)
    assert not second.previous_died  # released: ended as a run ends
    second._stop.set()  # dies: the heartbeat stops, nothing is released
    time.sleep(0.5)
    third = lease.acquire(out, "third", ttl_s=30)
    assert third.previous_died
    third.release()
