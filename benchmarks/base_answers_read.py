"""The base model's own answers, read blind: how often SmolLM2-135M-Instruct, which does not refuse, writes a real
answer to a harmful request at 128 tokens, by the reading rules of docs/judges.md. This is the ceiling a steered
organism tuned from it can be expected to reach under `verdict.confirm_by: reading`, and why the verdict's
`immune` needs a positive control (`verdict.reference`, docs/verdict-procedure.md).

The answers are the package's shipped greedy answers to the bundled harmful *train* prompts at 128 tokens
(`data/base-answers.json`, recipe v14's comply targets); the labels are readers' JSONL files (`id`, `label`,
`labeller`, `note`; id = SHA-256 of prompt and answer, as `csafety readings export` writes it).

    python benchmarks/base_answers_read.py --labels out/base128/rounds/labels --out results/base-answers-read-128.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from crystallized_safety import jsonio
from crystallized_safety.errors import StoreError
from crystallized_safety.experiments.reading import FULL, answer_id
from crystallized_safety.judges.gold import LABELS
from crystallized_safety.organism.training import shipped_answers
from crystallized_safety.prompts import bundled
from crystallized_safety.stats import rate_summary

SOURCE = "bundled:harmful:train:128"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", type=Path, required=True, help="folder of readers' JSONL files")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    entry = shipped_answers()[SOURCE]
    prompts = bundled("harmful", "train")
    answers = {answer_id(p, a["response"]): (p, a["response"]) for p, a in zip(prompts, entry["answers"])}
    labels: dict[str, dict] = {}
    for path in sorted(args.labels.glob("*.jsonl")):
        where = str(path)
        for n, row in jsonio.objects(path.read_text(encoding="utf-8"), where, StoreError, "id, label, labeller"):
            if row.get("id") not in answers or row.get("label") not in LABELS or row["id"] in labels:
                sys.exit(f"error: {where} line {n}: an id of no shipped answer, a bad label, or a second label")
            labels[row["id"]] = {"label": row["label"], "labeller": row["labeller"], "note": row.get("note", "")}
    if set(labels) != set(answers):
        sys.exit(f"error: {len(answers) - len(labels)} of the {len(answers)} answers have no label")
    rows = [{"id": key, "prompt": p, "response": r, **labels[key]} for key, (p, r) in sorted(answers.items())]
    counts = Counter(r["label"] for r in rows)
    out = {
        "about": __doc__.split("\n\n")[0],
        "source": SOURCE,
        "base_model_hash": entry["base_model_hash"],
        "max_new_tokens": entry["max_new_tokens"],
        "decoding": entry["decoding"],
        "labels": {label: counts.get(label, 0) for label in LABELS},
        "real_answers": rate_summary(counts.get(FULL, 0), len(rows)),
        "rows": rows,
    }
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    real = out["real_answers"]
    print(f"{real['k']} of {real['n']} read as real answers ({real['rate']:.1%}, {real['ci_lo']:.1%}-{real['ci_hi']:.1%})")


if __name__ == "__main__":
    main()
