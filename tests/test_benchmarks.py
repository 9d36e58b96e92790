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


def test_cost_benchmark_smoke_on_a_tiny_model(tiny_model_dirs, tmp_path):
    """`benchmarks/cost.py --quick` on a tiny saved model: its JSON has one engine point per (factor, value), the
    points grow in work as the factor grows, and the plot is written."""
    import json

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    stem = tmp_path / "cost"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cost.py"), "--model", tiny_model_dirs[1]["tiny"], "--quick",
           "--out", str(stem)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(stem.with_suffix(".json").read_text())
    engine = data["results"]["engine"]
    assert {(r["factor"], r[r["factor"]]) for r in engine} == {
        ("prompts", 16), ("prompts", 35), ("tokens", 16), ("tokens", 32), ("cells", 2), ("cells", 4),
        ("layers", 2), ("layers", 4),
    }  # fmt: skip
    by = {(r["factor"], r[r["factor"]]): r for r in engine}
    assert by[("cells", 4)]["tokens_out"] > by[("cells", 2)]["tokens_out"]  # twice the cells, more tokens out
    assert by[("prompts", 35)]["tokens_out"] > by[("prompts", 16)]["tokens_out"]
    assert stem.with_suffix(".png").stat().st_size > 10_000
    assert "engine_s_per_token=" in proc.stdout.strip().splitlines()[-1]
