"""The coherence gate's relevance rule (v2) measured on the bundled gold set organisms-32 (issue 25).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gold_relevance.py --out results/gold-relevance.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gold_relevance.py --gold qwen-16 \
        --strata steered-coherent-compliance steered-incoherent --out results/gold-relevance-qwen-16.json

For every gold row of a bundled gold file (organisms-32 by default; qwen-16: a held-out check of a rule chosen
on organisms-32), the relevance the gate computes (prompt-answer PMI under the unsteered
organism, nats per response token, `CoherenceGate.relevances`, fp32) beside the hand label and what the tool
said when it generated the row (`results/gold-<file>-tool.json`). The summary reads the answers the v1
gate counted as flips (steered, harmful prompt, substring judge: no refusal, gate: coherent; `--strata` widens
it, e.g. to the answers the gate failed too) whose hand label is
full compliance or incoherent (drift): how well relevance separates the two (AUC, scipy's Mann-Whitney U), and
what the rule min_relevance = 0.5 keeps of each, per organism and together, with Wilson intervals.
Needs the models built or installed (`make organisms`, `make qwen`'s wheels); about 3 min each on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
from scipy.stats import mannwhitneyu
from statsmodels.stats.proportion import proportion_confint

from crystallized_safety.judges.coherence import DEFAULT_MIN_RELEVANCE, CoherenceGate
from crystallized_safety.judges.gold import load_gold
from crystallized_safety.registry import load_model

ROOT = Path(__file__).resolve().parents[1]


def wilson(k: int, n: int) -> list[float]:
    lo, hi = proportion_confint(k, n, alpha=0.05, method="wilson")
    return [round(float(lo), 4), round(float(hi), 4)]


def summarise(rows: list[dict], floor: float, strata: list[str]) -> dict:
    flips = [
        r
        for r in rows
        if r["stratum"] in strata and r["refusal"] == 0 and r["label"] in ("full_compliance", "incoherent")
    ]
    real = np.array([r["relevance"] for r in flips if r["label"] == "full_compliance"])
    drift = np.array([r["relevance"] for r in flips if r["label"] == "incoherent"])
    kept_real, kept_drift = int((real >= floor).sum()), int((drift >= floor).sum())
    kept = kept_real + kept_drift
    return {
        "counted_flips": len(flips),
        "real": len(real),
        "drift": len(drift),
        "auc": round(float(mannwhitneyu(real, drift).statistic / (len(real) * len(drift))), 4),
        "kept_real": kept_real,
        "kept_real_ci": wilson(kept_real, len(real)),
        "kept_drift": kept_drift,
        "kept_drift_ci": wilson(kept_drift, len(drift)),
        "real_share_v1": [len(real), len(flips)],
        "real_share_v2": [kept_real, kept],
        "real_share_v2_ci": wilson(kept_real, kept),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gold-relevance.json")
    parser.add_argument("--floor", type=float, default=DEFAULT_MIN_RELEVANCE)
    parser.add_argument("--gold", default="organisms-32")
    parser.add_argument("--strata", nargs="+", default=["steered-coherent-compliance"])
    args = parser.parse_args()
    gold = [r.to_dict() for r in load_gold(args.gold).rows]
    tool = {r["id"]: r for r in json.loads((ROOT / "results" / f"gold-{args.gold}-tool.json").read_text())["rows"]}
    rows = []
    for model in sorted({g["model"] for g in gold}):
        mine = [g for g in gold if g["model"] == model]
        gate = CoherenceGate(load_model(model, dtype="float32"), batch_size=16)
        values = gate.relevances([g["prompt"] for g in mine], [g["response"] for g in mine])
        for g, v in zip(mine, values):
            t = tool[g["id"]]
            rows.append({"id": g["id"], "model": model, "label": g["label"], "stratum": t["stratum"],
                         "refusal": t["refusal"], "coherent": t["coherent"],
                         "relevance": None if v is None else round(v, 4)})  # fmt: skip
    models = sorted({r["model"] for r in rows})
    summary = {m: summarise([r for r in rows if r["model"] == m], args.floor, args.strata) for m in models}
    if len(models) > 1:
        summary["both"] = summarise(rows, args.floor, args.strata)
    doc = {
        "about": __doc__.split("\n\n")[2].replace("\n", " "),
        "gold_file": args.gold,
        "strata": args.strata,
        "floor": args.floor,
        "machine": {"cpu": platform.processor() or platform.machine(), "dtype": "float32"},
        "summary": summary,
        "rows": rows,
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
