"""Analyses of the studies that compare published methods on both prompt sets: directional ablation (zero vs
affine) and angular steering. Each row pairs a method's effect on harmful prompts (refusal, coherent flips)
with its side effect on harmless ones (induced refusal) and its KL damage; ablation rows also compare the
direction with a random one ablated the same way, and affine with zero ablation (Fisher, Holm-adjusted)."""

from __future__ import annotations

from collections import defaultdict

from .. import stats
from .conditions import HARMFUL, HARMLESS, Condition
from .results import Cells, compare

Tagged = list[tuple[dict, Condition, dict]]  # (study tags, condition, cell stats)


def _pair(group: dict[str, dict]) -> dict:
    """One row from the harmful and harmless cells of the same intervention."""
    harmful, harmless = group.get(HARMFUL, {}), group.get(HARMLESS, {})
    return {"harmful": harmful, "harmless": harmless, "kl": harmful.get("kl") or harmless.get("kl")}


def ablation(kind: str, tagged: Tagged, cells: Cells, flip_threshold: float) -> dict:
    """Per (source layer, mode): bypass on harmful prompts, induced refusal on harmless ones, KL; the random
    control's refusal next to it; affine vs zero per source layer."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for tags, _cond, st in tagged:
        key = (tags["source_layer"], tags["mode"], tags.get("control", "direction"))
        groups[key][tags["prompt_set"]] = st
    rows = []
    for (source, mode, which), group in sorted(groups.items()):
        if which != "direction":
            continue
        row = {"source_layer": source, "mode": mode, **_pair(group)}
        ctrl = groups.get((source, mode, "random"))
        if ctrl:
            row["control"] = _pair(ctrl)
            row["vs_control"] = compare(row["harmful"]["refusal"], row["control"]["harmful"]["refusal"])
        rows.append(row)
    versus = []
    for source in sorted({r["source_layer"] for r in rows}):
        by_mode = {r["mode"]: r for r in rows if r["source_layer"] == source}
        if "ablate" in by_mode and "affine" in by_mode:
            zero, affine = by_mode["ablate"], by_mode["affine"]
            versus.append(
                {
                    "source_layer": source,
                    "harmful_refusal": compare(affine["harmful"]["refusal"], zero["harmful"]["refusal"]),
                    "harmless_refusal": compare(affine["harmless"]["refusal"], zero["harmless"]["refusal"]),
                }
            )
    ps = [v["harmless_refusal"]["p_fisher"] for v in versus]
    for v, adj in zip(versus, stats.holm([p for p in ps if p is not None]) if any(p is not None for p in ps) else []):
        v["harmless_p_holm"] = adj
    return {
        "metric": "refusal",
        "rows": rows,
        "affine_vs_zero": versus,
        "note": "ablation at every listed layer; affine = projection set to the harmless mean's (ACE), zero = the "
        "paper's; harmless refusal that rises under zero-ablation is the trap affine ablation avoids",
    }


def _flip_rate(row: dict) -> float | None:
    return (row["harmful"].get("flip") or {}).get("rate")


def angular(kind: str, tagged: Tagged, cells: Cells, flip_threshold: float) -> dict:
    """Per (layers, angle): refusal and coherent flips on harmful prompts, induced refusal on harmless ones, KL;
    per layer set the angle with the most coherent flips."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for tags, _cond, st in tagged:
        groups[(tuple(tags["layers"]), tags["angle"])][tags["prompt_set"]] = st
    rows = [{"layers": list(layers), "angle": angle, **_pair(g)} for (layers, angle), g in sorted(groups.items())]
    best: dict[str, dict] = {}
    for layers in sorted({tuple(r["layers"]) for r in rows}):
        rated = [r for r in rows if tuple(r["layers"]) == layers and _flip_rate(r) is not None]
        if rated:
            top = max(rated, key=lambda r: (r["harmful"]["flip"]["rate"], r["harmful"]["flip"]["ci_lo"]))
            best[",".join(map(str, layers))] = {"angle": top["angle"], "flip": top["harmful"]["flip"]}
    return {
        "metric": "flip",
        "rows": rows,
        "best_angle": best,
        "flip_threshold": flip_threshold,
        "note": "angle in degrees from the refusal direction in the plane it spans with the harmless mean; the "
        "activation's norm is kept",
    }


def subspace(kind: str, tagged: Tagged, cells: Cells, flip_threshold: float) -> dict:
    """Per (source layer, K, mode): refusal on harmful and harmless prompts and KL as the ablated subspace grows."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for tags, _cond, st in tagged:
        groups[(tags["source_layer"], tags["k"], tags["mode"])][tags["prompt_set"]] = st
    rows = [{"source_layer": s, "k": k, "mode": m, **_pair(g)} for (s, k, m), g in sorted(groups.items())]
    return {
        "metric": "refusal",
        "rows": rows,
        "note": "the top-K singular vectors of the paired differences at the source layer, ablated at every layer",
    }
