"""The resource-plan check of batch segmentation (pipelines/segmentation/resources.py)."""

from __future__ import annotations

from pipelines.segmentation.resources import plan_problem


def test_a_two_cpu_actor_on_a_two_cpu_machine_is_refused_with_what_fits():
    problem = plan_problem(1, 2.0, gpu=False, cpu_crf=True, nodes=[{"CPU": 2.0}])
    assert problem is not None and "\n" not in problem
    assert "1 model actor(s) of 2 CPU" in problem and "nodes have 2 CPU" in problem
    assert problem.endswith("what fits: --cpus-per-model-actor 1")  # decode and CRF take turns beside it
    # the suggestion does fit
    assert plan_problem(1, 1.0, gpu=False, cpu_crf=True, nodes=[{"CPU": 2.0}]) is None


def test_without_the_cpu_crf_a_bigger_actor_fits():
    assert plan_problem(1, 1.5, gpu=False, cpu_crf=False, nodes=[{"CPU": 2.0}]) is None
    assert plan_problem(1, 1.5, gpu=False, cpu_crf=True, nodes=[{"CPU": 2.0}]) is not None


def test_actors_are_placed_per_node_not_on_the_sum():
    # 4 CPUs in all, but no node holds a 3-CPU actor
    problem = plan_problem(1, 3.0, gpu=False, cpu_crf=False, nodes=[{"CPU": 2.0}, {"CPU": 2.0}])
    assert problem is not None and problem.endswith("--cpus-per-model-actor 2")  # decode on the other node
    assert plan_problem(2, 1.5, gpu=False, cpu_crf=False, nodes=[{"CPU": 2.0}, {"CPU": 2.0}]) is None


def test_gpu_actors_need_a_gpu_each_and_fewer_actors_are_suggested():
    nodes = [{"CPU": 8.0, "GPU": 1.0}]
    problem = plan_problem(2, 1.0, gpu=True, cpu_crf=False, nodes=nodes)
    assert problem is not None and "1 GPU" in problem and problem.endswith("what fits: --num-model-actors 1")
    assert plan_problem(1, 1.0, gpu=True, cpu_crf=False, nodes=nodes) is None


def test_nothing_fits_says_so():
    problem = plan_problem(1, 1.0, gpu=False, cpu_crf=True, nodes=[{"CPU": 1.0}])
    assert problem is not None and "no setting" in problem and "--no-crf" in problem
