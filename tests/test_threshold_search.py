"""Adaptive threshold search (issue 16, part 2): bisection on screened rates finds each curve's first alpha at
the flip threshold with log2(alphas) screened cells; only that cell is generated (with its controls), and
generation that does not confirm it walks to stronger alphas. Checked on scripted rates (every branch), against
the full grid's per-layer thresholds (the analysis' own function) on random scripted curves, then through the
runner on a tiny random model, which refuses nothing: there both runs must report no threshold."""

from __future__ import annotations

import math
import random
import warnings

import pytest

from conftest import tiny_spec
from crystallized_safety.experiments.analysis import layer_thresholds
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


def full_grid_thresholds(generated: dict[tuple[int, float], float]) -> dict[str, float | None]:
    """What the full grid reports: the analysis' per-layer thresholds over every generated cell."""
    cells = [{"layer": layer, "alpha": a, "flip": {"rate": rate}} for (layer, a), rate in generated.items()]
    return layer_thresholds(cells, 0.5)


@pytest.mark.parametrize("shift", [0, 1, -1], ids=["screening-right", "screening-early", "screening-late"])
@pytest.mark.parametrize("seed", range(6))
def test_adaptive_search_finds_the_full_grids_thresholds(seed, shift):
    """Random rising flip curves (layers 1-3 cross the 0.5 flip threshold somewhere on the grid, layer 4 never):
    the adaptive search finds exactly the full grid's threshold where screening is right or crosses early (it
    walks to stronger alphas), within one grid step where screening crosses one step late, and none on layer 4."""
    rng = random.Random(seed)
    generated, screened = {}, {}
    for layer in (1, 2, 3, 4):
        cross = rng.randrange(len(ALPHAS)) if layer < 4 else len(ALPHAS)  # first alpha at or above 0.5
        low = sorted(rng.uniform(0.1, 0.45) for _ in range(cross))  # in the screening band
        high = sorted(rng.uniform(0.55, 1.0) for _ in range(len(ALPHAS) - cross))
        rates = low + high
        for i, a in enumerate(ALPHAS):
            generated[(layer, a)] = rates[i]
            screened[(layer, a)] = rates[min(max(i + shift, 0), len(ALPHAS) - 1)]
    full = full_grid_thresholds(generated)
    assert [full[str(layer)] is not None for layer in (1, 2, 3, 4)] == [True, True, True, False], full
    found, _source, _gens, _cells = run_search(screened, generated)
    adaptive = {c["cells"][0].split()[0][1:]: c["threshold_alpha"] for c in found["curves"]}
    assert adaptive["4"] is None
    for layer in ("1", "2", "3"):
        assert adaptive[layer] is not None, (layer, full, adaptive)
        steps = ALPHAS.index(adaptive[layer]) - ALPHAS.index(full[layer])  # > 0: the adaptive one is stronger
        assert steps in ((0, 1) if shift < 0 else (0,)), (layer, full, adaptive)


def test_adaptive_run_on_a_tiny_model_generates_less_and_agrees_with_the_full_grid(tiny_model_dirs, tmp_path):
    """Through the runner on the tiny random model: it refuses no harmful prompt (its text is random bytes), so
    there is no flip to measure: the full grid finds no threshold on any layer, and the adaptive run, which must
    agree, screens no rate, generates no steered cell and so far fewer tokens; its screening artifact says so.
    (Found thresholds are compared with the full grid's on scripted curves above.)"""
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
        rows = store.generations(result.run_id)
        refused = sum(1 for g in rows if g["prompt_set"] == "harmful" and g["refusal"])
        tokens = sum(g["n_tokens"] for g in rows)
        artifact = store.get_artifact(result.run_id, spec.models[0], "screening")
        out[name] = (sweep["layer_thresholds"], tokens, refused, artifact)
    (full_th, full_tokens, full_refused, _), (ad_th, ad_tokens, _, (art, _blob)) = out["full"], out["adaptive"]
    assert full_refused == 0  # nothing to flip: why no threshold exists here
    assert full_th == ad_th == {"1": None, "2": None, "3": None}
    assert art["mode"] == "adaptive" and art["grid_cells"] == 15 and art["generated_cells"] == 0
    assert len(art["curves"]) == 3 and all(set(c["screened_flip"]) == {None} for c in art["curves"])
    assert all(c["threshold_alpha"] is None and not any(c["generated"]) for c in art["curves"])
    assert ad_tokens < full_tokens
