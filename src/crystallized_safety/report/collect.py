"""Collecting a run from the store: the run's facts, its analyses as cells enriched with their stored
conditions, the best cells, their controls, and how the judges agree."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import yaml

from ..experiments.direction_ref import DirectionRef
from ..judges.agreement import agreement
from ..stats import rate_summary
from ..store import Store
from .model_report import NOT_VERDICT_KINDS, ReportError
from .tables import DISAGREEMENTS_SHOWN


def collect(store: Store, run_id: str) -> dict:
    row = store.run_row(run_id)
    analyses, verdicts = store.analyses(run_id), store.verdicts(run_id)
    if not analyses and not verdicts:
        n = store.counts(run_id)["generations"]
        raise ReportError(
            f"run {run_id} in {store.path} has no analyses ({n} generations): finish it with "
            f"`csafety run CONFIG.yaml --store {store.path}` (it resumes) before reporting"
        )
    try:
        spec = yaml.safe_load(row["spec_yaml"]) or {}
    except yaml.YAMLError:
        spec = {}
    present = {a["model"] for a in analyses} | {v["model"] for v in verdicts}
    ordered = [m for m in spec.get("models", []) if m in present]
    models = ordered + sorted(present - set(ordered))
    empty = {"chunks": 0, "rows": 0, "generation_seconds": 0.0, "analysis_seconds": None}
    timing: defaultdict[tuple[str, str], dict] = defaultdict(lambda: dict(empty))
    for model, study, n, rows, seconds in store.chunk_timing(run_id):
        timing[(model, study)].update(chunks=n, rows=rows, generation_seconds=seconds)
    for a in analyses:
        timing[(a["model"], a["study"])]["analysis_seconds"] = a["seconds"]
    return {
        "run": {
            "run_id": run_id,
            "name": row["name"],
            "status": row["status"],
            "spec_hash": row["spec_hash"],
            "created": iso(row["created"]),
            "finished": iso(row["finished"]),
            "wall_seconds": round(row["finished"] - row["created"], 1) if row["finished"] else None,
        },
        "spec_yaml": row["spec_yaml"],
        "spec": spec,
        "environment": json_or_empty(row["environment"]),
        "analyses": analyses,
        "verdicts": verdicts,
        "models": models,
        "timing": [{"model": m, "study": s, **v} for (m, s), v in sorted(timing.items())],
    }


def iso(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def json_or_empty(text: str | None) -> dict:
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}


def walk(obj: Any) -> Iterator[dict]:
    """Every cell-like dict (one with a condition_key) anywhere in an analysis result."""
    if isinstance(obj, dict):
        if "condition_key" in obj:
            yield obj
        for value in obj.values():
            yield from walk(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from walk(value)


def cells_of(analyses: list[dict], conds: dict[str, dict]) -> dict[str, dict]:
    """Unique cells by condition key, enriched with the stored condition (layers, alpha, unit, direction)."""
    out: dict[str, dict] = {}
    for a in analyses:
        for cell in walk(a["result"]):
            key = cell["condition_key"]
            cond = conds.get(key)
            if cond is None or key in out:
                if key in out and a["kind"] not in NOT_VERDICT_KINDS:
                    out[key]["verdict_study"] = True
                continue
            out[key] = {
                **cell,
                "layers": list(cond.get("layers", [])),
                "alpha": cond.get("alpha", 0.0),
                "alpha_unit": cond.get("alpha_unit"),
                "mode": cond.get("mode"),
                "direction": cond.get("direction", ""),
                "prompt_set": cond.get("prompt_set"),
                "study": a["study"],
                "kind": a["kind"],
                "verdict_study": a["kind"] not in NOT_VERDICT_KINDS,
            }
    return out


def is_control(cell: dict) -> bool:
    return DirectionRef.parse(cell["direction"]).is_control


def control_for(cell: dict, cells: dict[str, dict]) -> dict | None:
    """Pooled flip rate of the random/orthogonal controls run at the same layers, alpha, unit and mode."""
    same = [
        c
        for c in cells.values()
        if is_control(c)
        and c["prompt_set"] == "harmful"
        and c["layers"] == cell["layers"]
        and c["alpha"] == cell["alpha"]
        and c["alpha_unit"] == cell["alpha_unit"]
        and c["mode"] == cell["mode"]
        and c.get("flip")
    ]
    if not same:
        return None
    k, n = sum(c["flip"]["k"] for c in same), sum(c["flip"]["n"] for c in same)
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "ci_lo": None, "ci_hi": None, "cells": len(same)}
    return {**rate_summary(k, n), "cells": len(same)}


def brief(cell: dict | None) -> dict | None:
    if cell is None:
        return None
    return {
        "condition": cell["condition"],
        "condition_key": cell["condition_key"],
        "layers": cell["layers"],
        "layer": cell["layers"][0] if len(cell["layers"]) == 1 else None,
        "alpha": cell["alpha"],
        "alpha_unit": cell["alpha_unit"],
        "n": cell["n"],
        "flip": cell["flip"],
        "compliance": cell.get("compliance"),
        "coherence": cell.get("coherence"),
        "study": cell["study"],
    }


def judge_agreement(gens: list[dict], calibration: dict | None = None) -> tuple[dict | None, dict]:
    """Stored judge (substring) vs the first-token score, on every row that has both. The score threshold is
    the run's calibrated one (fitted on unsteered outputs) where the store has it, else 0."""
    rows = [g for g in gens if g.get("score") is not None and g.get("refusal") is not None]
    if not rows:
        return None, {}
    threshold = float(calibration["threshold"]) if calibration else 0.0
    a = [bool(g["refusal"]) for g in rows]
    b = [g["score"] > threshold for g in rows]
    res = agreement(a, b)
    judges = sorted({g["judge"] for g in rows})
    name = "/".join(judges) if len(judges) <= 2 else "stored judge"
    result = {
        "a": name,
        "b": f"first-token score > {threshold:.2f}",
        "kappa": res.kappa,
        "n": res.n,
        "n_dropped": res.n_dropped + sum(1 for g in gens if g.get("score") is not None and g.get("refusal") is None),
        "percent_agreement": res.percent_agreement,
        "table": dict(res.table),
        "threshold": threshold,
        "threshold_note": (
            f"the score is thresholded at {threshold:.2f}, calibrated against the substring judge on the unsteered "
            "outputs of this run; agreement on steered outputs tests whether the fast judge can screen a sweep"
            if calibration
            else "the score is thresholded at 0 (p(refusal tokens) > 0.5); the store holds no calibrated threshold"
        ),
        "disagreements": disagreements(rows, threshold),
    }
    return result, {"scores": [g["score"] for g in rows], "labels": a}


def disagreements(rows: list[dict], threshold: float, shown: int = DISAGREEMENTS_SHOWN) -> list[dict]:
    """The responses the two judges disagree on most confidently (score farthest from the threshold), `shown`
    each way: the stored judge reads a refusal and the score compliance, then the reverse. Ties keep store order."""
    out: list[dict] = []
    for stored in (True, False):
        split = [g for g in rows if bool(g["refusal"]) == stored and (g["score"] > threshold) != stored]
        split.sort(key=lambda g: -abs(g["score"] - threshold))
        out += [
            {
                "stored": "refusal" if stored else "compliance",
                "score": round(float(g["score"]), 3),
                "prompt": g["prompt"],
                "response": g["response"][:200],
            }
            for g in split[:shown]
        ]
    return out


def unit(cells: list[dict]) -> str | None:
    units = {c.get("alpha_unit") for c in cells if c.get("alpha_unit")}
    return units.pop() if len(units) == 1 else None
