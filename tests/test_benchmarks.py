"""Smoke runs of the benchmark scripts (the numbers are recorded in the README, not asserted: timing is not a
test): `benchmarks/gpu.py` on a tiny config completes on CPU, prints its machine-readable last line, and the
engine's greedy tokens equal one batched `model.generate` per cell on every cell (fp32)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_on_a_tiny_config():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--config", "tiny", "--quick"],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = dict(item.split("=") for item in proc.stdout.strip().splitlines()[-1].split())
    keys = {"engine_tok_s", "generate_tok_s", "naive_tok_s", "speedup_vs_generate", "speedup_vs_naive",
            "peak_mem_gb", "cells_identical"}  # fmt: skip
    assert set(last) == keys and all(math.isfinite(float(v)) and float(v) > 0 for v in last.values())
    assert float(last["cells_identical"]) == 1.0
