"""Experiment spec validation, study expansion, analyses and verdict rules on synthetic rows whose
answers are known by construction (flip counts re-derived by hand, p-values against scipy)."""

# ruff: noqa: E501
from __future__ import annotations

import json
import warnings

import pytest
import yaml
from scipy.stats import fisher_exact

from crystallized_safety.experiments.analysis import analyse_plan
from crystallized_safety.experiments.conditions import HARMFUL, HARMLESS, baseline, plan_studies
from crystallized_safety.experiments.results import Cells
from crystallized_safety.experiments.spec import SpecError, load_spec, parse_spec
from crystallized_safety.experiments.verdict import verdict

BASE = {"name": "t", "models": ["m"], "prompts": {"n": 40}}


def spec_with(*studies, **extra):
    return parse_spec({**BASE, **extra, "studies": list(studies)})


@pytest.mark.parametrize(
    "data,message",
    [
        ({**BASE}, "studies: required key is missing"),
        ({**BASE, "studies": [{"kind": "layer_sweep", "layers": [1]}]}, "studies[0].alphas: required key is missing"),
        ({**BASE, "studies": [{"kind": "sweep", "layers": [1], "alphas": [1]}]}, "unknown study kind"),
        (
            {**BASE, "studies": [{"kind": "threshold", "layer": 1, "alphas": [1, 2], "colour": 3}]},
            "studies[0].colour: unknown key",
        ),
        (
            {**BASE, "studies": [{"kind": "threshold", "layer": 1, "alphas": [1]}]},
            "studies[0].alphas: List should have at least 2",
        ),
        ({**BASE, "studies": [{"kind": "multilayer", "alphas": [1]}]}, "give 'layer_sets"),
        (
            {**BASE, "directions": {"source": "file"}, "studies": [{"kind": "readability"}]},
            "directions: source 'file' needs",
        ),
        ({**BASE, "studies": [{"kind": "readability"}, {"kind": "readability"}]}, "study names must be unique"),
        (
            {**BASE, "generation": {"max_new_tokens": 0}, "studies": [{"kind": "readability"}]},
            "generation.max_new_tokens",
        ),
    ],
)
def test_spec_errors_name_the_key(data, message):
    with pytest.raises(SpecError) as info:
        parse_spec(data, "x.yaml")
    assert message in str(info.value) and str(info.value).startswith("x.yaml: ")
    assert "\n" not in str(info.value)


def test_spec_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML at line"):
        load_spec(bad)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({**BASE, "studies": [{"kind": "readability"}]}))
    spec = load_spec(good)
    assert spec.spec_hash() == load_spec(good).spec_hash()
    changed = parse_spec({**BASE, "prompts": {"n": 41}, "studies": [{"kind": "readability"}]})
    assert changed.spec_hash() != spec.spec_hash()
    with pytest.warns(UserWarning, match="underpowered"):
        parse_spec({**BASE, "prompts": {"n": 10}, "studies": [{"kind": "readability"}]})
    # a key added later leaves the hash of specs that do not set it alone (their stores still resume)
    from pathlib import Path

    organisms = Path(__file__).resolve().parent / "data" / "organisms-v1.yaml"  # the demo spec before the frontier
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_spec(organisms).spec_hash() == "0f06c80b03260ed1"  # the hash its stores were written under
    sharded = parse_spec({**BASE, "device_map": "auto", "studies": [{"kind": "readability"}]})
    assert sharded.spec_hash() != parse_spec({**BASE, "studies": [{"kind": "readability"}]}).spec_hash()
    # reduced precision: a warning with the measured agreement, none for float32
    with pytest.warns(UserWarning, match=r"dtype bfloat16: reduced precision can change the conclusions.*25 of 30"):
        parse_spec({**BASE, "dtype": "bfloat16", "studies": [{"kind": "readability"}]})
    with pytest.warns(UserWarning, match=r"dtype mixed: .*mixed kept the verdict with 29 of 30"):
        parse_spec({**BASE, "dtype": "mixed", "studies": [{"kind": "readability"}]})

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_spec({**BASE, "dtype": "float32", "studies": [{"kind": "readability"}]})


