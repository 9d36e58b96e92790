"""Draw the responses of the project's own models that are labelled by hand into the gold set (issue 25).

    .venv/bin/python benchmarks/gold_own_sample.py --store out/demo/results.sqlite --out /tmp/gold-own
    .venv/bin/python benchmarks/gold_own_sample.py --store S --out DIR --strata confirmed-at-length  # 128-token rows
    .venv/bin/python benchmarks/gold_own_sample.py --store out/gold-128/results.sqlite --out DIR --cap 16

Reads a finished store (read-only; `configs/organisms.yaml`, both organisms) and draws a fixed, seeded,
stratified sample per model: unsteered harmful and harmless answers, and steered answers the tool's judges
called refusals, coherent compliance (the flips the verdict counts) and incoherent compliance, plus steered
harmless answers. Writes, per labelling batch, `batch-<i>.jsonl` rows in the gold format with `label: null`
and WITHOUT the tool's own judgements (labellers read blind), and `judged.jsonl` with what the tool said about
each row (id -> substring refusal, coherent), kept apart for the comparison afterwards.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
from pathlib import Path

import yaml

STRATA = {  # name -> (SQL condition on generations, rows per model)
    "baseline-harmful": ("prompt_set = 'harmful' AND condition LIKE '%\"direction\": \"none\"%'", 20),
    "baseline-harmless": ("prompt_set = 'harmless' AND condition LIKE '%\"direction\": \"none\"%'", 20),
    "steered-refusal": (
        "prompt_set = 'harmful' AND condition NOT LIKE '%\"direction\": \"none\"%' AND refusal = 1",
        30,
    ),
    "steered-coherent-compliance": (
        "prompt_set = 'harmful' AND condition NOT LIKE '%\"direction\": \"none\"%' AND refusal = 0 AND coherent = 1",
        60,
    ),
    "steered-incoherent": (
        "prompt_set = 'harmful' AND condition NOT LIKE '%\"direction\": \"none\"%' AND refusal = 0 AND coherent = 0",
        20,
    ),
    "steered-harmless": ("prompt_set = 'harmless' AND condition NOT LIKE '%\"direction\": \"none\"%'", 10),
    # the deciding cells re-generated at length (verdict.confirm_tokens), every row: not drawn by default
    "confirmed-at-length": ("study = 'confirmation'", 1000),
}
DEFAULT_STRATA = [s for s in STRATA if s != "confirmed-at-length"]


def describe(condition: dict) -> str:
    if condition.get("direction") == "none":
        return "baseline"
    layers = condition.get("layers") or []
    span = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}" if layers else "L?"
    alpha = condition.get("alpha", 0.0)
    unit = "rel" if condition.get("alpha_unit") == "relative" else "abs"
    length = f" @{condition['max_new_tokens']} tokens" if condition.get("max_new_tokens") else ""
    return f"{span} {condition.get('mode')} {condition.get('direction')} {alpha:g} {unit}{length}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strata", nargs="+", choices=list(STRATA), default=DEFAULT_STRATA)
    ap.add_argument("--cap", type=int, default=None, help="at most this many rows per stratum and model")
    args = ap.parse_args()
    db = sqlite3.connect(f"file:{args.store}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    run_id, spec_yaml = db.execute("SELECT run_id, spec_yaml FROM runs ORDER BY created DESC LIMIT 1").fetchone()
    max_new_tokens = yaml.safe_load(spec_yaml)["generation"]["max_new_tokens"]
    models = [r[0] for r in db.execute("SELECT DISTINCT model FROM generations WHERE run_id = ? ORDER BY 1", (run_id,))]
    rng = random.Random(args.seed)
    rows, judged = [], []
    for model in models:
        for stratum in args.strata:
            where, n = STRATA[stratum]
            n = n if args.cap is None else min(n, args.cap)
            found = db.execute(
                f"SELECT * FROM generations WHERE run_id = ? AND model = ? AND {where} "
                "ORDER BY condition_key, prompt_index",
                (run_id, model),
            ).fetchall()
            for g in rng.sample(found, min(n, len(found))):
                condition = json.loads(g["condition"])
                gid = f"{model}:{g['condition_key'][:12]}:{g['prompt_set']}:{g['prompt_index']}"
                rows.append(
                    {
                        "id": gid,
                        "source": f"crystallized-safety {args.store.name} run {run_id[:8]}",
                        "model": model,
                        "prompt": g["prompt"],
                        "response": g["response"],
                        "max_new_tokens": condition.get("max_new_tokens") or max_new_tokens,
                        "condition": describe(condition),
                        "label": None,
                        "labeller": None,
                        "note": "",
                    }
                )
                judged.append(
                    {
                        "id": gid,
                        "stratum": stratum,
                        "refusal": g["refusal"],
                        "coherent": g["coherent"],
                        "relevance": g["relevance"] if "relevance" in g.keys() else None,
                        "judge": g["judge"],
                    }
                )
    order = list(range(len(rows)))
    rng.shuffle(order)  # labellers see strata mixed
    args.out.mkdir(parents=True, exist_ok=True)
    for b in range(args.batches):
        part = [rows[i] for i in order[b :: args.batches]]
        (args.out / f"batch-{b}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    (args.out / "judged.jsonl").write_text("".join(json.dumps(j) + "\n" for j in judged))
    print(f"{len(rows)} rows from {len(models)} models in {args.batches} batches under {args.out}")


if __name__ == "__main__":
    main()
