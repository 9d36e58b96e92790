"""The hand-labelled gold file of the project's own responses (organisms-32): `judge-eval` reproduces the
committed figures, the second reading's agreement is what statsmodels computes from the two label sets, and the
docs state the coherence gate's measured precision from the committed files."""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from statsmodels.stats.inter_rater import cohens_kappa

from conftest import cli_ok
from crystallized_safety.judges.gold import load_gold
from crystallized_safety.stats import wilson_interval

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
LABELS = ["full_refusal", "partial_refusal", "full_compliance", "incoherent"]


def gold_rows() -> dict[str, object]:
    return {r.id: r for r in load_gold("organisms-32").rows}


def test_judge_eval_reproduces_the_committed_figures(tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    cli_ok(["judge-eval", "--gold", "organisms-32", "--by", "model", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads((RESULTS / "judge-eval-organisms-32.json").read_text())


@pytest.mark.parametrize(
    ("name", "results", "rows"),
    [
        ("organisms-32", "gold-second-read.json", 80),
        ("qwen-16", "gold-second-read-qwen-16.json", 160),
        ("qwen-128", "gold-second-read-qwen-128.json", 80),
        ("organisms-128", "gold-second-read-organisms-128.json", 80),
        ("hardened-v6-128", "gold-second-read-hardened-v6-128.json", 32),
        ("hardened-v11-128", "gold-second-read-hardened-v11-128.json", 33),
        ("hardened-v11-window-128", "gold-second-read-hardened-v11-window-128.json", 38),
        ("hardened-v13-128", "gold-second-read-hardened-v13-128.json", 36),
    ],
)
def test_second_reading_agreement_is_statsmodels_kappa(name: str, results: str, rows: int) -> None:
    gold = {row.id: row for row in load_gold(name).rows}
    second = json.loads((RESULTS / results).read_text())
    assert second["gold_file"] == name
    table = np.zeros((4, 4), int)
    for row in second["second_reading"]:
        table[LABELS.index(gold[row["id"]].label), LABELS.index(row["label"])] += 1
    assert len({row["id"] for row in second["second_reading"]}) == rows
    assert table.tolist() == second["confusion_first_x_second"]
    assert int(np.trace(table)) == second["agree"] and table.sum() == second["rows"] == rows
    kappa = cohens_kappa(table)
    assert round(float(kappa.kappa), 4) == second["kappa"]
    assert [round(float(kappa.kappa_low), 4), round(float(kappa.kappa_upp), 4)] == second["kappa_ci95"]


def cell(k: int, n: int) -> str:
    lo, hi = wilson_interval(k, n)
    return f"{k} ({k / n:.1%}, {lo:.1%}-{hi:.1%})"


def test_docs_state_the_gate_precision_from_the_committed_files() -> None:
    gold = gold_rows()
    tool = json.loads((RESULTS / "gold-organisms-32-tool.json").read_text())["rows"]
    assert {r["id"] for r in tool} == set(gold)
    docs = (ROOT / "docs" / "judges.md").read_text()
    for model in ("smollm2-135m-refusal", "smollm2-135m-hardened"):
        flips = [
            gold[r["id"]].label
            for r in tool
            if gold[r["id"]].model == model and r["stratum"] == "steered-coherent-compliance"
        ]
        assert all(
            r["refusal"] == 0 and r["coherent"] == 1 for r in tool if r["stratum"] == "steered-coherent-compliance"
        )
        c, n = collections.Counter(flips), len(flips)
        share = [cell(c["full_compliance"], n), cell(c["incoherent"], n)]
        line = f"| {model} | {n} | {share[0]} | {share[1]} | {c['full_refusal'] + c['partial_refusal']} |"
        assert line in docs, line
        gated = [
            gold[r["id"]].label for r in tool if gold[r["id"]].model == model and r["stratum"] == "steered-incoherent"
        ]
        assert gated and set(gated) == {"incoherent"}


def test_judge_eval_reproduces_the_committed_qwen_figures(tmp_path: Path) -> None:
    """qwen-16: the vendor model's responses, labelled blind; the committed judge-eval file is reproduced."""
    out = tmp_path / "eval.json"
    cli_ok(["judge-eval", "--gold", "qwen-16", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads((RESULTS / "judge-eval-qwen-16.json").read_text())
    tool = json.loads((RESULTS / "gold-qwen-16-tool.json").read_text())["rows"]
    assert {r["id"] for r in tool} == {r.id for r in load_gold("qwen-16").rows}


def test_docs_state_the_local_judge_trial_from_its_file() -> None:
    """The local-LLM judge trial (Qwen2.5-Coder-0.5B as rubric judge): the docs table is the committed file's."""
    trial = json.loads((RESULTS / "judge-eval-local-qwen.json").read_text())
    assert trial["judge"] == "local-llm/1:qwen2.5-coder-0.5b"
    docs = (ROOT / "docs" / "judges.md").read_text()
    for entry in trial["gold"]:
        o = entry["overall"]
        k, acc, prec, rec = o["kappa"], o["accuracy"], o["precision"], o["recall"]
        line = (
            f"| {entry['name']} | {k['kappa']:.3f} ({k['ci_lo']:.3f}-{k['ci_hi']:.3f}, n = {k['n']}) | "
            f"{acc['k']}/{acc['n']} | {prec['k']}/{prec['n']} | {rec['k']}/{rec['n']} |"
        )
        assert line in docs, line
        assert k["kappa"] < 0.8  # why the docs do not recommend it


def test_judge_eval_reproduces_the_qwen_128_figures(tmp_path: Path) -> None:
    """qwen-128: the vendor model's answers confirmed at 128 tokens, judged with delayed refusals read."""
    out = tmp_path / "eval.json"
    cli_ok(["judge-eval", "--gold", "qwen-128", "--delayed", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads((RESULTS / "judge-eval-qwen-128.json").read_text())


def test_the_gate_at_length_table_follows_from_the_stored_measurements() -> None:
    """results/gold-gate-at-length-qwen-128.json: each gate's passes per hand label, recomputed here from the tool's
    stored measurements and the two threshold sets (short-answer, calibrated at 128 tokens)."""
    table = json.loads((RESULTS / "gold-gate-at-length-qwen-128.json").read_text())
    tool = json.loads((RESULTS / "gold-qwen-128-tool.json").read_text())["rows"]
    gold = {r.id: r.label for r in load_gold("qwen-128").rows}
    for gate in ("short", "at_length"):
        t = table["thresholds"][gate]
        counts = collections.Counter()
        totals = collections.Counter()
        for r in tool:
            label = gold[r["id"]]
            totals[label] += 1
            rel = r["relevance"] if r["relevance"] is not None else float("inf")
            counts[label] += (
                r["refusal"] == 0
                and r["perplexity"] is not None
                and r["perplexity"] <= t["max_perplexity"]
                and r["distinct_n"] >= t["min_distinct"]
                and r["n_tokens"] >= t["min_tokens"]
                and rel >= t["min_relevance"]
            )
        for label, row in table[gate].items():
            assert (row["passed"], row["n"]) == (counts[label], totals[label])
    # the rule scaled to 128 tokens by the unsteered medians at the two lengths
    short, long = table["thresholds"]["short"], table["thresholds"]["at_length"]
    ratio = long["relevance_median"] / long["relevance_reference"]
    assert long["relevance_reference"] == short["relevance_median"]
    assert abs(long["min_relevance"] - short["min_relevance"] * ratio) < 1e-12
    docs = (ROOT / "docs" / "judges.md").read_text()
    names = {"full_compliance": "full compliance (a real answer)", "incoherent": "incoherent (drift)",
             "partial_refusal": "partial refusal (a safe substitute)", "full_refusal": "full refusal"}  # fmt: skip
    for label, name in names.items():
        a, b = table["short"][label], table["at_length"][label]
        assert f"| {name} | {a['n']} | {a['passed']} | {b['passed']} |" in docs
    assert f"{short['relevance_median']:.2f}\nnats/token at 16 tokens to {long['relevance_median']:.3f}" in docs
    assert f"0.5 -> {long['min_relevance']:.3f} on Qwen" in docs


def test_the_organisms_deciding_cell_read_by_hand_is_stated_from_the_committed_files() -> None:
    """results/organisms-deciding-cell-read-128.json: its labels are the gold file's, its tool flips the report's
    confirmation counts, and the README and docs/judges.md state the hand count with its Wilson interval."""
    read = json.loads((RESULTS / "organisms-deciding-cell-read-128.json").read_text())["rows"]
    gold = {r.id: r for r in load_gold("organisms-128").rows}
    report = json.loads((RESULTS / "organisms.json").read_text())
    (liquid,) = [v for v in report["verdicts"] if v["model"] == "smollm2-135m-refusal"]
    (cell,) = liquid["evidence"]["confirmation"]["cells"]
    assert cell["condition"] == "L23 a=0 affine extracted (harmful)"
    assert sum(r["short_flip"] for r in read) == cell["flips"] and sum(r["tool_flip"] for r in read) == cell["survived"]
    for r in read:
        assert gold[r["gold_id"]].label == r["label"]
        assert gold[r["gold_id"]].condition.endswith("@128 tokens")
        assert hashlib.sha256(gold[r["gold_id"]].response.encode()).hexdigest() == r["response_sha256"]
    refused = [r for r in read if r["refused_at_baseline"]]
    assert len(refused) == liquid["evidence"]["flip_denominator"]
    real = sum(r["label"] == "full_compliance" for r in refused)
    lo, hi = wilson_interval(real, len(refused))
    share = f"({real / len(refused):.1%}, {100 * lo:.1f}-{100 * hi:.1f}%)"
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"{real} of the {len(refused)} answers to prompts it refused unsteered are real answers {share}" in readme
    substitutes = sum(r["label"] == "partial_refusal" for r in refused)
    docs = " ".join((ROOT / "docs" / "judges.md").read_text().split())
    assert (f"of the {len(refused)} prompts it refused unsteered, {real} answers are real ({real / len(refused):.1%}, "
            f"{lo:.1%}-{hi:.1%}), {substitutes} are safe substitutes") in docs  # fmt: skip
    assert f"judges count {cell['survived']} of {cell['flips']} short-answer flips surviving" in docs


def test_judge_eval_reproduces_the_organisms_128_and_pooled_figures(tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    cli_ok(["judge-eval", "--gold", "organisms-128", "--delayed", "--by", "model", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads((RESULTS / "judge-eval-organisms-128.json").read_text())
    pooled = tmp_path / "pooled.json"
    files = ["organisms-32", "organisms-128", "qwen-16", "qwen-128"]
    cli_ok(["judge-eval", *(a for f in files for a in ("--gold", f)), "--delayed", "--pooled", "--json", str(pooled)])
    got = json.loads(pooled.read_text())
    assert got == json.loads((RESULTS / "judge-eval-own-pooled.json").read_text())
    docs = " ".join((ROOT / "docs" / "judges.md").read_text().split())
    card, k = got["pooled"]["overall"], got["pooled"]["overall"]["kappa"]
    assert f"kappa {k['kappa']:.3f} ({k['ci_lo']:.3f}-{k['ci_hi']:.3f})" in docs
    assert f"{got['pooled']['rows']} rows, {card['kappa']['n']} of them not incoherent" in docs
    per_file = ", ".join(f"{e['name']} {e['overall']['kappa']['kappa']:.3f}" for e in got["gold"][:3])
    assert f"Per file: {per_file}, and qwen-128 {got['gold'][3]['overall']['kappa']['kappa']:.3f}" in docs
    one = json.loads((RESULTS / "judge-eval-organisms-128.json").read_text())["gold"][0]["overall"]
    k1 = one["kappa"]
    assert f"kappa {k1['kappa']:.3f} ({k1['ci_lo']:.3f}-{k1['ci_hi']:.3f}, n = {k1['n']})" in docs


def test_docs_state_the_organisms_128_matrix_second_reading_and_pooled_rates() -> None:
    docs = " ".join((ROOT / "docs" / "judges.md").read_text().split())
    second = json.loads((RESULTS / "gold-second-read-organisms-128.json").read_text())
    lo, hi = second["kappa_ci95"]
    assert f"{second['agree']}/{second['rows']} agree, kappa {second['kappa']:.3f} ({lo:.3f}-{hi:.3f})" in docs
    card = json.loads((RESULTS / "judge-eval-organisms-128.json").read_text())["gold"][0]["overall"]
    for label, row in card["matrix"].items():
        assert f"| {label} | {row['refusal']} | {row['partial']} | {row['compliance']} | {row['undecided']} |" in docs

    def rate(d: dict) -> str:
        return f"{d['k']}/{d['n']} = {d['rate']:.1%} ({d['ci_lo']:.1%}-{d['ci_hi']:.1%})"

    assert f"accuracy {rate(card['accuracy'])}" in docs
    p = card["precision"]
    assert f"refusal precision {p['k']}/{p['n']}, recall {rate(card['recall'])}" in docs
    pooled = json.loads((RESULTS / "judge-eval-own-pooled.json").read_text())["pooled"]["overall"]
    p, r = pooled["precision"], pooled["recall"]
    assert f"refusal precision {p['k']}/{p['n']}, recall {r['k']}/{r['n']} = {r['rate']:.1%}" in docs


def test_results_page_states_the_blind_run_from_its_log() -> None:
    import re

    log = (RESULTS / "organisms-blind.log").read_text()
    minutes, seconds = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\d+):(\d+\.\d+)", log).groups()
    rows = re.findall(r"│ (liquid|immune)\s+│ (liquid|immune)\s+│", log)
    assert len(rows) == 6 and all(a == b for a, b in rows)  # 2 models x 3 shuffles, stored == blind
    text = " ".join((ROOT / "docs" / "results.md").read_text().split())
    assert "(three shuffles, confirmation rows re-judged" in text
    took = round(60 * int(minutes) + float(seconds))
    assert f"[`results/organisms-blind.log`](../results/organisms-blind.log), {took} s)" in text


@pytest.mark.parametrize(
    "name, page, said",
    [
        ("immune", "results.md", "anonymous names, three shuffles) gives the same verdict and K*"),
        ("hardened-v6", "organisms.md", "a blind re-derivation (three shuffles) gives the same verdict and K*"),
    ],
)
def test_the_docs_state_a_one_model_blind_run_from_its_log(name: str, page: str, said: str) -> None:
    import re

    log = (RESULTS / f"{name}-blind.log").read_text()
    rows = re.findall(r"│ (\d)\s+│ (liquid|immune|crystallized|inconclusive)\s+│ (\w+)\s+│ (\d+) / (\d+)\s+│", log)
    assert [r[0] for r in rows] == ["0", "1", "2"]  # three shuffles
    assert all(r[1] == r[2] and r[3] == r[4] for r in rows)  # stored == blind, verdict and K*
    stored = json.loads((RESULTS / f"{name}.json").read_text())["verdicts"][0]
    assert {r[1] for r in rows} == {stored["verdict"]} and int(rows[0][3]) == stored["evidence"]["k_star"]
    text = " ".join((ROOT / "docs" / page).read_text().split())
    assert said in text and f"results/{name}-blind.log" in text
