"""`csafety run --dry-run` (issue 16, part 3): the cells, generations and tokens it announces are exactly what
the run then produces, an organism not yet built is estimated without being built, and nothing is written."""

from __future__ import annotations

import warnings

import yaml

from conftest import cli_ok, tiny_spec
from crystallized_safety.experiments.spec import load_prompt_sets, parse_spec
from crystallized_safety.run.estimate import estimate_spec
from crystallized_safety.store import Store


def test_dry_run_counts_equal_the_real_run(tiny_model_dirs, tiny_run):
    _root, paths = tiny_model_dirs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = parse_spec(tiny_spec(paths))
    (estimate,) = estimate_spec(spec)
    store_path, result = tiny_run
    store = Store(store_path, readonly=True)
    rows = store.generations(result.run_id, model=paths["tiny"])
    assert estimate.generations == len(rows) and estimate.generations == store.counts(result.run_id)["generations"]
    assert estimate.cells == len({r["condition_key"] for r in rows})
    assert estimate.new_tokens == len(rows) * spec.generation.max_new_tokens >= sum(r["n_tokens"] for r in rows)
    sets = load_prompt_sets(spec)
    assert estimate.extraction_prompts == len(sets.extract_harmful) + len(sets.extract_harmless)
    assert estimate.build_seconds == 0
    assert estimate.calibration_seconds > 0 and estimate.seconds > estimate.calibration_seconds


def test_dry_run_cli_writes_nothing(tiny_model_dirs, tmp_path):
    _root, paths = tiny_model_dirs
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(paths, studies=[{"kind": "layer_sweep", "layers": [1, 2],
                                                                "alphas": [-1.0]}])))  # fmt: skip
    res = cli_ok(["run", str(spec), "--store", str(tmp_path / "s.sqlite"), "--dry-run"])
    assert "dry run" in res.output and "total: about" in res.output
    # 2 baselines + 2 steered cells; 6 harmful + 6 harmless baseline rows + 2 x 6 steered rows; 5 tokens each
    assert "(cells=4 generations=24 new_tokens=120)" in res.stdout.strip().splitlines()[-1]
    assert not (tmp_path / "s.sqlite").exists()


def test_unbuilt_organism_is_estimated_without_building(monkeypatch, tmp_path):
    """With an empty cache the hardened organism (and the liquid one it starts from) is pending: the dry run
    calibrates on the base model and adds both builds' estimates."""
    from crystallized_safety import registry

    monkeypatch.setenv("CSAFETY_CACHE", str(tmp_path / "cache"))
    pending = registry.organism_pending("smollm2-135m-hardened")
    assert pending is not None and pending[0] == "smollm2-135m"
    assert registry.organism_pending("smollm2-135m") is None  # not an organism
    assert not (tmp_path / "cache" / "organisms").exists()


def test_dry_run_says_frontier_walks_are_upper_bounds(tiny_model_dirs, tmp_path):
    _root, paths = tiny_model_dirs
    studies = [{"kind": "frontier", "alphas": [-0.5, -1.0, -2.0], "rungs": ["add", "affine"]}]
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(paths, studies=studies)))
    res = cli_ok(["run", str(spec), "--store", str(tmp_path / "s.sqlite"), "--dry-run"])
    # the tiny model has 4 layers: band = layer 2; (3 add steps + 1 affine) x (cell + control) = 8 walk cells
    assert "upper bounds: 8 of the cells are frontier walks" in " ".join(res.stdout.split())
    assert "(cells=10 generations=" in res.stdout  # + 2 baselines
