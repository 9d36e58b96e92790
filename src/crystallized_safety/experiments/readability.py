"""Readable vs steerable: how well each layer's activations *tell* harmful from harmless (probe AUC on
held-out prompts), set beside how well steering at that layer *changes* behaviour."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from ..core.activations import Captured, capture
from ..core.directions import fit_probe


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC = P(score_pos > score_neg) + 0.5 P(tie), via the Mann-Whitney rank sum."""
    ranks = rankdata(np.concatenate([pos, neg]))
    n1, n0 = len(pos), len(neg)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def readability(spec, study, model, sets, train: tuple[Captured, Captured] | None = None) -> dict:
    """Per layer: AUC of the projection onto the extracted direction, and a logistic probe's accuracy/AUC;
    directions and probes come from the extraction split, scores from the held-out evaluation split.
    `train`: the extraction split's activations (harmful, harmless) when already captured at the spec's position
    and system prompt for every layer the study reads (the direction extraction's pass); else captured here."""
    layers = model.parse_layers(None if study.layers == "all" else study.layers)
    kw = dict(layers=layers, position=spec.directions.position, system=spec.generation.system)
    if train is not None and set(layers) <= set(train[0].layers):
        slots = [train[0].layers.index(layer) for layer in layers]
        xh, xn = train[0].acts[:, slots], train[1].acts[:, slots]
    else:
        xh, xn = (
            capture(model, list(sets.extract_harmful), **kw).acts,
            capture(model, list(sets.extract_harmless), **kw).acts,
        )
    eh, en = capture(model, list(sets.eval_harmful), **kw).acts, capture(model, list(sets.eval_harmless), **kw).acts
    direction = xh.mean(0) - xn.mean(0)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    w, b = fit_probe(xh, xn)
    rows = []
    for slot, layer in enumerate(layers):
        ph = (eh[:, slot] @ direction[slot]).numpy()
        pn = (en[:, slot] @ direction[slot]).numpy()
        sh = (eh[:, slot] @ w[slot] + b[slot]).numpy()
        sn = (en[:, slot] @ w[slot] + b[slot]).numpy()
        acc = (float((sh > 0).sum()) + float((sn <= 0).sum())) / (len(sh) + len(sn))
        rows.append(
            {
                "layer": layer,
                "projection_auc": round(auc(ph, pn), 4),
                "probe_auc": round(auc(sh, sn), 4),
                "probe_accuracy": round(acc, 4),
                "harmful_projection": round(float(ph.mean()), 3),
                "harmless_projection": round(float(pn.mean()), 3),
            }
        )
    return {
        "layers": rows,
        "n_train": [len(xh), len(xn)],
        "n_eval": [len(eh), len(en)],
        "note": "directions and probes fitted on the extraction split, scored on the held-out evaluation split",
    }