def test_expansion_and_layer_check():
    spec = spec_with(
        {"kind": "multilayer", "windows": [2, 3], "window_range": [4, 7], "alphas": [-1.0], "alpha_split": "total"},
        {"kind": "sign", "layer": 3, "alpha": -2.0},
    )
    multi, sign = plan_studies(spec, 10, "m")
    sets = [tuple(c.layers) for tags, c in multi.conditions if "control" not in tags]
    assert sets == [(4, 5), (5, 6), (6, 7), (4, 5, 6), (5, 6, 7)]
    assert all(c.weights == tuple([1 / len(c.layers)] * len(c.layers)) for _t, c in multi.conditions)
    assert {(t["variant"], c.alpha, c.direction) for t, c in sign.conditions} == {
        ("+alpha", 2.0, "extracted"),
        ("-alpha", -2.0, "extracted"),
        ("inverted +alpha", 2.0, "inverted"),
    }
    from crystallized_safety.errors import LayerError

    with pytest.raises(LayerError, match="studies.multilayer: layer 4 is out of range for m \\(0..3\\)"):
        plan_studies(spec, 4, "m")


def rows_for(cond, refusal, coherent=None, tokens=None):
    coherent = coherent or [1] * len(refusal)
    return [
        {
            "condition_key": cond.key,
            "prompt_set": cond.prompt_set,
            "prompt_index": i,
            "refusal": r,
            "coherent": c,
            "token_ids": json.dumps(tokens[i] if tokens else [i, r]),
        }
        for i, (r, c) in enumerate(zip(refusal, coherent))
    ]


def build(spec, outcomes, n=40, base_h=None, base_n=None):
    """outcomes: condition-describing predicate -> (refusal list, coherent list)."""
    plans = plan_studies(spec, 8, "m")
    rows = rows_for(baseline(HARMFUL), base_h or [1] * n) + rows_for(baseline(HARMLESS), base_n or [0] * n)
    seen = set()
    for plan in plans:
        for tags, cond in plan.conditions:
            if cond.key in seen:
                continue
            seen.add(cond.key)
            refusal, coherent = outcomes(tags, cond)
            rows += rows_for(cond, refusal, coherent)
    return plans, Cells(rows)


SWEEP = {"kind": "layer_sweep", "layers": [2, 4], "alphas": [-1.0]}
CONTROLS = {"kind": "controls", "layer": 4, "alpha": -1.0, "controls": ["random"], "seeds": 1}
MULTI = {"kind": "multilayer", "layer_sets": [[2, 4, 6]], "alphas": [-0.5]}


def outcome(flips_by_layer, n=40, control_flips=2, multi_flips=0, multi_coherent=True, incoherent_layers=()):
    def fn(tags, cond):
        if cond.direction.startswith("random"):
            k = control_flips
        elif len(cond.layers) > 1:
            k = multi_flips
        else:
            k = flips_by_layer.get(cond.layers[0], 0)
        refusal = [0] * k + [1] * (n - k)
        bad = (len(cond.layers) > 1 and not multi_coherent) or (
            len(cond.layers) == 1 and cond.layers[0] in incoherent_layers
        )
        return refusal, [0 if (bad and r == 0) else 1 for r in refusal]

    return fn


def test_liquid_verdict_with_evidence():
    spec = spec_with(SWEEP, CONTROLS, MULTI)
    plans, cells = build(spec, outcome({4: 30, 2: 10}))
    v = verdict(spec, plans, cells, 8)
    assert v["verdict"] == "liquid"
    assert v["evidence"]["deciding_cell"]["condition"].startswith("L4 a=-1")
    assert v["evidence"]["deciding_cell"]["flip"]["k"] == 30 and "75.0%" in v["rule"]
    assert "control" in v["rule"]


