"""What the driver makes of the stream: counts, stage times, the evaluation table."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipelines.data.errors import RunSummary
from deeplab_core.constants import TTASettings
from pipelines.segmentation.columns import (
    CM,
    CM_CRF,
    CM_PLAIN,
    CM_TTA,
    ERROR_STAGE,
    HAS_GT,
    STATUS,
    STATUS_OK,
)


@dataclass
class Tally:
    """What the driver sees stream past: counts, stage times, summed confusion matrices."""

    ok: int = 0
    errors: int = 0
    scored: int = 0  # ok images with a ground-truth mask (in the confusion matrices)
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: {"decode": 0.0, "model": 0.0, "crf": 0.0})
    cms: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return self.ok + self.errors

    def add(self, batch: dict[str, np.ndarray]) -> None:
        status = batch[STATUS]
        ok = status == STATUS_OK
        self.ok += int(ok.sum())
        self.errors += int((~ok).sum())
        if HAS_GT in batch:
            self.scored += int((ok & np.asarray(batch[HAS_GT], dtype=bool)).sum())
        for stage in batch[ERROR_STAGE][~ok]:
            self.errors_by_stage[str(stage)] = self.errors_by_stage.get(str(stage), 0) + 1
        for name in self.seconds:
            column = batch.get(f"seconds_{name}")
            if column is not None:
                self.seconds[name] += float(np.asarray(column, dtype=float)[ok].sum())
        for name in (CM_PLAIN, CM_TTA, CM_CRF, CM):
            if name in batch:
                total = np.asarray(batch[name])[ok].sum(axis=0)
                self.cms[name] = self.cms.get(name, 0) + total


def consume(ds, total: int, every_s: float, label: str = "segment",
            on_batch: Callable[[dict[str, np.ndarray]], None] | None = None) -> Tally:
    """`tally_batches` over a Ray dataset's stream."""
    # prefetch_batches=0: results are counted as they finish, not a prefetch window later.
    return tally_batches(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0),
                         total, every_s, label, on_batch)


def tally_batches(batches: Iterable[dict[str, np.ndarray]], total: int, every_s: float, label: str = "segment",
                  on_batch: Callable[[dict[str, np.ndarray]], None] | None = None) -> Tally:
    """Sums the stream's per-image summaries (and hands each batch to `on_batch`), whichever engine
    made them (Ray Data, or this process: engine.py). Progress: a tqdm bar on a terminal, else a
    line every `every_s` seconds; counts are images whose results are written (the pipeline's end)."""
    import sys

    from tqdm import tqdm

    tally = Tally()
    start = last = time.monotonic()
    with tqdm(total=total, desc=f"[{label}]", unit="img", disable=not sys.stderr.isatty()) as bar:
        for batch in batches:
            before = tally.done
            if on_batch is not None:
                on_batch(batch)
            tally.add(batch)
            bar.update(tally.done - before)
            bar.set_postfix(ok=tally.ok, errors=tally.errors, refresh=False)
            now = time.monotonic()
            if bar.disable and now - last >= every_s:
                last = now
                rate = tally.done / max(now - start, 1e-9)
                print(f"[{label}] {tally.done}/{total} images (ok {tally.ok}, errors {tally.errors}), "
                      f"{rate:.2f} images/s", flush=True)
    return tally


@dataclass
class SegmentReport:
    run_id: str
    model_uri: str
    read: int
    ok: int
    errors: int
    skipped: int
    seconds: float
    stage_seconds: dict[str, float]
    errors_by_stage: dict[str, int]
    evaluation: dict[str, dict] | None = None
    table: str | None = None
    crf_backend: str | None = None  # the CRF that ran (None: no CRF)
    crf_source: str | None = None  # where the CRF parameters came from (None: no CRF on the masks)
    crf_params: dict | None = None
    engine: str | None = None  # where the stages ran (engine.py); None: nothing to segment
    runtime: str | None = None  # what ran the model (runtime.py)

    def __post_init__(self) -> None:
        if self.read != self.ok + self.errors + self.skipped:
            raise RuntimeError(f"inputs unaccounted for: read={self.read} != ok={self.ok} + "
                               f"errors={self.errors} + skipped={self.skipped}")

    @property
    def images_per_s(self) -> float:
        return (self.ok + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def summary_line(self) -> str:
        return (f"read {self.read} = ok {self.ok} + errors {self.errors} + skipped {self.skipped} "
                f"(already settled); {self.images_per_s:.2f} images/s over {self.seconds:.1f} s")

    def run_summary(self) -> RunSummary:
        """The processed part as the shared ``read == ok + errors`` summary (skipped left out)."""
        return RunSummary(read=self.read - self.skipped, ok=self.ok, errors=self.errors)


def format_scales(scales: Sequence[float]) -> str:
    return ",".join(f"{s:g}" for s in scales)


def evaluation_rows(tta: TTASettings) -> list[tuple[str, str, bool, bool, str]]:
    scales = format_scales(tta.scales)
    return [
        ("plain", "1", False, False, CM_PLAIN),
        ("+ multi-scale + flip", scales, tta.flip, False, CM_TTA),
        ("+ dense CRF", scales, tta.flip, True, CM_CRF),
    ]


def evaluation_table(tally: Tally, tta: TTASettings, images: int, crf_iterations: int,
                     class_names: Sequence[str] | None = None) -> tuple[dict[str, dict], str]:
    """Metrics per variant and the Markdown tables for --eval: mIoU, mAcc (mean class accuracy),
    aAcc (pixel accuracy) per variant, then the IoU of each class (named from the checkpoint's
    `class_names`; "-" for a class in neither ground truth nor prediction)."""
    from deeplab_core.metrics import segmentation_metrics

    metrics, lines = {}, [
        "| variant | scales | flip | CRF | mIoU | mAcc | aAcc | images |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, scales, flip, crf, column in evaluation_rows(tta):
        result = segmentation_metrics(tally.cms[column])
        metrics[name] = result
        crf_text = f"yes ({crf_iterations} it)" if crf else "no"
        lines.append(f"| {name} | {scales} | {'yes' if flip else 'no'} | {crf_text} | {100 * result['mIoU']:.2f} | "
                     f"{100 * result['mean_acc']:.2f} | {100 * result['pixel_acc']:.2f} | {images} |")
    names = list(metrics)
    lines += ["", "| class | " + " | ".join(f"IoU {n}" for n in names) + " |", "|---|" + "---|" * len(names)]
    for i in range(len(next(iter(metrics.values()))["per_class_iou"])):
        label = class_names[i] if class_names and i < len(class_names) else f"class {i}"
        values = [metrics[n]["per_class_iou"][i] for n in names]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{100 * v:.2f}" for v in values) + " |")
    return metrics, "\n".join(lines)


METRIC_KEYS = {"plain": "plain", "+ multi-scale + flip": "msf", "+ dense CRF": "msf_crf"}
