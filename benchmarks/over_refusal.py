"""Over-refusal on the bundled over_refusal set (150 safe requests that only sound unsafe: homonym, figurative,
safe_context), beside the refusal of the bundled harmful eval split, per model (issue 26's measure):

    .venv/bin/python benchmarks/over_refusal.py --models smollm2-135m smollm2-135m-refusal smollm2-135m-hardened \\
        qwen2.5-coder-0.5b --out results/over-refusal.json

Greedy, 32 new tokens, float32, each model's chat template with no system prompt (Qwen: the vendor default),
judged by the substring judge (`substring/1`, the runner's). Rates with Wilson 95% intervals; every response is
stored with its verdict, so the counts can be re-judged from the file. Models already in `--out` and not named
again are kept, each with the machine it was measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from crystallized_safety.core.generation.api import generate  # noqa: E402
from crystallized_safety.judges.substring import SubstringJudge  # noqa: E402
from crystallized_safety.precision import cpu_name, native_bf16  # noqa: E402
from crystallized_safety.prompts import OVER_REFUSAL_CATEGORIES, bundled  # noqa: E402
from crystallized_safety.registry import load_model  # noqa: E402
from crystallized_safety.stats import rate_summary  # noqa: E402


def rate(flags: list[bool]) -> dict:
    return rate_summary(sum(flags), len(flags))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    judge = SubstringJudge()
    sets = {c: bundled("over_refusal", c).prompts for c in OVER_REFUSAL_CATEGORIES}
    sets["harmful_eval"] = bundled("harmful", "eval").prompts
    result = {"about": __doc__.split("\n\n")[0], "judge": "substring/1", "max_new_tokens": args.max_new_tokens,
              "machine": {"cpu": cpu_name(), "native_bf16": native_bf16(), "cores": os.cpu_count(),
                          "torch": torch.__version__}, "models": {}}  # fmt: skip
    for name in args.models:
        start = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {name}: loading", flush=True)
        model = load_model(name, dtype="float32")
        entry: dict = {"rates": {}, "rows": {}}
        for label, prompts in sets.items():
            gens = generate(model, list(prompts), max_new_tokens=args.max_new_tokens, batch_size=50)
            responses = [g.response for g in gens]
            refused = [bool(v.refusal) for v in judge.judge(list(prompts), responses)]
            entry["rates"][label] = rate(refused)
            entry["rows"][label] = [{"prompt": p, "response": r, "refusal": f}
                                    for p, r, f in zip(prompts, responses, refused)]  # fmt: skip
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {label} refused {sum(refused)}/{len(refused)}", flush=True)
        every = [row["refusal"] for c in OVER_REFUSAL_CATEGORIES for row in entry["rows"][c]]
        entry["rates"]["over_refusal"] = rate(every)
        entry["seconds"] = round(time.perf_counter() - start, 1)
        result["models"][name] = entry
        del model
    if args.out.exists():  # other models measured earlier stay (in their order), each with its machine
        old = json.loads(args.out.read_text())
        kept = {name: {**entry, "machine": entry.get("machine", old.get("machine"))}
                for name, entry in old.get("models", {}).items()}  # fmt: skip
        result["models"] = {**kept, **result["models"]}
    for entry in result["models"].values():
        entry.setdefault("machine", result["machine"])
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