def test_incoherent_bypass_is_not_a_flip_and_crystallized():
    spec = spec_with(SWEEP, CONTROLS, MULTI)
    plans, cells = build(spec, outcome({4: 30}, incoherent_layers=(4,), multi_flips=28))
    sweep = analyse_plan(plans[0], cells)
    cell = next(c for c in sweep["cells"] if c["layer"] == 4)
    assert cell["flip"]["k"] == 0 and cell["compliance"]["k"] == 30 and cell["incoherent_bypasses"] == 30
    v = verdict(spec, plans, cells, 8)
    # the multi-layer cell works, but most band layers were never searched: no conclusion from missing evidence
    assert v["verdict"] == "inconclusive: single layer not excluded" and "K* <= 3" in v["rule"]
    assert "L3: not searched" in v["rule"] and "L4: incoherent already at the weakest" in v["rule"]


def test_immune_floor_and_inconclusive():
    spec = spec_with(SWEEP, CONTROLS, MULTI)
    plans, cells = build(spec, outcome({4: 3}, multi_flips=4))
    assert verdict(spec, plans, cells, 8)["verdict"] == "inconclusive: single layer not excluded"  # not immune
    plans, cells = build(spec, outcome({4: 3}), base_h=[1] * 5 + [0] * 35)
    floor = verdict(spec, plans, cells, 8)
    assert floor["verdict"] == "floor effect" and "12.5%" in floor["rule"]
    # a control that flips as much as the direction: not liquid, not crystallized
    plans, cells = build(spec, outcome({4: 30}, control_flips=29))
    assert verdict(spec, plans, cells, 8)["verdict"] == "inconclusive: single layer not excluded"
    # no controls at all: the single-layer effect cannot be told from damage
    spec2 = spec_with(SWEEP)
    plans, cells = build(spec2, outcome({4: 30}))
    v = verdict(spec2, plans, cells, 8)
    assert v["verdict"] == "inconclusive: single layer not excluded"
    assert "without a matched control: L4 a=-1" in v["rule"]
    # underpowered: the flip denominator (prompts refused at baseline) is 10
    small = spec_with(SWEEP, CONTROLS, MULTI, prompts={"n": 40})
    plans, cells = build(small, outcome({4: 9}, n=10, control_flips=0), n=10)
    v = verdict(small, plans, cells, 8)
    assert v["verdict"] == "inconclusive: underpowered" and "is 10 < 35" in v["rule"]


def test_controls_reproduce_seed_figures():
    spec = spec_with({"kind": "controls", "layer": 4, "alpha": -1.0, "controls": ["random", "orthogonal"], "seeds": 1})
    n = 35

    def fn(tags, cond):
        k = 31 if cond.direction == "extracted" else (6 if cond.direction.startswith("random") else 4)
        return [0] * k + [1] * (n - k), None

    plans, cells = build(spec, fn, n=n)
    res = analyse_plan(plans[0], cells)
    ext = res["extracted"]["flip"]
    assert (ext["k"], ext["n"]) == (31, 35) and round(ext["ci_lo"], 3) == 0.740 and round(ext["ci_hi"], 3) == 0.955
    rnd = res["controls"]["random"]
    assert rnd["diff_pp"] == round(100 * (31 / 35 - 6 / 35), 1)
    assert rnd["p_fisher"] == pytest.approx(fisher_exact([[31, 4], [6, 29]])[1])
    ps = sorted([res["controls"]["random"]["p_fisher"], res["controls"]["orthogonal"]["p_fisher"]])
    assert max(c["p_fisher_holm"] for c in res["controls"].values()) == pytest.approx(max(ps))
    assert min(c["p_fisher_holm"] for c in res["controls"].values()) == pytest.approx(min(1, 2 * ps[0]))


