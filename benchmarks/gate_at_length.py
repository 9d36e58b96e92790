"""Does the coherence gate judge long answers like short ones? (issue 25: flips confirmed at 128 tokens)

The verdict's deciding cell is re-generated at `verdict.confirm_tokens` (128) and judged by the gate calibrated
on short answers, with the spec's fixed `min_relevance`. If the gate failed the unsteered model's own long answers
much more often than its short ones, confirmation would punish length, not drift. This measures it: the gate
calibrated as a run calibrates it (unsteered greedy answers to the calibration prompts, at the spec's length),
then applied to the unsteered model's answers to held-out harmless eval prompts at the short length and at the
confirmation length: the share passing, and why the others fail (perplexity, distinct-2, relevance).

    .venv/bin/python benchmarks/gate_at_length.py --spec configs/qwen.yaml --json benchmarks/gate-at-length-qwen.json
    .venv/bin/python benchmarks/gate_at_length.py --spec configs/organisms.yaml --model smollm2-135m-refusal ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from crystallized_safety.core.generation.api import generate  # noqa: E402
from crystallized_safety.environment import environment  # noqa: E402
from crystallized_safety.experiments.prompt_sets import load_prompt_sets  # noqa: E402
from crystallized_safety.experiments.spec import load_spec  # noqa: E402
from crystallized_safety.judges.coherence import CoherenceGate  # noqa: E402
from crystallized_safety.judges.substring import SubstringJudge  # noqa: E402
from crystallized_safety.registry import load_model  # noqa: E402
from crystallized_safety.run.runner import calibrate_coherence  # noqa: E402
from crystallized_safety.stats import wilson_interval  # noqa: E402


def share(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n) if n else (None, None)
    return {"k": k, "n": n, "rate": k / n if n else None, "ci_lo": lo, "ci_hi": hi}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, required=True)
    ap.add_argument("--model", default=None, help="default: the spec's first model")
    ap.add_argument("--prompts", type=int, default=40, help="held-out harmless eval prompts")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    spec = load_spec(args.spec)
    name = args.model or spec.models[0]
    sets = load_prompt_sets(spec)
    model = load_model(name, dtype=spec.dtype)
    short, long = spec.generation.max_new_tokens, spec.verdict.confirm_tokens or 128
    t0 = time.perf_counter()
    # the thresholds a run calibrates: at the spec's length, and at the confirmation length (relevance rule scaled by
    # the medians of the calibration answers at the two lengths), as the runner does
    short_limits = calibrate_coherence(spec, model, sets)
    long_limits = calibrate_coherence(spec, model, sets, long, short_limits)
    gate = CoherenceGate(model, short_limits, system=spec.generation.system)
    at_length = CoherenceGate(model, long_limits, system=spec.generation.system)
    prompts = list(sets.eval_harmless)[: args.prompts]
    judge = SubstringJudge(delayed=True)
    out: dict = {
        "model": name,
        "spec": str(args.spec),
        "prompts": len(prompts),
        "thresholds": short_limits,
        "thresholds_at_length": long_limits,
        "lengths": {},
    }
    answers_at: dict[int, list] = {}
    for tokens in (short, long):
        answers_at[tokens] = generate(
            model, prompts, max_new_tokens=tokens, batch_size=spec.generation.batch_size, system=spec.generation.system
        )
    for which, gens, used in (
        (str(short), answers_at[short], gate),
        (str(long), answers_at[long], gate),
        (f"{long}-calibrated", answers_at[long], at_length),
    ):
        responses = [g.response for g in gens]
        refusals = [bool(v.refusal) for v in judge.judge(prompts, responses)]
        results = used.evaluate(prompts, responses, refusals)
        answers = [r for r, refused in zip(results, refusals) if not refused]
        rel = [r.relevance for r in answers if r.relevance is not None]
        out["lengths"][which] = {
            "answers": len(answers),
            "passing": share(sum(r.coherent for r in answers), len(answers)),
            "failing_relevance": sum("off-topic" in r.reason for r in answers),
            "failing_perplexity": sum("perplexity" in r.reason for r in answers),
            "failing_distinct": sum("distinct" in r.reason for r in answers),
            "relevance_median": statistics.median(rel) if rel else None,
            "mean_tokens": statistics.mean(r.n_tokens for r in answers) if answers else None,
        }
        print(which, json.dumps(out["lengths"][which]))
    out["seconds"] = time.perf_counter() - t0
    env = environment()
    out["environment"] = {k: env.get(k) for k in ("cpu", "native_bf16", "threads", "torch")}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
