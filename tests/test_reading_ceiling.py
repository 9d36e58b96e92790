"""How often a model that does not refuse writes a real answer when read: the ceiling behind the verdict's positive
control for `immune` under reading. The base model's own answers at 128 tokens (results/base-answers-read-128.json),
the reference reading round of v11 and v13 (results/reference-readings-128.json) and the verdicts it gave
(results/hardened-v1{1,3}-read-ref.json): counts and intervals recomputed here (statsmodels); the docs state them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from statsmodels.stats.proportion import proportion_confint

from crystallized_safety.core.generation.api import generate
from crystallized_safety.experiments.reading import FULL, answer_id
from crystallized_safety.prompts import bundled
from crystallized_safety.registry import load_model

ROOT = Path(__file__).resolve().parents[1]
READ = json.loads((ROOT / "results" / "base-answers-read-128.json").read_text())


def test_every_base_answer_is_read_once_and_counted():
    rows = READ["rows"]
    assert sorted(r["prompt"] for r in rows) == sorted(bundled("harmful", "train")) and len(rows) == 184
    assert [r["id"] for r in rows] == sorted(answer_id(r["prompt"], r["response"]) for r in rows)
    base = load_model("smollm2-135m", device="cpu", dtype="float32")
    assert READ["base_model_hash"] == base.model_hash
    by_prompt = {r["prompt"]: r["response"] for r in rows}
    first = list(bundled("harmful", "train"))[:8]
    fresh = generate(base, first, max_new_tokens=128, batch_size=64)  # what the base model says, greedy
    same = sum(g.response == by_prompt[p] for p, g in zip(first, fresh))
    assert same >= 6, f"only {same}/8 read answers are the base model's own at 128 tokens"
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


REF = json.loads((ROOT / "results" / "reference-readings-128.json").read_text())


def test_the_reference_round_counts_and_calibration_are_its_rows():
    refs = [r for r in REF["rows"] if r["kind"] == "reference"]
    cal = [r for r in REF["rows"] if r["kind"] == "calibration"]
    assert len(refs) == 38 and len(cal) == 40 and [r["id"] for r in REF["rows"]] == sorted(r["id"] for r in REF["rows"])
    assert all(answer_id(r["prompt"], r["response"]) == r["id"] for r in REF["rows"])
    for name, got in REF["readers"].items():
        k = sum(r["labels"][name]["label"] == FULL for r in refs)
        lo, hi = proportion_confint(k, 38, alpha=0.05, method="wilson")
        assert got["reference_real"]["k"] == k and abs(got["reference_real"]["ci_lo"] - lo) < 1e-9
        assert got["calibration_agree"] == sum(r["labels"][name]["label"] == r["earlier"] for r in cal)
        # the new readers call real only what the earlier readers called real: they are not the more lenient ones
        assert got["calibration_real"] == got["calibration_real_also_earlier"]
    text = " ".join((ROOT / "docs" / "organisms.md").read_text().split())
    a, b = REF["readers"]["A"], REF["readers"]["B"]
    agree = f"{a['calibration_agree']} and {b['calibration_agree']} of the 40"
    assert f"They agree with the first readers on {agree}" in text
    assert f"they call real {a['calibration_real']} and {b['calibration_real']} of those 15, and nothing" in text
    said = [f"{r['k']} times ({100 * r['rate']:.1f}%" for r in (a["reference_real"], b["reference_real"])]
    assert all(s in text for s in said) and "(15 of them real answers by the first readers)" in text
    assert REF["calibration_earlier_real"] == 15


def test_the_docs_state_each_runs_counted_reference():
    counted = {}
    for v in ("v11", "v13"):
        (got,) = json.loads((ROOT / "results" / f"hardened-{v}-read-ref.json").read_text())["verdicts"]
        counted[v] = got["evidence"]["reference"]["k"]
        second = (ROOT / "results" / f"hardened-{v}-read-ref-second-run.log").read_text()
        counted[v + "b"] = int(second.rsplit("smollm2-135m answers ", 1)[1].split()[0])  # the last decision's
    text = " ".join((ROOT / "docs" / "organisms.md").read_text().split())
    v11, v13 = f"{counted['v11']} and {counted['v11b']}", f"{counted['v13']} and {counted['v13b']}"
    said = f"v11's reference has {v11} and v13's {v13}"
    assert said in text and (counted["v11"], counted["v13"]) == (7, 8)


def test_v11_and_v13_with_a_positive_control_are_out_of_reach():
    a = REF["readers"]["A"]["reference_real"]
    refs = {r["id"] for r in REF["rows"] if r["kind"] == "reference"}
    for v in ("v11", "v13"):
        (got,) = json.loads((ROOT / "results" / f"hardened-{v}-read-ref.json").read_text())["verdicts"]
        ev = got["evidence"]
        assert got["verdict"] == "inconclusive: threshold out of reach" and ev["rules"]["reference"] == "smollm2-135m"
        # counted as steered flips are: read real AND passed by the gate at length (which screens a few out)
        assert ev["reference"]["k"] <= a["k"] and (ev["reference"]["n"], ev["reference"]["unread"]) == (38, 0)
        assert ev["reference"]["ci_lo"] < ev["flip_threshold"] and len(refs) == ev["flip_denominator"]
        second = (ROOT / "results" / f"hardened-{v}-read-ref-second-run.log").read_text()  # reader B's labels
        assert "out of reach" in second and "Exit status: 0" in second and "smollm2-135m answers" in second
    blind = (ROOT / "results" / "hardened-v11-read-ref-blind.log").read_text()
    assert blind.count("│ reach       │ reach ") == 3 and "Exit status: 0" in blind  # stored and blind: out of reach


def test_under_the_gate_the_same_reference_answers_count_as_compliance():
    (got,) = json.loads((ROOT / "results" / "hardened-v11-ref.json").read_text())["verdicts"]
    ref = got["evidence"]["reference"]
    lo, hi = proportion_confint(ref["k"], ref["n"], alpha=0.05, method="wilson")
    assert got["verdict"] == "liquid" and got["evidence"]["rules"]["confirm_by"] == "gate" and ref["n"] == 38
    assert ref["k"] > 2 * REF["readers"]["A"]["reference_real"]["k"]  # the gate passes far more than readers find
    text = " ".join((ROOT / "docs" / "organisms.md").read_text().split())
    rate = f"{100 * ref['rate']:.1f}%, {100 * lo:.1f}-{100 * hi:.1f}%"
    assert f"the same 38 answers count as coherent compliance {ref['k']} times ({rate};" in text


def test_the_readme_and_results_state_the_reference_reading():
    a = REF["readers"]["A"]["reference_real"]
    rate, lo, hi = (f"{100 * a[k]:.1f}" for k in ("rate", "ci_lo", "ci_hi"))
    readme = " ".join((ROOT / "README.md").read_text().split())
    results = " ".join((ROOT / "docs" / "results.md").read_text().split())
    assert f"at most {a['k']} are real ({rate}%, 95% CI {lo}-{hi}%)" in readme
    assert f"are real at most {a['k']} times ({rate}%, {lo}-{hi}%)" in results
