"""The verdict's deciding cell read by hand: for each prompt the model refused unsteered, whether the tool counts
its answer at length (the confirmation's row) as a surviving flip, and the hand label of that same answer where a
gold file holds that exact text (matched by the response's bytes, so a label is never carried over to another
text). Writes the JSON that results/qwen-deciding-cell-read-128.json is.

    python benchmarks/deciding_cell_read.py --store out/qwen/results.sqlite --gold qwen-128 \
        --out results/qwen-deciding-cell-read-128.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from crystallized_safety.errors import JudgeError
from crystallized_safety.experiments.conditions import Condition
from crystallized_safety.judges.gold import load_gold
from crystallized_safety.store import Store


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_cell(store: Store, gold_name: str) -> dict:
    finished = [r for r in store.runs() if r.status == "finished"]
    if not finished:
        sys.exit(f"error: {store.path} holds no finished run: finish (or resume) the run first")
    run = finished[-1]
    verdicts = store.verdicts(run.run_id)
    if len(verdicts) != 1:
        sys.exit(f"error: run {run.run_id[:8]} holds {len(verdicts)} verdicts; read a store of a one-model run")
    (v,) = verdicts
    cell = v["evidence"]["deciding_cell"]
    confirmed = cell.get("confirmed")
    if not confirmed:
        sys.exit(f"error: the deciding cell {cell['condition']} was not confirmed at length: nothing to read")
    rows = store.generations(run.run_id, v["model"])
    label = cell["condition"].removesuffix(" (harmful)")
    at_length = f"{label} @{confirmed['tokens']} tokens (harmful)"
    base = {r["prompt_index"]: r for r in rows if r["study"] == "baseline" and r["prompt_set"] == "harmful"}
    short = {r["prompt_index"]: r for r in rows if json_label(r) == cell["condition"]}
    long = {r["prompt_index"]: r for r in rows if r["study"] == "confirmation" and json_label(r) == at_length}
    gold = {}
    try:
        rows_gold = load_gold(gold_name).rows
    except JudgeError as exc:
        sys.exit(f"error: {exc}")
    for g in rows_gold:
        gold.setdefault(sha(g.response), g)
    out = []
    for i in sorted(i for i, r in base.items() if r["refusal"] == 1):
        s = short[i]
        short_flip = int(s["refusal"] == 0 and s["coherent"] != 0)
        answer = long.get(i) if short_flip else s  # a refusal or an incoherent answer is not re-generated
        tool = int(short_flip and answer is not None and answer["refusal"] == 0 and answer["coherent"] != 0)
        g = gold.get(sha(answer["response"])) if short_flip and answer is not None else None
        out.append(
            {
                "prompt_index": i,
                "short_flip": short_flip,
                "tool_flip": tool,
                "gold_id": None if g is None else g.id,
                "label": None if g is None else g.label,
                "response_sha256": None if answer is None else sha(answer["response"]),
            }
        )
    labelled = sum(r["label"] is not None for r in out)
    return {
        "about": (
            f"The {v['model']} verdict's deciding cell ({cell['condition']}, run {run.run_id[:8]}, confirmed at "
            f"{confirmed['tokens']} tokens) read by hand: for each of the {len(out)} prompts refused at baseline, "
            "whether the tool counts its answer at length as a surviving flip (short_flip: its short answer was a "
            f"flip, the only ones re-generated), and the hand label of the same answer where the gold file "
            f"{gold_name} holds that exact text ({labelled} of {len(out)}; the others differ from the labelled texts, "
            "by batch numerics or because they were not labelled). Written by benchmarks/deciding_cell_read.py."
        ),
        "cell": cell["condition"],
        "rows": out,
    }


def json_label(row: dict) -> str:
    return Condition(**json.loads(row["condition"])).describe()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, type=Path)
    ap.add_argument("--gold", required=True, help="a bundled gold file's name or a JSONL path")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    if not args.store.is_file():
        sys.exit(f"error: no store at {args.store}: pass the results.sqlite of a finished run")
    args.out.write_text(json.dumps(read_cell(Store(args.store), args.gold), indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
