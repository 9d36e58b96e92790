"""results/gold-relevance.json (benchmarks/gold_relevance.py): its rows are the bundled gold rows with their
hand labels, its summary follows from its rows (AUC recomputed by counting pairs, not by scipy; counts and
Wilson intervals by hand), and the table in docs/judges.md states exactly that summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from crystallized_safety.judges.gold import load_gold

ROOT = Path(__file__).resolve().parents[1]
DOC = json.loads((ROOT / "results" / "gold-relevance.json").read_text())
QWEN = json.loads((ROOT / "results" / "gold-relevance-qwen-16.json").read_text())  # held out: the rule came first
MODELS = ("smollm2-135m-refusal", "smollm2-135m-hardened")


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def pair_auc(pos: list[float], neg: list[float]) -> float:
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("doc", [DOC, QWEN], ids=["organisms-32", "qwen-16"])
def test_rows_are_the_gold_rows_with_their_labels(doc):
    gold = {r.id: r for r in load_gold(doc["gold_file"]).rows}
    assert {r["id"] for r in doc["rows"]} == set(gold)
    assert all(gold[r["id"]].label == r["label"] and gold[r["id"]].model == r["model"] for r in doc["rows"])


@pytest.mark.parametrize(("doc", "model"), [(DOC, m) for m in [*MODELS, "both"]] + [(QWEN, "qwen2.5-coder-0.5b")])
def test_summary_follows_from_rows(doc, model):
    floor = doc["floor"]
    rows = [r for r in doc["rows"] if model == "both" or r["model"] == model]
    flips = [r for r in rows if r["stratum"] in doc["strata"] and r["refusal"] == 0]
    real = [r["relevance"] for r in flips if r["label"] == "full_compliance"]
    drift = [r["relevance"] for r in flips if r["label"] == "incoherent"]
    s = doc["summary"][model]
    assert (s["real"], s["drift"], s["counted_flips"]) == (len(real), len(drift), len(real) + len(drift))
    assert s["auc"] == pytest.approx(pair_auc(real, drift), abs=1e-4)
    kept_real, kept_drift = sum(v >= floor for v in real), sum(v >= floor for v in drift)
    assert (s["kept_real"], s["kept_drift"]) == (kept_real, kept_drift)
    assert s["real_share_v2"] == [kept_real, kept_real + kept_drift]
    assert s["kept_real_ci"] == pytest.approx(wilson(kept_real, len(real)), abs=1e-4)
    assert s["kept_drift_ci"] == pytest.approx(wilson(kept_drift, len(drift)), abs=1e-4)
    assert s["real_share_v2_ci"] == pytest.approx(wilson(kept_real, kept_real + kept_drift), abs=1e-4)


def test_docs_table_states_the_summary():
    docs = (ROOT / "docs" / "judges.md").read_text()
    for doc, model in [(DOC, m) for m in [*MODELS, "both"]] + [(QWEN, "qwen2.5-coder-0.5b")]:
        s = doc["summary"][model]

        def cell(k: int, n: int, ci: list[float]) -> str:
            return f"{k}/{n} ({100 * k / n:.1f}%, {100 * ci[0]:.1f}%-{100 * ci[1]:.1f}%)"

        row = (
            f"| {model} | {s['real']} / {s['drift']} | {s['auc']:.3f} | "
            f"{cell(s['kept_real'], s['real'], s['kept_real_ci'])}"
            f" | {cell(s['kept_drift'], s['drift'], s['kept_drift_ci'])} | "
            f"{cell(*s['real_share_v2'], s['real_share_v2_ci'])} |"
        )
        assert row in docs, row
