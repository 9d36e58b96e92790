"""Provenance of a model's results: model id and hash, prompt-set hashes, direction metadata, seeds,
transfer sources."""

from __future__ import annotations

import hashlib
from importlib import metadata

from ..store import Store
from .collect import is_control


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def provenance(
    store: Store,
    run_id: str,
    model: str,
    gens: list[dict],
    conds: dict[str, dict],
    directions: tuple | None,
    coherence: tuple | None,
    data: dict,
) -> dict:
    meta = dict(directions[0] or {}) if directions else {}
    prompt_sets = []
    if meta.get("harmful_sha256"):
        for name in ("harmful", "harmless"):
            prompt_sets.append(
                {
                    "set": f"{name} (extraction)",
                    "count": meta.get(f"{name}_count"),
                    "sha256": meta.get(f"{name}_sha256"),
                    "source": "directions metadata",
                }
            )
    for name in ("harmful", "harmless"):
        base = sorted(
            (g for g in gens if g["prompt_set"] == name and not conds[g["condition_key"]].get("layers")),
            key=lambda g: g["prompt_index"],
        )
        if base:
            joined = "\n".join(g["prompt"].strip() for g in base)
            prompt_sets.append(
                {
                    "set": f"{name} (evaluation)",
                    "count": len(base),
                    "sha256": hashlib.sha256(joined.encode("utf-8")).hexdigest(),
                    "source": "computed from the stored baseline prompts (PromptSet.sha256 convention)",
                }
            )
    transfers = []
    for kind in store.artifact_kinds(run_id, model):
        if kind.startswith("transfer:"):
            art = store.get_artifact(run_id, model, kind)
            info = (art[0] or {}) if art else {}
            transfers.append({k: info.get(k) for k in ("source_model", "source_hash", "mapping") if k in info})
    seeds = sorted({c["direction"] for c in conds.values() if is_control(c)})
    return {
        "model_id": meta.get("model_id", model),
        "model_hash": meta.get("model_hash"),
        "directions": meta,
        "transfer_sources": transfers,
        "coherence_thresholds": coherence[0] if coherence else None,
        "prompt_sets": prompt_sets,
        "seeds": {"spec seed": data["spec"].get("seed"), "control directions": seeds},
    }
