"""The model stage's number format on CPU: `--precision fp32|bf16|auto`, and channels_last.

channels_last on CPU is on for every precision: oneDNN's convolutions run NHWC without
reordering, 1.04-1.22x faster in fp32 (issue #25's table), labels equal to plain fp32's
(bench/segment_precision.py). bf16 autocast runs the convolutions in bfloat16: only CPUs with
native bf16 instructions (AVX512_BF16 / AMX) gain from it; elsewhere it is emulated and slower.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic
# auto's CPU choice, kept because the demo model's mIoU stayed within 0.3 points of fp32's
# (bench/segment_precision.py, docs/benchmarks.md: plain 66.12 -> 66.14, MS+flip 70.60 -> 70.58,
# +CRF 74.41 -> 74.44; 99.85 % of labels equal) while the forward ran 1.27x fp32's speed; on a
# second demo model 66.96 -> 66.88, 71.23 -> 71.24, 74.26 -> 74.20 (99.82 %) at 2.37x.
AUTO_CPU_BF16 = True


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this machine's CPU computes in bf16 natively (Linux: /proc/cpuinfo flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in BF16_FLAGS)


def autocast_for(precision: str, gpu: bool, runtime: str = "torch") -> bool | None:
    """`predict_probs`' autocast for a run: False for fp32, True for bf16; for auto None on a
    GPU (bf16 there, as before) and on CPU bf16 only where AUTO_CPU_BF16 and the CPU is native.
    The onnx runtime computes float32 only (its config refuses bf16): False."""
    if precision == "fp32" or runtime == "onnx":
        return False
    if precision == "bf16":
        return True
    if gpu:
        return None
    return AUTO_CPU_BF16 and cpu_has_native_bf16()
