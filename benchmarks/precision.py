"""Precision benchmark: does a faster number format keep the study's conclusions?

Runs the same spec (the default sweep grid: 6 layers x 5 relative alphas + baseline, 35 harmful and 35 harmless
prompts, 32 new tokens; directions extracted, coherence gate calibrated, verdict reached, all in the dtype under
test) once per dtype through `run_experiment`, in one process, and compares every dtype with float32:
- speed: the generation seconds the store recorded (the engine) and the whole run's wall time;
- per prompt: the share of equal refusal verdicts and of identical responses;
- per cell: the flip rate's largest absolute difference, and whether each cell's rate lies inside the other
  run's Wilson 95% interval (both ways);
- per model: the verdict (liquid / crystallized / ...).

    python benchmarks/precision.py                      # float32, mixed, and bfloat16 where bf16 is native
    python benchmarks/precision.py --dtypes float32,mixed --model smollm2-135m-hardened

The last line is machine-readable:
mixed_speedup=X.XX mixed_cells_inside_ci=K/N mixed_same_verdict=True bf16_speedup=... ...
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from crystallized_safety.experiments.spec import parse_spec  # noqa: E402
from crystallized_safety.precision import detect  # noqa: E402
from crystallized_safety.run.runner import run_experiment  # noqa: E402
from crystallized_safety.store import Store  # noqa: E402


def spec_for(model: str, dtype: str, layers: list[int], alphas: list[float], n: int, tokens: int, rows: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reduced-precision warning is what this benchmark measures
        return parse_spec(
            {
                "name": f"precision-{dtype}",
                "models": [model],
                "prompts": {"n": n},
                "generation": {"max_new_tokens": tokens, "batch_size": n, "pack_rows": rows},
                "damage": {"enabled": False},
                "dtype": dtype,
                "studies": [
                    {"kind": "layer_sweep", "layers": layers, "alphas": alphas},
                    # a control at the strongest alpha: what lets the verdict call a model liquid
                    {
                        "kind": "controls",
                        "layer": layers[len(layers) // 2],
                        "alpha": min(alphas, key=lambda a: -abs(a)),
                        "controls": ["orthogonal", "random"],
                        "seeds": 1,
                    },
                ],
            }
        )


def run_one(spec, store_path: Path) -> dict:
    store = Store(store_path)
    t0 = time.perf_counter()
    result = run_experiment(spec, store)
    wall = time.perf_counter() - t0
    gen_s = sum(t[4] for t in store.chunk_timing(result.run_id))
    sweep = next(a for a in store.analyses(result.run_id) if a["kind"] == "layer_sweep")["result"]
    rows = {(g["condition_key"], g["prompt_set"], g["prompt_index"]): g for g in store.generations(result.run_id)}
    out = {
        "wall_s": wall,
        "generation_s": gen_s,
        "verdict": result.verdicts[0]["verdict"],
        "cells": {c["condition_key"]: {"condition": c["condition"], "flip": c["flip"]} for c in sweep["cells"]},
        "rows": rows,
    }
    store.close()
    return out


def compare(ref: dict, other: dict) -> dict:
    shared = [k for k in ref["rows"] if k in other["rows"]]
    same = sum(ref["rows"][k]["refusal"] == other["rows"][k]["refusal"] for k in shared)
    identical = sum(ref["rows"][k]["response"] == other["rows"][k]["response"] for k in shared)
    diffs, inside, total, worst = [], 0, 0, None
    for key, cell in ref["cells"].items():
        a, b = cell["flip"], other["cells"][key]["flip"]
        if a["rate"] is None or b["rate"] is None:
            continue
        total += 1
        d = abs(a["rate"] - b["rate"])
        diffs.append(d)
        ok = a["ci_lo"] <= b["rate"] <= a["ci_hi"] and b["ci_lo"] <= a["rate"] <= b["ci_hi"]
        inside += ok
        if worst is None or d > worst["abs_diff"]:
            worst = {"condition": cell["condition"], "fp32": a["rate"], "other": b["rate"], "abs_diff": d}
    return {
        "speedup_generation": ref["generation_s"] / other["generation_s"],
        "speedup_wall": ref["wall_s"] / other["wall_s"],
        "verdict_agreement": same / len(shared),
        "identical_responses": identical / len(shared),
        "max_abs_flip_diff": max(diffs) if diffs else None,
        "cells_inside_ci": inside,
        "cells": total,
        "worst_cell": worst,
        "same_verdict": ref["verdict"] == other["verdict"],
        "verdict": other["verdict"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-refusal")
    ap.add_argument("--dtypes", default=None, help="comma-separated, float32 first (default: float32,mixed[,bfloat16])")
    ap.add_argument("--layers", default="8,10,12,14,16,20")
    ap.add_argument("--alphas", default="-0.1,-0.2,-0.3,-0.4,-0.5")
    ap.add_argument("--prompts", type=int, default=35)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--pack-rows", type=int, default=140, help="rows per generate, the same for every dtype")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cpu = detect()
    dtypes = (args.dtypes or ("float32,mixed,bfloat16" if cpu.native_bf16 else "float32,mixed")).split(",")
    if dtypes[0] != "float32":
        raise SystemExit("error: the first dtype must be float32 (the reference)")
    layers = [int(x) for x in args.layers.split(",")]
    alphas = [float(x) for x in args.alphas.split(",")]
    print(f"cpu: {cpu.summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            spec = spec_for(args.model, dtype, layers, alphas, args.prompts, args.max_new_tokens, args.pack_rows)
            runs[dtype] = run_one(spec, Path(tmp) / f"{dtype}.sqlite")
            r = runs[dtype]
            print(f"{dtype}: generation {r['generation_s']:.1f} s, run {r['wall_s']:.1f} s, {r['verdict']}", flush=True)
    out = {
        "machine": cpu.cpu,
        "native_bf16": cpu.native_bf16,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "grid": {"layers": layers, "alphas": alphas, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens},
        "runs": {d: {k: v for k, v in r.items() if k not in ("rows", "cells")} for d, r in runs.items()},
        "vs_float32": {d: compare(runs["float32"], runs[d]) for d in dtypes[1:]},
    }
    for d, c in out["vs_float32"].items():
        print(
            f"{d}: {c['speedup_generation']:.2f}x generation ({c['speedup_wall']:.2f}x whole run), per-prompt verdicts "
            f"{c['verdict_agreement']:.1%} equal, responses {c['identical_responses']:.1%} identical; flip rates: max "
            f"|diff| {c['max_abs_flip_diff']}, {c['cells_inside_ci']}/{c['cells']} cells inside each other's CI "
            f"(worst {c['worst_cell']}); verdict {c['verdict']} (same: {c['same_verdict']})",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(
        " ".join(
            f"{d}_speedup={c['speedup_generation']:.2f} {d}_cells_inside_ci={c['cells_inside_ci']}/{c['cells']} "
            f"{d}_same_verdict={c['same_verdict']}"
            for d, c in out["vs_float32"].items()
        )
    )


if __name__ == "__main__":
    main()
