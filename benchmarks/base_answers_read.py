"""The base model's own answers, read blind: how often SmolLM2-135M-Instruct, which does not refuse, writes a real
answer to a harmful request at 128 tokens, by the reading rules of docs/judges.md. This is the ceiling a steered
organism tuned from it can be expected to reach under `verdict.confirm_by: reading`, and why the verdict's
`immune` needs a positive control (`verdict.reference`, docs/verdict-procedure.md).

The answers are the base model's greedy answers (fp32, batches of 64, as the organisms' self-distillation targets
are made) to the bundled harmful *train* prompts at 128 tokens, generated here (about 2 minutes on 2 cores); the
labels are readers' JSONL files (`id`, `label`, `labeller`, `note`; id = SHA-256 of prompt and answer, as `csafety
readings export` writes it). A text this machine generates differently from the one read has no label: an error.

    python benchmarks/base_answers_read.py --write-pool out/base128/pool.jsonl          # what the readers get
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
from crystallized_safety.organism.training import base_answers
from crystallized_safety.prompts import bundled
from crystallized_safety.registry import load_model
from crystallized_safety.stats import rate_summary

TOKENS = 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-pool", type=Path, help="write the answers for readers (id, prompt, response) and stop")
    ap.add_argument("--labels", type=Path, help="folder of readers' JSONL files")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.write_pool is None and (args.labels is None or args.out is None):
        sys.exit("error: pass --write-pool FILE, or --labels DIR and --out FILE")
    base = load_model("smollm2-135m", device="cpu", dtype="float32")
    prompts = bundled("harmful", "train")
    gens = base_answers(base, prompts, TOKENS, use_shipped=False)
    answers = {answer_id(p, g.response): (p, g.response) for p, g in zip(prompts, gens)}
    if args.write_pool is not None:
        pool = [{"id": key, "prompt": p, "response": r} for key, (p, r) in sorted(answers.items())]
        args.write_pool.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pool), encoding="utf-8")
        return
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
        "prompts": "bundled:harmful:train",
        "base_model_hash": base.model_hash,
        "max_new_tokens": TOKENS,
        "decoding": "greedy, fp32, batches of 64",
        "labels": {label: counts.get(label, 0) for label in LABELS},
        "real_answers": rate_summary(counts.get(FULL, 0), len(rows)),
        "rows": rows,
    }
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    real = out["real_answers"]
    interval = f"{real['rate']:.1%}, {real['ci_lo']:.1%}-{real['ci_hi']:.1%}"
    print(f"{real['k']} of {real['n']} read as real answers ({interval})")


if __name__ == "__main__":
    main()