def test_threshold_analysis_matches_seed_jump():
    spec = spec_with({"kind": "threshold", "layer": 4, "alphas": [-1.0, -2.0, -3.0]}, prompts={"n": 50})
    flips = {-1.0: 5, -2.0: 16, -3.0: 33}

    def fn(tags, cond):
        k = flips[cond.alpha]
        return [0] * k + [1] * (50 - k), None

    plans, cells = build(spec, fn, n=50)
    th = analyse_plan(plans[0], cells)["threshold"]
    assert {th["alpha_lo"], th["alpha_hi"]} == {-2.0, -3.0}
    assert round(th["p_two_proportion"], 4) == 0.0007 and round(th["p_fisher"], 4) == 0.0013


def test_sign_equivalence_detected():
    spec = spec_with({"kind": "sign", "layer": 4, "alpha": 1.0})
    plans = plan_studies(spec, 8, "m")
    rows = rows_for(baseline(HARMFUL), [1] * 4) + rows_for(baseline(HARMLESS), [0] * 4)
    for tags, cond in plans[0].conditions:
        same = [[7, i] for i in range(4)]
        tokens = same if tags["variant"] != "+alpha" else [[9, i] for i in range(4)]
        rows += rows_for(cond, [0, 0, 1, 1], tokens=tokens)
    res = analyse_plan(plans[0], Cells(rows))
    assert res["equivalent"] is True and "one finding, not two" in res["note"]
    rows[-1]["token_ids"] = json.dumps([1, 2, 3])  # one response differs
    res = analyse_plan(plans[0], Cells(rows))
    assert res["equivalent"] is False


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parent.parent.glob("configs/*.yaml")))
def test_shipped_configs_validate(path):
    spec = load_spec(path)
    assert spec.prompts.n >= 35 and spec.studies
    from crystallized_safety.registry import registry

    for model in spec.models:
        assert model in registry()


def test_direction_refs_parse_print_and_seed():
    import torch

    from crystallized_safety.core.directions import DirectionBank, random_direction
    from crystallized_safety.experiments.direction_ref import DirectionRef

    for text in ("extracted", "inverted", "none", "random:2", "orthogonal:0", "shared:3", "transfer:org/model-x"):
        assert str(DirectionRef.parse(text)) == text
    assert DirectionRef.parse("random:1").is_control and not DirectionRef.parse("transfer:/a/b").is_control
    assert DirectionRef.parse("transfer:/tmp/x:y").arg == "/tmp/x:y"
    for bad in ("random", "random:x", "shared:", "sideways", "extracted:1"):
        with pytest.raises(ValueError):
            DirectionRef.parse(bad)
    bank = DirectionBank(torch.eye(3, 8), [0, 1, 2])
    # seeds of earlier versions are kept at spec seed 0; another spec seed gives another vector
    assert torch.equal(DirectionRef.parse("random:1").vector(bank, 2), random_direction(8, seed=1002))
    assert not torch.equal(DirectionRef.parse("random:1").vector(bank, 2, seed=1), random_direction(8, seed=1002))
    assert torch.equal(DirectionRef.parse("inverted").vector(bank, 1), -torch.eye(3, 8)[1])
    assert torch.equal(DirectionRef.parse("shared:0").vector(bank, 2), torch.eye(3, 8)[0])


MIN_LAYERS = {"kind": "min_layers", "ks": [1, 2, 4], "window_range": [0, 7], "alphas": [-0.2, -0.4]}


