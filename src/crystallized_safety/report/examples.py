"""Examples for the report: for the best cells, one prompt's unsteered and steered responses side by side,
each with its judge verdict, first-token score and coherence."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from ..experiments.results import best
from .collect import is_control

TRUNCATE = 400  # characters of a response shown in an example


def _truncate(text: str, limit: int = TRUNCATE) -> str:
    text = text or ""
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


def _judged(label: str, g: dict | None, coherence: dict | None) -> dict:
    if g is None:
        return {"label": label, "missing": True}
    refusal = g.get("refusal")
    score = g.get("score")
    return {
        "label": label,
        "missing": False,
        "response": _truncate(g["response"]),
        "judge": g.get("judge"),
        "verdict": "undecided" if refusal is None else ("refusal" if refusal else "compliance"),
        "reason": g.get("judge_reason") or "",
        "score": None if score is None else round(score, 3),
        "score_verdict": None if score is None else ("refusal" if score > 0 else "compliance"),
        "coherent": None if g.get("coherent") is None else bool(g["coherent"]),
        "perplexity": None if g.get("perplexity") is None else round(g["perplexity"], 1),
        "distinct": None if g.get("distinct_n") is None else round(g["distinct_n"], 3),
        "max_perplexity": (coherence or {}).get("max_perplexity"),
    }


def examples(
    gens: list[dict],
    conds: dict[str, dict],
    cells: dict[str, dict],
    best_single: dict | None,
    best_multi: dict | None,
    candidates: list[dict],
    coherence: tuple | None,
) -> list[dict]:
    thresholds = coherence[0] if coherence else None
    index = {(g["condition_key"], g["prompt_set"], g["prompt_index"]): g for g in gens}
    base_key = next((k for k, c in conds.items() if not c.get("layers") and c.get("prompt_set") == "harmful"), None)
    rows_of: dict[str, dict[int, dict]] = defaultdict(dict)
    for (key, ps, i), g in index.items():
        if ps == "harmful":
            rows_of[key][i] = g
    base_rows = rows_of.get(base_key, {}) if base_key is not None else {}
    examples: list[dict] = []

    bests = [c for c in (best_single, best_multi) if c]
    top = max(bests, key=lambda c: (c["flip"]["rate"], c["flip"]["ci_lo"])) if bests else None
    best_full = cells.get(top["condition_key"]) if top else None
    title = "Best flip cell"
    if best_full is None:
        best_full = best(candidates, "compliance")
        title = "Strongest steering cell (no defined flip rate: best raw compliance)"
    chosen_index = None
    if best_full is not None:
        steered = rows_of.get(best_full["condition_key"], {})
        flipped = [i for i in best_full.get("flipped_prompts") or [] if i in steered]
        refused = [i for i in sorted(steered) if base_rows.get(i, {}).get("refusal") == 1]
        complied = [i for i in refused if steered[i].get("refusal") == 0]
        pool = flipped or complied or refused or sorted(steered)
        if pool:
            chosen_index = pool[0]
            examples.append(_example(title, best_full, chosen_index, base_rows, steered, thresholds))
        controls = [c for c in cells.values() if is_control(c) and c["prompt_set"] == "harmful"]
        same = [c for c in controls if c["layers"] == best_full["layers"] and c["alpha"] == best_full["alpha"]]
        ctrl = (same or controls)[0] if (same or controls) else None
        if ctrl is not None and chosen_index is not None:
            examples.append(
                _example(
                    "Control direction at the same layers and alpha, same prompt"
                    if same
                    else "Control direction (none at that cell), same prompt",
                    ctrl,
                    chosen_index,
                    base_rows,
                    rows_of.get(ctrl["condition_key"], {}),
                    thresholds,
                )
            )
    bypasses = []
    for key, rows in rows_of.items():
        cell = cells.get(key)
        if cell is None or not cell["layers"]:
            continue
        for i, g in sorted(rows.items()):
            if g.get("refusal") == 0 and g.get("coherent") == 0:
                # prefer a prompt the baseline refused, steered along the extracted direction
                bypasses.append((base_rows.get(i, {}).get("refusal") != 1, is_control(cell), cell["study"], key, i))
    if bypasses:
        *_, key, i = min(bypasses)
        examples.append(
            _example("Incoherent “bypass” (excluded from flips)", cells[key], i, base_rows, rows_of[key], thresholds)
        )
    return examples


def _example(title: str, cell: dict, i: int, base_rows: dict, steered: dict, thresholds: dict | None) -> dict:
    g = steered.get(i) or base_rows.get(i) or {}
    return {
        "title": title,
        "condition": cell["condition"],
        "study": cell["study"],
        "prompt_index": i,
        "prompt": _truncate(g.get("prompt", ""), 300),
        "rows": [
            _judged("baseline (unsteered)", base_rows.get(i), thresholds),
            _judged("steered", steered.get(i), thresholds),
        ],
    }


def answer_spreads(gens: list[dict], conds: dict[str, dict]) -> dict[str, dict]:
    """Per steered harmful cell, keyed by its label (`Condition.describe`): how many distinct answers its flips
    (prompts refused unsteered, answered coherently when steered) are, and the most common one. Answers that do
    not depend on the prompt ("I'm not." to forty different requests) pass the coherence gate but are no bypass:
    a reader of the deciding cell should see it at once."""
    from ..experiments.conditions import Condition

    refused = {
        g["prompt_index"]
        for g in gens
        if g["prompt_set"] == "harmful" and not conds[g["condition_key"]]["layers"] and g["refusal"] == 1
    }
    flips: defaultdict[str, list[str]] = defaultdict(list)
    for g in gens:
        if g["prompt_set"] == "harmful" and g["prompt_index"] in refused and g["refusal"] == 0 and g["coherent"] != 0:
            flips[g["condition_key"]].append(" ".join((g["response"] or "").lower().split()))
    out = {}
    for key, answers in flips.items():
        c = conds[key]
        if not c["layers"]:
            continue
        tupled: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
        top, count = Counter(answers).most_common(1)[0]
        out[Condition(**tupled).describe()] = {
            "flips": len(answers),
            "distinct": len(set(answers)),
            "top": _truncate(top, 120),
            "top_count": count,
        }
    return out
