"""GPU suite: one command that proves the GPU path and records its figures (docs/benchmarks.md).

Parts, each in its own child process with its own time budget (a part that runs over is killed
and its missing rows are reported as timed out; the suite never hangs):

  checks    pytest tests/unit/test_gpu_path.py: bf16 + channels_last step vs fp32, SyncBatchNorm in
            a 1-process NCCL group (CPU: gloo + plain BN), the batch job's model stage in bf16,
            torch CRF vs pydensecrf - each test on cpu and, where there is one, cuda
  train     plain PyTorch training throughput and MFU of DeepLabV3+-R101 and DeepLabV3-R101 at
            513x513, bf16 autocast, channels_last, synthetic tensors; FLOPs counted with
            FlopCounterMode on one forward+backward step; peak memory
  ray       the same through Ray Train (bench/train_throughput.py), ratio to its plain loop;
            only where ray is installed (it is not on the lent GPU machine)
  segment   the batch job's model stage (bench/gpu_path.py: ModelStage's computation) on
            500x375 images, DeepLabV3+-R101, 21 classes: plain, 6 scales + flip, + torch CRF on
            the device after TTA
  profile   with --profile: torch.profiler over a few DeepLabV3+-R101 training steps, the
            key_averages table written to $OUT/gpu_suite_profile.txt

Writes the table to stdout, $OUT/gpu_suite.json (when $OUT is set) and, with --output, the
"## GPU suite" section of that Markdown file. Exit status 1 if a check failed or a part did not
finish. No ray, pyarrow or mlflow is imported outside the optional ray part.

    python3.12 bench/gpu_suite.py --output docs/benchmarks.md      # on the GPU machine (~3-8 min)
    python bench/gpu_suite.py --device cpu --dry-run               # tiny sizes on CPU, < 1 min
    python bench/gpu_suite.py --device cuda --dry-run              # tiny sizes on the GPU: setup check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_suite_config import (  # noqa: E402
    CHECKS_FILE,
    MIN_PART_SECONDS,
    STATUS_GOOD,
    Config,
    Part,
    Row,
    expected_rows,
    log,
    make_config,
    ray_state,
)
from bench.report import replace_section  # noqa: E402

SECTION = "GPU suite"
# --------------------------------------------------------------------------- running a part


def run_part(command: list[str], budget_s: float, env: dict[str, str], log_path: Path | None) -> tuple[str, str]:
    """Runs one child in its own process group; kills the group at the budget.
    Returns (outcome 'ok' | 'timeout' | 'error: ...', combined output)."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=budget_s)
        outcome = "ok" if proc.returncode == 0 else f"error: exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        outcome = "timeout"
    if log_path is not None:
        log_path.write_text(output or "")
    return outcome, output or ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def merge_results(rows: list[Row], records: list[dict], outcome: str, output: str, budget_s: float,
                  why: str | None = None) -> None:
    """Fills the expected rows from the child's records; rows it never reported say why."""
    by_key = {r["key"]: r for r in records if r.get("type") == "row"}
    for row in rows:
        record = by_key.get(row.key)
        if record is not None:
            for name, value in record.items():
                if name not in ("type", "key", "part", "label") and hasattr(row, name):
                    setattr(row, name, value)
        elif outcome == "timeout":
            row.status, row.note = "timeout", why or f"part exceeded its {budget_s:.0f} s budget"
        else:
            row.status = "error"
            row.note = f"not reported ({outcome}): {_last_line(output)}"


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a child killed mid-write leaves half a line
            records.append(json.loads(line))
    return records


def child_env(cfg: Config) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if cfg.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run stays on the CPU even on a GPU machine
    return env


def checks_command(junit: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider", f"--junitxml={junit}",
            CHECKS_FILE]


def checks_records(junit: Path, output: str) -> list[dict]:
    """Per-test outcomes from the JUnit XML, else (a killed pytest writes none) from -v lines."""
    records: list[dict] = []
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            status, note = "pass", ""
            for tag, name in (("failure", "fail"), ("error", "fail"), ("skipped", "skipped")):
                element = case.find(tag)
                if element is not None:
                    status = name
                    note = (element.get("message") or "").strip().splitlines()[0][:200] if element.get("message") else ""
                    break
            records.append({"type": "row", "key": case.get("name"), "status": status,
                            "seconds": float(case.get("time") or 0), "note": note})
        return records
    for line in output.splitlines():
        if "::" in line and any(word in line for word in ("PASSED", "FAILED", "SKIPPED", "ERROR")):
            key = line.split("::", 1)[1].split()[0]
            status = "pass" if "PASSED" in line else "skipped" if "SKIPPED" in line else "fail"
            records.append({"type": "row", "key": key, "status": status})
    return records


