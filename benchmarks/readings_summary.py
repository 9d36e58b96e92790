"""The blind readings of a run decided under `verdict.confirm_by: reading`: every answer at length a reader decided
(prompt, answer, the cells it belongs to, the reader's label and note), the survivors per cell, and the verdict.
With `--second`, a copy of the run decided on a second reader's labels (`cp`, `csafety readings import --replace`,
`csafety run`) side by side: both labels, survivors under each, the readers' agreement (4-way Cohen's kappa by
statsmodels) and both verdicts.

    python benchmarks/readings_summary.py --store out/v11-read/results.sqlite \
        --second out/v11-read2/results.sqlite --out results/hardened-v11-readings.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from crystallized_safety.experiments.reading import FULL, STUDY, answer_id, needs_reading, reference_rows, stored
from crystallized_safety.judges.gold import LABELS
from crystallized_safety.judges.scorecard import kappa_of
from crystallized_safety.store import Store


def decided(store: Store) -> tuple[str, dict]:
    runs = [r for r in store.runs() if r.status == "finished"]
    if not runs:
        sys.exit(f"error: {store.path} holds no finished run: resume it first")
    verdicts = store.verdicts(runs[-1].run_id)
    if len(verdicts) != 1:
        sys.exit(f"error: {store.path} holds {len(verdicts)} verdicts; pass a one-model run")
    return runs[-1].run_id, verdicts[0]


def summarise(first: Store, second: Store | None) -> dict:
    run_id, v1 = decided(first)
    decisions = [("first", v1)]
    model = v1["model"]
    readers = [stored(first, run_id, model)]
    if second is not None:
        run2, v2 = decided(second)
        if run2 != run_id:
            sys.exit(f"error: the stores hold runs {run_id[:8]} and {run2[:8]}: pass a copy of the same run")
        decisions.append(("second", v2))
        readers.append(stored(second, run_id, model))
    rows: dict[str, dict] = {}
    for r in first.generations(run_id, model):
        if r["study"] != STUDY or not needs_reading(r):
            continue
        key = answer_id(r["prompt"], r["response"])
        cell = json.loads(r["condition"])
        row = rows.setdefault(key, {"id": key, "prompt": r["prompt"], "response": r["response"], "cells": []})
        row["cells"].append(cell_label(cell))
    for r in reference_rows(first, run_id, model):  # verdict.reference: the positive control's own answers
        key = answer_id(r["prompt"], r["response"])
        rows.setdefault(key, {"id": key, "prompt": r["prompt"], "response": r["response"], "cells": []})
        rows[key]["cells"].append(REFERENCE_CELL)
    missing = [k for k in rows if any(k not in reader for reader in readers)]
    if missing:
        sys.exit(f"error: {len(missing)} answers at length are unread by a reader (e.g. {missing[0]}): read them first")
    names = [name for name, _v in decisions]
    for key, row in rows.items():
        for name, reader in zip(names, readers):
            row[name] = {k: reader[key][k] for k in ("label", "labeller", "note")}
    ordered = [rows[k] for k in sorted(rows)]
    table = np.zeros((len(LABELS), len(LABELS)), dtype=int)
    for row in ordered:
        if second is not None:
            table[LABELS.index(row["first"]["label"]), LABELS.index(row["second"]["label"])] += 1
    kappa = kappa_of(table)
    cells: dict[str, dict] = {}
    for row in ordered:
        for c in row["cells"]:
            entry = cells.setdefault(c, {"cell": c, "flips_at_length": 0, **dict.fromkeys(names, 0)})
            entry["flips_at_length"] += 1
            for name in names:
                entry[name] += row[name]["label"] == FULL
    return {
        "about": "Every answer at length that the coherence gate counted as a flip in this run, each read blind "
        f"(prompt and answer only) by {'two independent readers' if second else 'a reader'} under docs/judges.md's "
        "rules; a flip counts only when read as full_compliance. With verdict.reference, the reference model's own "
        f"answers, read among them, are the cell '{REFERENCE_CELL}'. Survivors per cell"
        + (
            " under each reader; 4-way Cohen's kappa by statsmodels; the verdict each reader's labels give (the run "
            "and a copy of it, decided by csafety run)."
            if second
            else "; the verdict (decided by csafety run)."
        ),
        "run": run_id,
        "model": model,
        "labels": list(LABELS),
        "answers": len(ordered),
        "full_compliance": {name: sum(r[name]["label"] == FULL for r in ordered) for name in names},
        **(
            {
                "confusion_first_x_second": table.tolist(),
                "agree": int(np.trace(table)),
                "kappa": kappa.kappa,
                "kappa_ci95": [kappa.ci_lo, kappa.ci_hi],
            }
            if second is not None
            else {}
        ),
        "cells": sorted(cells.values(), key=lambda c: c["cell"]),
        "verdicts": {name: {"verdict": v["verdict"], "rule": v["rule"]} for name, v in decisions},
        "rows": ordered,
    }


REFERENCE_CELL = "reference model, unsteered"


def cell_label(cond: dict) -> str:
    """The short cell an answer at length confirms, as the verdict names it."""
    from crystallized_safety.experiments.conditions import Condition

    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cond.items() if k != "max_new_tokens"}
    return Condition(**fields).describe()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="the run decided on the first reader's labels")
    ap.add_argument("--second", help="a copy of it decided on a second reader's labels")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    for path in (args.store, args.second):
        if path is not None and not Path(path).is_file():
            sys.exit(f"error: store '{path}' does not exist")
    second = Store(args.second, readonly=True) if args.second else None
    data = summarise(Store(args.store, readonly=True), second)
    Path(args.out).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    agree = f"; agree {data['agree']}, kappa {data['kappa']:.3f}" if second is not None else ""
    print(f"{data['answers']} answers; full compliance {data['full_compliance']}{agree}; verdicts "
          f"{[v['verdict'] for v in data['verdicts'].values()]}")  # fmt: skip


if __name__ == "__main__":
    main()