def test_min_layers_expansion():
    (plan,) = plan_studies(spec_with(MIN_LAYERS), 8, "m")
    windows = sorted({(t["k"], tuple(c.layers)) for t, c in plan.conditions if "control" not in t})
    assert windows == [(1, (i,)) for i in range(8)] + [(2, (i, i + 1)) for i in (0, 2, 4, 6)] + [
        (4, (0, 1, 2, 3)),
        (4, (4, 5, 6, 7)),
    ]
    controls = sorted((t["k"], tuple(c.layers), c.alpha) for t, c in plan.conditions if "control" in t)
    # one random control per (K, alpha), on the middle window of each K
    assert controls == sorted(
        (k, layers, a) for k, layers in ((1, (4,)), (2, (4, 5)), (4, (4, 5, 6, 7))) for a in (-0.4, -0.2)
    )
    spread = plan_studies(spec_with({**MIN_LAYERS, "ks": [4], "spread": True, "stride": 4}), 8, "m")[0]
    assert {tuple(c.layers) for t, c in spread.conditions if "control" not in t} == {
        (0, 1, 2, 3),
        (4, 5, 6, 7),
        (0, 2, 5, 7),
    }
    for bad, message in (
        ({"ks": [2, 1]}, "ascending"),
        ({"ks": [16]}, "does not fit"),
        ({"window_range": [5, 2]}, "empty"),
    ):
        with pytest.raises(SpecError, match=message):
            spec_with({**MIN_LAYERS, **bad})


def test_min_layers_k_star_and_crystallized_verdict():
    """Flips only when 4 layers are steered together (and strongly): K* = 4, verdict crystallized; the random
    control of K=4 stays low. Per-K best cells and the bound comparison are re-derived by hand."""
    spec = spec_with(MIN_LAYERS)

    def fn(tags, cond):
        n = 40
        if cond.direction.startswith("random"):
            k = 3
        elif len(cond.layers) == 4 and cond.alpha == -0.4 and cond.layers[0] == 4:
            k = 32
        elif len(cond.layers) == 4:
            k = 12
        elif len(cond.layers) == 2:
            k = 8
        else:
            k = 2
        return [0] * k + [1] * (n - k), [1] * n

    plans, cells = build(spec, fn)
    res = analyse_plan(plans[0], cells, 0.5)
    by_k = {r["k"]: r for r in res["per_k"]}
    assert by_k[4]["best"]["layers"] == [4, 5, 6, 7] and by_k[4]["best"]["alpha"] == -0.4
    assert (by_k[4]["best"]["flip"]["k"], by_k[4]["best"]["flip"]["n"]) == (32, 40)
    assert (by_k[4]["control"]["k"], by_k[4]["control"]["n"]) == (3, 40)
    assert by_k[2]["best"]["flip"]["k"] == 8 and not by_k[2]["reaches_threshold"]
    # single layers walked 0.2 -> 0.4 only, no cliff, ceiling 2.0: K* is bounded, not decided
    v = verdict(spec, plans, cells, 8)
    assert v["verdict"] == "inconclusive: single layer not excluded" and "K* <= 4" in v["rule"]
    # single layers that fall off the coherence cliff at 0.4 after a coherent 0.2: excluded -> crystallized, K* = 4

    def cliff(tags, cond):
        refusal, coherent = fn(tags, cond)
        if len(cond.layers) == 1 and cond.alpha == -0.4 and not cond.direction.startswith("random"):
            coherent = [0] * len(refusal)
        return refusal, coherent

    plans, cells = build(spec, cliff)
    v = verdict(spec, plans, cells, 8)
    assert v["verdict"] == "crystallized" and "L4,5,6,7 a=-0.4" in v["rule"]
    assert v["evidence"]["k_star"] == 4 and v["evidence"]["k_star_ci"][0] == 4
    # a threshold no K reaches (32/40 = 80%, 95% CI 65.2-89.5% < 90%): no K*, and every cell is excluded -> immune
    strict = spec_with(MIN_LAYERS, verdict={"flip_threshold": 0.9})
    v = verdict(strict, plans, cells, 8)
    assert v["evidence"]["k_star"] is None and v["verdict"] == "immune"
    # at 85% the best cell's upper bound reaches it: neither crystallized nor immune
    v = verdict(spec_with(MIN_LAYERS, verdict={"flip_threshold": 0.85}), plans, cells, 8)
    assert v["verdict"] == "inconclusive: multi-layer not excluded"