STARTUP_S = 90  # a bench child's imports and CUDA context before its first part starts
EXIT_GRACE_S = 15  # after its last part, a child still running this long is killed (not a failure)


def run_checks(part: Part, cfg: Config, budget: float, scratch: Path, log_dir: Path | None) -> dict:
    junit = scratch / "checks.xml"
    outcome, output = run_part(checks_command(junit), budget, child_env(cfg),
                               log_dir / "gpu_suite_checks.log" if log_dir else None)
    records = checks_records(junit, output)
    if outcome.startswith("error") and records:
        outcome = "ok"  # pytest exits 1 when a test fails; the rows say which
    merge_results(part.rows, records, outcome, output, budget)
    return {"outcome": outcome, "output": output}


def _budget(cfg: Config, name: str, deadline: float) -> float:
    return min(cfg.budgets[name], deadline - time.perf_counter())


def run_bench_parts(parts: list[Part], cfg: Config, deadline: float, scratch: Path, log_dir: Path | None) -> list[dict]:
    """The measuring parts run in turn in one child (one torch import and CUDA context for all),
    watched from here: a part past its budget gets the child killed, its missing rows marked
    timed out, and a fresh child carries on with the parts after it. A part that raises ends its
    child too (a CUDA error can poison the context), so the next part also starts fresh."""
    config_path = scratch / "config.json"
    config_path.write_text(json.dumps(asdict(cfg)))
    pending, records, attempt = list(parts), [], 0
    while pending:
        if deadline - time.perf_counter() < MIN_PART_SECONDS:
            for part in pending:
                for row in part.rows:
                    row.status, row.note = "skipped", "suite time limit reached"
            break
        attempt += 1
        results = scratch / f"bench-{attempt}.jsonl"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(p.name for p in pending),
                   "--config", str(config_path), "--results", str(results)]
        log(f"bench child {attempt}: {', '.join(p.name for p in pending)}")
        output, killed = _watch(command, cfg, pending, results, deadline)
        if log_dir is not None:
            (log_dir / f"gpu_suite_bench_{attempt}.log").write_text(output)
        child = read_records(results)
        records += child
        started = [r["part"] for r in child if r.get("type") == "start"]
        ended = {r["part"] for r in child if r.get("type") == "end"}
        errors = {r["part"]: r["message"] for r in child if r.get("type") == "error"}
        for part in list(pending):
            if part.name in ended or part.name in errors or part.name in killed or part.name in started:
                outcome = ("timeout" if part.name in killed else
                           f"error: {errors[part.name]}" if part.name in errors else
                           "ok" if part.name in ended else "error: the child process died during this part")
                merge_results(part.rows, child, outcome, output, cfg.budgets[part.name], killed.get(part.name))
                log(f"{part.name}: {outcome}")
                pending.remove(part)
        if pending and not started:  # died before its first part: nothing will get further
            for part in pending:
                merge_results(part.rows, [], "error: bench child exited early", output, 0)
            print(output[-3000:], file=sys.stderr)
            break
    return records


