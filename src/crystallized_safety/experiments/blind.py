"""Blind re-analysis: the verdicts recomputed from a copy of the store in which every model carries a
shuffled anonymous name, so the analysis cannot know which model was trained how. Transfer studies are left
out (their conditions name the source model); the verdict does not read them."""

from __future__ import annotations

import random
from pathlib import Path

from ..store import Store
from .analysis import analyse_model
from .conditions import plan_studies
from .spec import ExperimentSpec, Transfer, parse_spec


def blind_verdicts(store: Store, run_id: str, spec: ExperimentSpec, workdir: Path, seed: int = 0) -> dict[str, dict]:
    """{real model: verdict recomputed under an anonymous name}; n_layers comes from each model's stored
    directions."""
    models = list(spec.models)
    shuffled = models[:]
    random.Random(seed).shuffle(shuffled)
    names = {real: f"model-{chr(ord('a') + i)}" for i, real in enumerate(shuffled)}
    copy = store.blind_copy(run_id, workdir / f"blind-{seed}.sqlite", names)
    try:
        data = spec.model_dump(mode="json")
        data["models"] = [names[m] for m in models]
        data["studies"] = [s.model_dump(mode="json") for s in spec.studies if not isinstance(s, Transfer)]
        blind = parse_spec(data, "blind spec")
        out = {}
        for real in models:
            art = copy.get_artifact(run_id, names[real], "directions")
            n_layers = int((art[0] if art else {}).get("n_layers", 0))
            plans = plan_studies(blind, n_layers, names[real])
            out[real] = analyse_model(blind, copy, run_id, names[real], plans)
        return out
    finally:
        copy.close()
