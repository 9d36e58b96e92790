"""A reading round for a positive control (`verdict.reference`): the reference model's answers exported by `csafety
readings export`, mixed in hash order with steered answers earlier readers labelled (a calibration: are the new
readers stricter?), and labelled blind by new readers. Writes every row with each reader's label, the reference's
read counts with Wilson intervals, and each new reader's agreement with the earlier labels on the calibration rows.

    python benchmarks/reference_readings.py --pool out/refread/pool.jsonl --reference out/refread/v11-export.jsonl \
        --earlier out/refread/calibration-first-labels.json \
        --reader A=out/refread/labels/reader-a.jsonl --reader B=out/refread/labels/reader-b.jsonl \
        --out results/reference-readings-128.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from crystallized_safety import jsonio
from crystallized_safety.errors import StoreError
from crystallized_safety.experiments.reading import FULL, answer_id
from crystallized_safety.judges.gold import LABELS
from crystallized_safety.stats import rate_summary


def lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    return [row for _n, row in jsonio.objects(text, str(path), StoreError, "one JSON object per line")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=Path, required=True, help="the exported lines the readers were given")
    ap.add_argument("--reference", type=Path, action="append", required=True, help="export(s) of reference answers")
    ap.add_argument("--earlier", type=Path, required=True, help="{id: label} of the calibration rows, earlier readers")
    ap.add_argument("--reader", action="append", required=True, help="NAME=labels.jsonl")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    pool = lines(args.pool)
    reference = {r["id"] for path in args.reference for r in lines(path)}
    earlier = json.loads(args.earlier.read_text())
    ids = [r["id"] for r in pool]
    if any(answer_id(r["prompt"], r["response"]) != r["id"] for r in pool) or set(ids) != reference | set(earlier):
        sys.exit("error: the pool is not the reference answers plus the calibration rows, each with its own id")
    readers = {}
    for spec in args.reader:
        name, path = spec.split("=", 1)
        got = {r["id"]: r for r in lines(Path(path))}
        if set(got) != set(ids) or any(r["label"] not in LABELS for r in got.values()):
            sys.exit(f"error: reader {name} did not label every pooled answer once with a known label")
        readers[name] = got
    rows = []
    for r in sorted(pool, key=lambda r: r["id"]):
        kind = "reference" if r["id"] in reference else "calibration"
        row = {**r, "kind": kind, **({"earlier": earlier[r["id"]]} if kind == "calibration" else {})}
        row["labels"] = {n: {k: got[r["id"]][k] for k in ("label", "labeller", "note")} for n, got in readers.items()}
        rows.append(row)
    refs = [r for r in rows if r["kind"] == "reference"]
    cal = [r for r in rows if r["kind"] == "calibration"]
    out = {
        "about": __doc__.split("\n\n")[0],
        "reference_answers": len(refs),
        "calibration_answers": len(cal),
        "calibration_earlier_real": sum(r["earlier"] == FULL for r in cal),
        "readers": {
            n: {
                "reference_real": rate_summary(sum(r["labels"][n]["label"] == FULL for r in refs), len(refs)),
                "calibration_agree": sum(r["labels"][n]["label"] == r["earlier"] for r in cal),
                "calibration_real_also_earlier": sum(
                    r["labels"][n]["label"] == FULL and r["earlier"] == FULL for r in cal
                ),
                "calibration_real": sum(r["labels"][n]["label"] == FULL for r in cal),
            }
            for n in readers
        },
        "rows": rows,
    }
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for n, s in out["readers"].items():
        real = s["reference_real"]
        print(f"reader {n}: reference {real['k']}/{real['n']} real; calibration agrees on {s['calibration_agree']}")


if __name__ == "__main__":
    main()
