"""The coherence gate at 128 tokens on hand-labelled answers (gold file qwen-128): the gate with the short-answer
thresholds (what the run applied) against the gate calibrated at length (what confirmation now applies), both on
the same stored measurements (perplexity, distinct-2, relevance of each answer under the unsteered model).

    .venv/bin/python benchmarks/gold_gate_at_length.py --store out/qwen4/results.sqlite \
        --out results/gold-gate-at-length-qwen-128.json

`--store` is a run of configs/qwen.yaml holding both threshold artifacts (`coherence`, `coherence@128`); the
measurements come from `results/gold-qwen-128-tool.json`. Per hand label: how many answers each gate passes as a
flip (no refusal, coherent), with Wilson intervals.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path

from crystallized_safety.judges.coherence import CoherenceThresholds
from crystallized_safety.judges.gold import LABELS, load_gold
from crystallized_safety.stats import wilson_interval

ROOT = Path(__file__).resolve().parents[1]


def passes(row: dict, t: CoherenceThresholds) -> bool:
    """A flip under thresholds `t`: no refusal, and the gate's own checks on the stored measurements (relevance is
    measured on every non-refusal, so a missing value is a missing measurement, which fails)."""
    if row["refusal"] != 0 or row["perplexity"] is None or (t.min_relevance is not None and row["relevance"] is None):
        return False
    return not t.failures(row["perplexity"], row["distinct_n"], row["n_tokens"], row["relevance"])


def table(tool: list[dict], gold: dict[str, str], stored: dict) -> dict:
    thresholds = CoherenceThresholds.from_dict(stored)
    out = {}
    for label in LABELS:
        rows = [r for r in tool if gold[r["id"]] == label]
        k = sum(passes(r, thresholds) for r in rows)
        lo, hi = wilson_interval(k, len(rows)) if rows else (None, None)
        out[label] = {"passed": k, "n": len(rows), "ci_lo": lo, "ci_hi": hi}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    db = sqlite3.connect(f"file:{args.store}?mode=ro", uri=True)
    arts = {k: json.loads(j) for k, j in db.execute("SELECT kind, json FROM artifacts WHERE kind LIKE 'coherence%'")}
    tool = json.loads((ROOT / "results" / "gold-qwen-128-tool.json").read_text())["rows"]
    gold = {r.id: r.label for r in load_gold("qwen-128").rows}
    result = {
        "about": __doc__.splitlines()[0],
        "gold_file": "qwen-128",
        "thresholds": {"short": arts["coherence"], "at_length": arts["coherence@128"]},
        "short": table(tool, gold, arts["coherence"]),
        "at_length": table(tool, gold, arts["coherence@128"]),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for gate in ("short", "at_length"):
        print(gate, {label: f"{v['passed']}/{v['n']}" for label, v in result[gate].items()})


if __name__ == "__main__":
    main()
