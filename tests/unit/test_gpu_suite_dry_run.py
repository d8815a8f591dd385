"""bench/gpu_suite.py cannot rot: its CPU dry run produces every row, the time box holds, the docs
section is only written when asked, and its check list is the test file's."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import gpu_suite, gpu_suite_config

ROOT = Path(__file__).resolve().parents[2]
# Written out here rather than taken from gpu_suite, so a row that disappears fails the test.
EXPECTED_ROWS = [
    ("checks", "bf16 + channels_last training step = fp32"),
    ("checks", "BatchNorm in a 1-process group"),
    ("checks", "batch job's model stage in bf16 autocast = fp32"),
    ("checks", "model-stage replica = pipelines ModelStage"),
    ("checks", "torch CRF labels = pydensecrf"),
    ("train", "DeepLabV3+ mobilenetv2 x0.25 (OS 16), 65x65"),
    ("train", "DeepLabV3 mobilenetv2 x0.25 (OS 16), 65x65"),
    ("ray", "Ray Train (1 worker) vs plain PyTorch"),
    ("segment", "model stage, plain (scale 1, no flip)"),
    ("segment", "model stage, 6 scales + flip:"),
    ("segment", "model stage, 6 scales + flip + torch CRF"),
    ("profile", "torch.profiler"),
]


# Like the GPU machine: none of these is installed (a sitecustomize on PYTHONPATH hides them).
NOT_ON_THE_GPU_MACHINE = ("ray", "pyarrow", "mlflow")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    """One CPU dry run for the module (~20-40 s of CPU on 2 shared cores), with $OUT and --output
    set, and ray / pyarrow / mlflow made unimportable in it and its children."""
    tmp = tmp_path_factory.mktemp("gpu_suite")
    out, doc, hide = tmp / "out", tmp / "benchmarks.md", tmp / "hide"
    doc.write_text("# Benchmarks\n\n## GPU suite\n\nold\n\n## Other\n\nkept\n")
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({NOT_ON_THE_GPU_MACHINE!r}))\n")
    env = dict(os.environ, OUT=str(out), PYTHONPATH=os.pathsep.join([str(hide), str(ROOT)]))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "bench/gpu_suite.py", "--device", "cpu", "--dry-run", "--profile",
                           "--output", str(doc)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    return {"proc": proc, "out": out, "doc": doc.read_text(), "seconds": time.perf_counter() - start}


def test_dry_run_fills_every_row(dry_run: dict) -> None:
    proc = dry_run["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table_rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]  # minus the header
    assert len(table_rows) == len(EXPECTED_ROWS), "\n".join(table_rows)
    for (part, label), line in zip(EXPECTED_ROWS, table_rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == part and label in cells[1], line
        assert cells[2] in ("pass", "ok", "skipped"), line
    result = json.loads((dry_run["out"] / "gpu_suite.json").read_text())
    assert result["dry_run"] and result["environment"]["torch"]
    by_key = {row["key"]: row for row in result["rows"]}
    for key in ("train-deeplabv3plus", "train-deeplabv3"):  # counted FLOPs and a rate
        assert by_key[key]["status"] == "ok" and by_key[key]["tflops"] > 0 and by_key[key]["images_per_s"] > 0
    assert by_key["ms-flip"]["images_per_s"] < by_key["plain"]["images_per_s"]  # 12 forwards cost more than 1
    assert by_key["ray-train"]["status"] == "skipped" and "ray not installed" in by_key["ray-train"]["note"]
    replica = by_key["test_model_stage_replica_matches_job_stage[cpu]"]  # needs pyarrow: skipped, the rest ran
    assert replica["status"] == "skipped" and "not installed" in replica["note"]
    assert "aten::" in (dry_run["out"] / "gpu_suite_profile.txt").read_text()


def test_dry_run_writes_only_its_section(dry_run: dict) -> None:
    doc = dry_run["doc"]
    assert "## Other\n\nkept\n" in doc and "\nold\n" not in doc
    assert "Not a GPU measurement" in doc and "python3.12 bench/gpu_suite.py --output docs/benchmarks.md" in doc
    assert "| train | DeepLabV3+ mobilenetv2" in doc


def test_docs_are_not_written_without_output() -> None:
    assert gpu_suite.parse_args(["--device", "cpu", "--dry-run"]).output is None


def test_checks_list_matches_the_test_file() -> None:
    tree = ast.parse((ROOT / gpu_suite_config.CHECKS_FILE).read_text())  # parsed, not imported: no torch start-up
    tests = {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    assert tests == set(gpu_suite_config.CHECKS)


def test_a_part_over_its_budget_is_killed_and_reported(tmp_path: Path) -> None:
    rows = [gpu_suite_config.Row("x", "a", "a row")]
    start = time.perf_counter()
    outcome, _ = gpu_suite.run_part([sys.executable, "-c", "import time; time.sleep(60)"], 1.0, dict(os.environ), None)
    assert outcome == "timeout" and time.perf_counter() - start < 15
    gpu_suite.merge_results(rows, [], outcome, "", 1.0)
    assert rows[0].status == "timeout" and "1 s budget" in rows[0].note


def test_peak_table_prefers_the_specific_name() -> None:
    assert gpu_suite_config.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.5
    assert gpu_suite_config.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_suite_config.peak_bf16_tflops("NVIDIA H200") == 989.4
    assert gpu_suite_config.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_suite_config.peak_bf16_tflops("Tesla V100-SXM2-16GB") is None


def test_a_measuring_part_over_budget_is_killed_and_the_next_part_still_runs(tmp_path: Path,
                                                                              monkeypatch) -> None:
    """train gets 0.3 s: its child is killed mid-part, and segment runs in a fresh child."""
    import dataclasses

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.delenv("OUT", raising=False)
    cfg = gpu_suite_config.make_config(gpu_suite.parse_args(["--device", "cpu", "--dry-run"]))
    cfg = dataclasses.replace(cfg, budgets={**cfg.budgets, "train": 0.3})
    parts = [p for p in gpu_suite_config.expected_rows(cfg, "skipped: test", profile=False) if p.name in ("train", "segment")]
    gpu_suite.run_bench_parts(parts, cfg, time.perf_counter() + 240, tmp_path, None)
    train, segment = parts
    assert [r.status for r in train.rows] == ["timeout", "timeout"], [r.note for r in train.rows]
    assert [r.status for r in segment.rows] == ["ok", "ok", "ok"], [r.note for r in segment.rows]


def test_section_from_json_equals_the_one_written_by_the_run(dry_run: dict, tmp_path: Path) -> None:
    """What comes back from the device is $OUT only: the section rebuilt from its JSON is the same."""
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## GPU suite\n\nold\n\n## Other\n\nkept\n")
    gpu_suite.section_from_json(str(dry_run["out"] / "gpu_suite.json"), str(doc))
    assert doc.read_text() == dry_run["doc"]
