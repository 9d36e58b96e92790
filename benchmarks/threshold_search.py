"""Adaptive threshold search vs the full grid: same per-layer thresholds and verdict, with how many fewer tokens?

Runs each spec twice through `run_experiment`, in one process: as written (every cell generated) and with
`screening: {enabled: true, mode: adaptive}` (bisection on the first-token screened rate, generation only at
the crossing). Compares the generated tokens (all rows, and the rows of the screened study kinds alone), the
per-layer thresholds of every layer sweep (weakest alpha whose coherent flip rate reaches the verdict's
threshold; within one grid step counts as the same), the threshold study's threshold, and the verdict.

    python benchmarks/threshold_search.py     # the default grid (6 layers x 5 alphas, random controls) and
                                              # configs/organism-compact.yaml, on the liquid organism

The last line is machine-readable: <spec>_token_ratio=X.XX <spec>_same_thresholds=K/N <spec>_same_verdict=...
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
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from crystallized_safety.experiments.conditions import plan_studies  # noqa: E402
from crystallized_safety.experiments.spec import parse_spec  # noqa: E402
from crystallized_safety.precision import detect  # noqa: E402
from crystallized_safety.run.runner import run_experiment  # noqa: E402
from crystallized_safety.store import Store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCREENED = ("layer_sweep", "threshold", "multilayer")


def default_grid(model: str) -> dict:
    return {
        "name": "default-grid",
        "models": [model],
        "prompts": {"n": 35},
        "generation": {"max_new_tokens": 32, "batch_size": 35, "pack_rows": 140},
        "judges": ["substring", "score"],
        "studies": [
            {"kind": "layer_sweep", "layers": [8, 10, 12, 14, 16, 20], "alphas": [-0.1, -0.2, -0.3, -0.4, -0.5],
             "controls": True},
        ],
    }  # fmt: skip


def run(data: dict, store_path: Path) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = parse_spec(data)
    store = Store(store_path)
    t0 = time.perf_counter()
    result = run_experiment(spec, store)
    wall = time.perf_counter() - t0
    gens = store.generations(result.run_id)
    analyses = store.analyses(result.run_id)
    screened_studies = {a["study"] for a in analyses if a["kind"] in SCREENED}
    plan_of: dict[str, set] = {}  # condition key -> study kinds that need it
    for plan in plan_studies(spec, 10_000, spec.models[0]):  # (the depth only bounds-checks layers)
        for _t, c in plan.conditions:
            plan_of.setdefault(c.key, set()).add(plan.kind)
    grid_tokens = sum(g["n_tokens"] for g in gens if plan_of.get(g["condition_key"], set()) & set(SCREENED))
    out = {
        "wall_s": wall,
        "tokens": sum(g["n_tokens"] for g in gens),
        "grid_tokens": grid_tokens,
        "generations": len(gens),
        "verdict": result.verdicts[0]["verdict"],
        "thresholds": {},
        "screening": None,
    }
    for a in analyses:
        if a["study"] in screened_studies and a["kind"] == "layer_sweep":
            out["thresholds"].update({f"{a['study']}:L{k}": v for k, v in a["result"]["layer_thresholds"].items()})
        if a["kind"] == "threshold":
            cells = [c for c in a["result"]["cells"] if c["flip"]["rate"] is not None and c["flip"]["rate"] >= 0.5]
            weakest = min(cells, key=lambda c: abs(c["alpha"]))["alpha"] if cells else None
            out["thresholds"][f"{a['study']}:threshold"] = weakest
    found = store.get_artifact(result.run_id, spec.models[0], "screening")
    if found is not None:
        art = found[0]
        out["screening"] = {k: art[k] for k in ("screened_cells", "grid_cells", "generated_cells", "bisection_steps",
                                                  "confirmation_rounds")}  # fmt: skip
    store.close()
    return out


def same_within_a_step(full: dict, adaptive: dict, alphas_by_key: dict) -> tuple[int, int, list]:
    agree, total, misses = 0, 0, []
    for key, want in full.items():
        got = adaptive.get(key)
        total += 1
        grid = alphas_by_key.get(key.split(":")[0], [])
        if want is None and got is None:
            agree += 1
        elif want is not None and got is not None and abs(grid.index(got) - grid.index(want)) <= 1:
            agree += 1
        else:
            misses.append({"where": key, "full": want, "adaptive": got})
    return agree, total, misses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-refusal")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cpu = detect()
    print(f"cpu: {cpu.summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    compact = yaml.safe_load((ROOT / "configs" / "organism-compact.yaml").read_text())
    compact["models"] = [args.model]
    specs = {"default_grid": default_grid(args.model), "compact": compact}
    results: dict = {"machine": cpu.cpu, "torch": torch.__version__, "model": args.model, "specs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in specs.items():
            adaptive = {**data, "screening": {"enabled": True, "mode": "adaptive"}}
            full_r = run(data, Path(tmp) / f"{name}-full.sqlite")
            print(f"{name} full: {full_r['tokens']} tokens, {full_r['wall_s']:.0f} s, {full_r['verdict']}", flush=True)
            ad_r = run(adaptive, Path(tmp) / f"{name}-adaptive.sqlite")
            print(f"{name} adaptive: {ad_r['tokens']} tokens, {ad_r['wall_s']:.0f} s, {ad_r['verdict']}", flush=True)
            alphas_by_key = {}
            for study in data["studies"]:
                label = study.get("name") or study["kind"]
                if study["kind"] in ("layer_sweep", "threshold"):
                    alphas_by_key[label] = sorted(study["alphas"], key=abs)
            agree, total, misses = same_within_a_step(full_r["thresholds"], ad_r["thresholds"], alphas_by_key)
            results["specs"][name] = {
                "full": full_r,
                "adaptive": ad_r,
                "token_ratio": full_r["tokens"] / ad_r["tokens"],
                "grid_token_ratio": full_r["grid_tokens"] / max(ad_r["grid_tokens"], 1),
                "time_ratio": full_r["wall_s"] / ad_r["wall_s"],
                "same_thresholds": [agree, total],
                "threshold_misses": misses,
                "same_verdict": full_r["verdict"] == ad_r["verdict"],
            }
            r = results["specs"][name]
            print(
                f"{name}: tokens {full_r['tokens']} -> {ad_r['tokens']} ({r['token_ratio']:.2f}x fewer; grid cells "
                f"alone {r['grid_token_ratio']:.2f}x), run {r['time_ratio']:.2f}x faster, thresholds {agree}/{total} "
                f"within one step {misses or ''}, verdict {full_r['verdict']} vs {ad_r['verdict']}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(
        " ".join(
            f"{n}_token_ratio={r['token_ratio']:.2f} {n}_grid_token_ratio={r['grid_token_ratio']:.2f} "
            f"{n}_same_thresholds={r['same_thresholds'][0]}/{r['same_thresholds'][1]} "
            f"{n}_same_verdict={r['same_verdict']}"
            for n, r in results["specs"].items()
        )
    )


if __name__ == "__main__":
    main()