def _watch(command: list[str], cfg: Config, pending: list[Part], results: Path,
           deadline: float) -> tuple[str, dict[str, str]]:
    """Runs a bench child, killing it when its current part (or its start-up) runs over.
    Returns (its output, {the part it was killed in: why})."""
    out_path = results.with_suffix(".log")
    with out_path.open("w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=child_env(cfg), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        launched, killed = time.perf_counter(), {}
        while proc.poll() is None:
            time.sleep(0.2)
            records = read_records(results)
            current = _current_part(records)
            finished = [r["time"] for r in records if r.get("type") in ("end", "error")]
            if len(finished) == len(pending):  # all done; only its exit is left (Ray's can hang)
                if time.time() - finished[-1] > EXIT_GRACE_S:
                    _kill(proc)
                continue
            name = current[0] if current else pending[len(finished)].name
            if current is None:  # starting up, or between two parts
                why = (f"the child's start-up took over {STARTUP_S} s"
                       if not finished and time.perf_counter() - launched > STARTUP_S else "")
            else:
                why = (f"part exceeded its {cfg.budgets[name]:.0f} s budget"
                       if time.time() - current[1] > cfg.budgets[name] else "")
            if not why and time.perf_counter() > deadline:
                why = "the suite's --time-limit was reached"
            if why:
                _kill(proc)
                killed[name] = why
    return out_path.read_text(), killed


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _current_part(records: list[dict]) -> tuple[str, float] | None:
    ended = {r["part"] for r in records if r.get("type") in ("end", "error")}
    running = [r for r in records if r.get("type") == "start" and r["part"] not in ended]
    return (running[-1]["part"], running[-1]["time"]) if running else None


def run_suite(cfg: Config, parts: list[Part], time_limit_s: float, scratch: Path) -> tuple[dict, float]:
    """Runs every part within its budget and the suite's time limit; returns (environment, seconds)."""
    start = time.perf_counter()
    deadline = start + time_limit_s
    log_dir = Path(cfg.out_dir) if cfg.out_dir else None
    todo = [part for part in parts if part.rows and part.rows[0].status == "pending"]  # not decided up front
    checks = [part for part in todo if part.name == "checks"]
    for part in checks:
        budget = _budget(cfg, "checks", deadline)
        log(f"checks: pytest {CHECKS_FILE} (budget {budget:.0f} s)")
        result = run_checks(part, cfg, budget, scratch, log_dir)
        log(f"checks: {result['outcome']} in {time.perf_counter() - start:.1f} s")
        if result["outcome"] != "ok":
            print(result["output"][-3000:], file=sys.stderr)
    records = run_bench_parts([p for p in todo if p.name != "checks"], cfg, deadline, scratch, log_dir)
    env_info = next((r for r in records if r.get("type") == "env"), {})
    return env_info, time.perf_counter() - start


# --------------------------------------------------------------------------- report


def _num(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[Row]) -> str:
    lines = ["| part | measurement | status | images/s | ms (step or image) | TFLOP/s | MFU | peak GPU MiB | notes |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        note = r.note if r.seconds is None else f"{r.seconds:.1f} s" + (f"; {r.note}" if r.note else "")
        mfu = "" if r.mfu_pct is None else f"{r.mfu_pct:.1f} %"
        lines.append(f"| {r.part} | {r.label} | {r.status} | {_num(r.images_per_s, 2)} | {_num(r.ms)} | "
                     f"{'' if r.tflops is None else f'{r.tflops:.3g}'} | {mfu} | {_num(r.peak_mib, 0)} | {note.replace('|', '/')} |")
    return "\n".join(lines)


HOW_TO = """\
How to run it on the lent GPU machine (Python 3.12, torch preinstalled, no package index): build
the offline wheelhouse here with `make wheelhouse` (docs/operations.md section 8), then call the
device tool with carry `["wheelhouse/gpu"]`, timeout_s 560 (the suite stops itself after
`--time-limit`, 480 s by default) and the command

```text
python3.12 -m pip install -q --no-index --find-links wheelhouse/gpu -r infra/wheelhouse-gpu.txt && python3.12 bench/gpu_suite.py --output docs/benchmarks.md
```

(pip refusing with `externally-managed-environment`: add `--break-system-packages`.) `--profile`
adds a torch.profiler table; `python3.12 bench/gpu_suite.py --device cuda --dry-run` is a
1-minute setup check; `--parts train,segment` reruns only those. Results come back in
`$OUT/gpu_suite.json`, the logs in `$OUT/gpu_suite_checks.log` and `$OUT/gpu_suite_bench_<n>.log`;
only $OUT comes back, so write the section here from the JSON and commit it:
`python bench/gpu_suite.py --from-json <files_at>/gpu_suite.json --output docs/benchmarks.md`.
`make gpu-suite` runs the suite where a venv with CUDA exists.

If MFU is below 40 %: rerun with `--profile` and read `$OUT/gpu_suite_profile.txt` (self device
time per op). Convolution kernels should dominate; large shares of `aten::copy_`/`to` (memory-format
or dtype conversions: something not channels_last), `batch_norm` / elementwise ops
(bandwidth-bound; the 1x1 ASPP pooling branch and decoder at batch 16), `cudaStreamSynchronize`
(host syncs beyond the loop's one `loss.item()`) or gaps between kernels (launch-bound: try a
larger batch, CUDA graphs or `torch.compile`) say where the time goes. `--cudnn-benchmark` shows
what cuDNN's autotuner would gain (the training loop leaves it off)."""


def section_body(rows: list[Row], env: dict, device: str, dry_run: bool, command: str, seconds: float,
                 stamp: str) -> str:
    machine = (f"{env.get('device_name', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda') or '-'}, "
               f"cuDNN {env.get('cudnn') or '-'}, Python {env.get('python', '?')}")
    parts = [f"Command: `{command}`", f"Machine: {machine}; {stamp}; suite wall time {seconds:.0f} s."]
    if device != "cuda" or dry_run:
        parts.append(f"**Not a GPU measurement**: a `--dry-run` on {device} at tiny sizes (stand-in models) that "
                     "proves every part runs. GPU figures: not yet measured.")
    parts += [("Training rows: plain PyTorch loop, synthetic tensors, SGD, bf16 autocast + channels_last; TFLOP/s = "
               "FlopCounterMode FLOPs of one forward+backward step / step time; MFU against the GPU's dense bf16 "
               "peak (NVIDIA datasheet). Segmentation rows: the batch job's model stage (normalise, predict_probs, "
               "probabilities to the host), random weights."), markdown(rows), HOW_TO]
    return "\n\n".join(parts)


def write_json(rows: list[Row], env: dict, cfg: Config, command: str, seconds: float, stamp: str) -> Path | None:
    if not cfg.out_dir:
        return None
    path = Path(cfg.out_dir) / "gpu_suite.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": command, "environment": env, "dry_run": cfg.dry_run, "device": cfg.device,
                                "wall_s": seconds, "finished": stamp, "rows": [asdict(r) for r in rows]}, indent=2))
    return path


