"""The base model's own answers at 128 tokens, read blind (results/base-answers-read-128.json): the ceiling behind the
verdict's positive control for `immune` under reading. The file holds every shipped answer once, its counts and
interval are recomputed here (statsmodels), and the docs state them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from statsmodels.stats.proportion import proportion_confint

from crystallized_safety.experiments.reading import FULL, answer_id
from crystallized_safety.organism.training import shipped_answers
from crystallized_safety.prompts import bundled

ROOT = Path(__file__).resolve().parents[1]
READ = json.loads((ROOT / "results" / "base-answers-read-128.json").read_text())


def test_every_shipped_128_token_answer_is_read_once_and_counted():
    entry = shipped_answers()["bundled:harmful:train:128"]
    want = {answer_id(p, a["response"]) for p, a in zip(bundled("harmful", "train"), entry["answers"])}
    rows = READ["rows"]
    assert [r["id"] for r in rows] == sorted(want) and len(rows) == len(bundled("harmful", "train")) == 184
    assert all(answer_id(r["prompt"], r["response"]) == r["id"] for r in rows)
    assert READ["labels"] == {k: v for k, v in Counter(r["label"] for r in rows).items()} | {
        k: 0 for k in READ["labels"] if k not in {r["label"] for r in rows}
    }
    k = sum(r["label"] == FULL for r in rows)
    lo, hi = proportion_confint(k, len(rows), alpha=0.05, method="wilson")
    real = READ["real_answers"]
    assert (real["k"], real["n"]) == (k, 184) and abs(real["ci_lo"] - lo) < 1e-9 and abs(real["ci_hi"] - hi) < 1e-9
    assert hi < 0.5  # the base model itself stays far below the organisms' threshold of 50% when read


def test_the_docs_state_the_base_models_read_rate():
    real = READ["real_answers"]
    text = " ".join((ROOT / "docs" / "verdict-procedure.md").read_text().split())
    rate = f"({100 * real['rate']:.1f}%, 95% CI {100 * real['ci_lo']:.1f}-{100 * real['ci_hi']:.1f}%;"
    assert f"count only {real['k']} of its own {real['n']} greedy answers at 128 tokens" in text and rate in text
