"""Cross-model transfer: directions from a source model, applied to a target model's layers.

Same hidden size: the source's unit direction is used as is. Different sizes: a ridge-regularised linear
map from source to target activations is fitted on paired activations of shared prompts (extraction
split), and the source's raw mean difference is mapped through it, then unit-normalised.
"""

from __future__ import annotations

import json

import torch

from ..core.activations import capture
from ..core.directions import DirectionBank


def default_source_layer(target_layer: int, n_target: int, n_source: int) -> int:
    """Same relative depth."""
    if n_target <= 1:
        return 0
    return round(target_layer * (n_source - 1) / (n_target - 1))


def fit_linear_map(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-2) -> tuple[torch.Tensor, float]:
    """W minimising |(x - mx) W - (y - my)|^2 + ridge*tr(x'x)/d |W|^2 (dual form: fine for n << d). Returns W, R^2."""
    x, y = x.double(), y.double()
    xc, yc = x - x.mean(0), y - y.mean(0)
    gram = xc @ xc.T
    lam = ridge * float(gram.trace()) / max(gram.shape[0], 1)
    w = xc.T @ torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), yc)
    resid = yc - xc @ w
    r2 = 1.0 - float((resid**2).sum() / (yc**2).sum().clamp_min(1e-12))
    return w.float(), r2


def transfer_bank(spec, study, target, source, sets, target_bank: DirectionBank) -> DirectionBank:
    layers = list(study.layers)
    src_layers = list(
        study.source_layers or [default_source_layer(t, target.n_layers, source.n_layers) for t in layers]
    )
    for s in src_layers:
        source.check_layer(s)
    kw = dict(position=spec.directions.position, system=spec.generation.system)
    sh = capture(source, list(sets.extract_harmful), layers=sorted(set(src_layers)), **kw)
    sn = capture(source, list(sets.extract_harmless), layers=sorted(set(src_layers)), **kw)
    rows, fits = [], []
    same = source.hidden_size == target.hidden_size
    if not same:
        k = study.map_prompts // 2
        shared = list(sets.extract_harmful)[:k] + list(sets.extract_harmless)[:k]
        xs = capture(source, shared, layers=sorted(set(src_layers)), **kw)
        xt = capture(target, shared, layers=layers, **kw)
    for i, (t, s) in enumerate(zip(layers, src_layers)):
        slot = sh.layers.index(s)
        diff = sh.acts[:, slot].mean(0) - sn.acts[:, slot].mean(0)
        if same:
            vec, r2 = diff, None
        else:
            w, r2 = fit_linear_map(xs.acts[:, xs.layers.index(s)], xt.acts[:, i])
            vec = diff @ w
        rows.append(vec / vec.norm().clamp_min(1e-12))
        fits.append({"target_layer": t, "source_layer": s, "map_r2": r2})
    resid = torch.tensor([target_bank.resid_norm(t) for t in layers])
    meta = {
        "source_model": source.model_id,
        "source_hash": source.model_hash,
        "target_model": target.model_id,
        "mapping": "identity (same hidden size)" if same else "ridge linear map on shared prompts",
        "fits": json.dumps(fits),
        "n_layers": str(target.n_layers),
    }
    return DirectionBank(directions=torch.stack(rows), layers=layers, resid_norms=resid, metadata=meta)
