"""Adaptive threshold search (issue 16, part 2): bisection on screened rates finds each curve's first alpha at
the flip threshold with log2(alphas) screened cells; only that cell is generated (with its controls), and
generation that does not confirm it walks to stronger alphas. Checked on scripted rates (every branch), then
through the runner on a tiny model: same per-layer thresholds as the full grid where screening is right."""

from __future__ import annotations

import math
import warnings

from conftest import tiny_spec
from crystallized_safety.experiments.conditions import HARMFUL, Condition, StudyPlan
from crystallized_safety.experiments.spec import parse_spec
from crystallized_safety.run.threshold_search import search_thresholds

ALPHAS = [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6]


class Scripted:
    """Screened rates by (layer, alpha), counting what was asked."""

    def __init__(self, rates: dict[tuple[int, float], float]) -> None:
        self.table, self.asked = rates, []

    def rates(self, conds):
        self.asked += [(c.layers[0], c.alpha) for c in conds]
        return {c.key: self.table[(c.layers[0], c.alpha)] for c in conds}

    def calibration(self) -> dict:
        return {"threshold": 0.0}


def run_search(screened, generated, controls=False, band=(0.1, 0.9)):
    spec = parse_spec(
        {
            "name": "t",
            "models": ["m"],
            "screening": {"enabled": True, "mode": "adaptive", "band": list(band)},
            "studies": [{"kind": "layer_sweep", "layers": [1, 2, 3, 4], "alphas": ALPHAS, "controls": controls}],
        }
    )
    plan = StudyPlan("layer_sweep", "layer_sweep")
    for layer in (1, 2, 3, 4):
        for a in ALPHAS:
            plan.add(Condition(HARMFUL, (layer,), a), layer=layer, alpha=a)
            if controls:
                plan.add(Condition(HARMFUL, (layer,), a, direction="random:0"), layer=layer, alpha=a, control="random")
    cells = {c.key: c for _t, c in plan.conditions if not c.ref.is_control}
    source = Scripted(screened)
    asked_to_generate: list[list[tuple]] = []

    def generate(conds):
        asked_to_generate.append([(c.layers[0], c.alpha, c.direction) for c in conds])

    def flip_rate(cond):
        return generated[(cond.layers[0], cond.alpha)]

    found = search_thresholds(spec, source, cells, [plan], generate, flip_rate, lambda *a, **k: None)
    return found, source, asked_to_generate, cells


def test_bisection_then_one_generated_cell_per_crossing_and_walks_where_generation_disagrees():
    screened, generated = {}, {}
    for i, a in enumerate(ALPHAS):
        screened[(1, a)] = [0.0, 0.1, 0.3, 0.6, 0.9, 1.0][i]  # crosses at -0.4; generation agrees
        generated[(1, a)] = [0.0, 0.0, 0.2, 0.7, 0.9, 1.0][i]
        screened[(2, a)] = [0.0, 0.2, 0.5, 0.8, 0.9, 1.0][i]  # screened crossing -0.3, generated only from -0.4
        generated[(2, a)] = [0.0, 0.1, 0.3, 0.55, 0.8, 0.9][i]
        screened[(3, a)] = [0.0, 0.0, 0.0, 0.01, 0.02, 0.05][i]  # far below: nothing generated
        generated[(3, a)] = 0.0
        screened[(4, a)] = [0.0, 0.05, 0.1, 0.2, 0.3, 0.35][i]  # below but in the band: strongest generated
        generated[(4, a)] = 0.3
    found, source, gens, cells = run_search(screened, generated)
    by_layer = {int(c["cells"][0].split()[0][1:]): c for c in found["curves"]}
    assert by_layer[1]["threshold_alpha"] == -0.4 and by_layer[2]["threshold_alpha"] == -0.4
    assert by_layer[3]["threshold_alpha"] is None and by_layer[4]["threshold_alpha"] is None
    # bisection: at most ceil(log2(6 + 1)) = 3 screened cells per curve, not 6
    per_curve = {layer: sum(1 for x in source.asked if x[0] == layer) for layer in (1, 2, 3, 4)}
    assert max(per_curve.values()) <= math.ceil(math.log2(len(ALPHAS) + 1)), per_curve
    assert len(set(source.asked)) == len(source.asked)  # nothing screened twice
    # generation: round 1 = layer 1 at -0.4, layer 2 at -0.3, layer 4 at -0.6; round 2 = layer 2 walks to -0.4
    assert [sorted(g) for g in gens] == [
        sorted([(1, -0.4, "extracted"), (2, -0.3, "extracted"), (4, -0.6, "extracted")]),
        [(2, -0.4, "extracted")],
    ]
    assert found["generated_cells"] == 4 and found["grid_cells"] == 24
    assert len(found["dropped"]) == 20


def test_controls_follow_their_cell_and_are_dropped_with_it():
    screened = {(layer, a): (1.0 if a <= -0.3 else 0.0) for layer in (1, 2, 3, 4) for a in ALPHAS}
    generated = dict(screened)
    found, _source, gens, cells = run_search(screened, generated, controls=True)
    assert sorted(gens[0]) == sorted([(layer, -0.3, d) for layer in (1, 2, 3, 4) for d in ("extracted", "random:0")])
    assert len(found["dropped"]) == 2 * (24 - 4)  # each ungenerated cell and its control


def test_adaptive_run_on_a_tiny_model_generates_less_and_finds_the_full_grids_thresholds(tiny_model_dirs, tmp_path):
    """Through the runner: the adaptive run's per-layer thresholds equal the full grid's wherever the full grid
    has one, within one grid step, with fewer generated tokens; its screening artifact says what it did."""
    from crystallized_safety.run.runner import run_experiment
    from crystallized_safety.store import Store

    studies = [{"kind": "layer_sweep", "layers": [1, 2, 3], "alphas": [-0.5, -1.0, -2.0, -4.0, -8.0]}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = parse_spec(tiny_spec(tiny_model_dirs[1], studies=studies, damage={"enabled": False}))
        adaptive = parse_spec(
            tiny_spec(
                tiny_model_dirs[1],
                studies=studies,
                damage={"enabled": False},
                screening={"enabled": True, "mode": "adaptive", "band": [0.0, 1.0]},
            )
        )
    out = {}
    for name, spec in (("full", full), ("adaptive", adaptive)):
        store = Store(tmp_path / f"{name}.sqlite")
        result = run_experiment(spec, store)
        sweep = next(a for a in store.analyses(result.run_id) if a["kind"] == "layer_sweep")["result"]
        tokens = sum(g["n_tokens"] for g in store.generations(result.run_id))
        out[name] = (sweep["layer_thresholds"], tokens, store.get_artifact(result.run_id, spec.models[0], "screening"))
    (full_th, full_tokens, _), (ad_th, ad_tokens, (art, _blob)) = out["full"], out["adaptive"]
    assert art["mode"] == "adaptive" and art["generated_cells"] < art["grid_cells"] == 15
    assert ad_tokens < full_tokens
    order = [-0.5, -1.0, -2.0, -4.0, -8.0]
    screened_ok = {
        str(c["cells"][0].split()[0][1:]): c for c in art["curves"]
    }  # what screening said, to tell a screening miss from a search bug
    for layer, alpha in full_th.items():
        if ad_th[layer] is not None:
            assert alpha is not None and abs(order.index(ad_th[layer]) - order.index(alpha)) <= 1, (
                layer,
                full_th,
                ad_th,
            )
        elif alpha is not None:  # the search missed a threshold: only where screening never reached it
            assert all(r is None or r < 0.5 for r in screened_ok[layer]["screened_flip"]), screened_ok[layer]
