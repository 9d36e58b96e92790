"""results/drift-signals.json (benchmarks/drift_signals.py): its rows are the hand-labelled real answers and drift of
every gold file read at 128 tokens, each AUC follows from the rows (recomputed by counting pairs, not by scipy), the
probe's logistic fit agrees with statsmodels' penalised GLM, and docs/judges.md states the table and the wall clock."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import statsmodels.api as sm

from conftest import wall_clock
from crystallized_safety.judges.gold import bundled_gold, load_gold

ROOT = Path(__file__).resolve().parents[1]
DOC = json.loads((ROOT / "results" / "drift-signals.json").read_text())
SIGNALS = ("zlib_ratio", "distinct2", "base_loglik", "base_pmi", "judge_yes")


def pair_auc(pos: list[float], neg: list[float]) -> float:
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def test_the_rows_are_every_128_token_gold_file_s_real_answers_and_drift():
    assert list(DOC["rows"]) == [n for n in bundled_gold() if n.endswith("-128")] == list(DOC["auc"])
    for name, rows in DOC["rows"].items():
        gold = {r.id: r.label for r in load_gold(name).rows if r.label in ("full_compliance", "incoherent")}
        assert [r["id"] for r in rows] == list(gold)
        assert all(r["real"] == (gold[r["id"]] == "full_compliance") for r in rows)


@pytest.mark.parametrize("name", list(DOC["auc"]))
def test_each_auc_follows_from_the_rows(name):
    rows, table = DOC["rows"][name], DOC["auc"][name]
    real, drift = [r for r in rows if r["real"]], [r for r in rows if not r["real"]]
    assert (table["real"], table["drift"]) == (len(real), len(drift))
    for signal in SIGNALS:
        got = pair_auc([r[signal] for r in real], [r[signal] for r in drift])
        assert table[signal] == pytest.approx(got, abs=1e-3)  # rows are rounded to 5 digits
    for c, value in table["probe_held_out"].items():
        assert value == pytest.approx(pair_auc([r["probe"][c] for r in real], [r["probe"][c] for r in drift]), abs=1e-3)


def test_the_probe_fit_is_statsmodels_l2_logistic_regression():
    spec = importlib.util.spec_from_file_location("drift_signals", ROOT / "benchmarks" / "drift_signals.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 5))
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0, 0.3]) + 0.4 + rng.normal(size=80) > 0).astype(float)
    for c in (0.1, 1.0):
        ours = module.fit_logistic(x, y, c)
        # statsmodels: -loglik / n + alpha * ||w||^2 / 2 (L1_wt = 0), the intercept (last column) unpenalised
        glm = sm.GLM(y, np.hstack([x, np.ones((80, 1))]), family=sm.families.Binomial())
        ref = glm.fit_regularized(alpha=np.append(np.full(5, 1 / (c * 80)), 0.0), L1_wt=0.0).params
        assert np.allclose(ours, ref, atol=1e-3)


def test_the_docs_state_the_table_and_the_wall_clock():
    text = (ROOT / "docs" / "judges.md").read_text()
    for name, t in DOC["auc"].items():
        probe = list(t["probe_held_out"].values())
        values = " | ".join(f"{t[s]:.3f}" for s in SIGNALS)
        assert f"| `{name}` | {t['real']} / {t['drift']} | {values} | {min(probe):.3f}-{max(probe):.3f} |" in text
    late = [t["base_loglik"] for n, t in DOC["auc"].items() if n.startswith(("hardened-", "immune-"))]
    flat = " ".join(text.split())
    assert f"more likely than the real answers (AUC {min(late):.3f}-{max(late):.3f})" in flat and max(late) < 0.5
    assert min(DOC["auc"][n]["base_loglik"] for n in ("qwen-128", "organisms-128")) > 0.5  # "the reverse"
    assert DOC["about"].startswith("The coherence gate passes fluent, on-topic drift as compliance")
    log = (ROOT / "results" / "drift-signals.log").read_text()
    assert f"(`results/drift-signals.json`, {wall_clock(log)} on 2 cores of an AMD EPYC)" in text
    assert DOC["machine"]["cpu"] == "AMD EPYC" and DOC["machine"]["cores"] == 2