def section_from_json(path: str, output: str) -> None:
    """The device tool brings back $OUT only: rewrite the docs section here from its JSON."""
    data = json.loads(Path(path).read_text())
    rows = [Row(**row) for row in data["rows"]]
    replace_section(output, SECTION, section_body(rows, data["environment"], data["device"], data["dry_run"],
                                                  data["command"], data["wall_s"], data["finished"]))
    print(f"wrote section '## {SECTION}' of {output} from {path}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes and stand-in models: every part in < 1 min")
    p.add_argument("--output", help=f"Markdown file whose '## {SECTION}' section is (re)written (default: none)")
    p.add_argument("--batch", type=int, default=16, help="training batch (halved on out-of-memory)")
    p.add_argument("--ray", default="auto", choices=["auto", "on", "off"],
                   help="Ray Train row: auto = where ray is installed, not in --dry-run")
    p.add_argument("--profile", action="store_true", help="torch.profiler table to $OUT/gpu_suite_profile.txt")
    p.add_argument("--parts", default="checks,train,ray,segment,profile",
                   help="comma-separated parts to run (profile also needs --profile)")
    p.add_argument("--time-limit", type=float, default=480, help="seconds for the whole suite (parts are time-boxed)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak, for a GPU missing from the table")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--from-json", metavar="GPU_SUITE_JSON",
                   help="only rewrite the --output section (default docs/benchmarks.md) from a run's gpu_suite.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # comma-separated parts, in a child process
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _cuda_available() -> bool:
    import torch  # only for this check: the parent leaves the heavy work to its children

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        from bench.gpu_suite_workers import run_worker

        return run_worker(args.worker, args.config, args.results)
    if args.from_json:
        section_from_json(args.from_json, args.output or "docs/benchmarks.md")
        return 0
    if args.device == "cuda" and not _cuda_available():
        print("gpu_suite: no CUDA device here; for the CPU dry run use --device cpu --dry-run", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.dry_run:
        print("gpu_suite: full sizes on CPU would take hours; use --device cpu --dry-run", file=sys.stderr)
        return 2
    cfg = make_config(args)
    command = "python bench/gpu_suite.py" + (" " + shlex.join(argv) if argv else "")
    wanted = set(args.parts.split(","))
    parts = [p for p in expected_rows(cfg, ray_state(args.ray, args.dry_run), args.profile) if p.name in wanted]
    if cfg.out_dir:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as scratch:
        env, seconds = run_suite(cfg, parts, args.time_limit, Path(scratch))
    rows = [row for part in parts for row in part.rows]
    table = markdown(rows)
    print(f"{SECTION}: {env.get('device_name', '?')}, torch {env.get('torch', '?')}; `{command}`; {seconds:.0f} s\n")
    print(table)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    path = write_json(rows, env, cfg, command, seconds, stamp)
    if path:
        print(f"\nwrote {path}")
    if args.output:
        replace_section(args.output, SECTION, section_body(rows, env, cfg.device, cfg.dry_run, command, seconds, stamp))
        print(f"wrote section '## {SECTION}' of {args.output}")
    return 0 if all(row.status in STATUS_GOOD for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
