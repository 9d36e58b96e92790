"""`csafety run --dry-run` (issue 16, part 3): the cells, generations and tokens it announces are exactly what
the run then produces, an organism not yet built is estimated without being built, and nothing is written."""

from __future__ import annotations

import warnings

import yaml

from conftest import cli_ok, make_tiny, tiny_spec
from crystallized_safety.experiments.prompt_sets import load_prompt_sets
from crystallized_safety.experiments.spec import parse_spec
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
    """With an empty cache the hardened organism (and the liquid one it starts from) is pending: `estimate_spec`
    calibrates on the base model and adds both builds' estimates, and builds nothing (building raises here; the
    base model is a tiny stand-in, the build estimates are stubbed to known values)."""
    from crystallized_safety import registry
    from crystallized_safety.organism import build
    from crystallized_safety.run import estimate as estimate_module

    monkeypatch.setenv("CSAFETY_CACHE", str(tmp_path / "cache"))
    hardened = registry.organism_pending("smollm2-135m-hardened")
    assert hardened is not None and hardened[0] == "smollm2-135m"
    liquid = registry.organism_pending(hardened[1].start)
    assert liquid is not None and liquid[0] == "smollm2-135m"
    assert registry.organism_pending("smollm2-135m") is None  # not an organism

    def no_build(*args, **kwargs):
        raise AssertionError("the dry run built an organism")

    loaded: list[str] = []

    def load_model(name, **kwargs):
        loaded.append(name)
        return make_tiny("llama")

    build_seconds = {hardened[1]: 1000.0, liquid[1]: 200.0}  # recipes are frozen dataclasses: keys by value
    estimated = []

    def estimate_build_seconds(model, recipe):
        estimated.append(recipe)
        return build_seconds[recipe]

    monkeypatch.setattr(build, "build_organism", no_build)
    monkeypatch.setattr(build, "ensure_organism", no_build)
    monkeypatch.setattr(build, "estimate_build_seconds", estimate_build_seconds)
    monkeypatch.setattr(estimate_module, "load_model", load_model)
    studies = [{"kind": "layer_sweep", "layers": [1, 2], "alphas": [-1.0]}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = parse_spec(tiny_spec({"tiny": "smollm2-135m-hardened"}, studies=studies))
    (result,) = estimate_spec(spec)
    assert loaded == ["smollm2-135m"]  # calibrated on the base model, never on the organism
    assert estimated == [hardened[1], liquid[1]] and result.build_seconds == 1200.0
    assert result.model == "smollm2-135m-hardened" and result.cells == 4 and result.generations == 24
    assert result.calibration_seconds > 0 and result.seconds > result.build_seconds
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


def test_a_build_estimate_for_an_attacking_recipe_adds_its_reextractions_and_screens(monkeypatch):
    """Every timed interval takes 1 s on a fake clock: a liquid recipe is one step x (steps + the other phases);
    a ladder recipe adds one re-extraction per `reextract_every` steps and one screen per `curriculum_every`
    steps, the screen timed on a sample of its cells and scaled to all of them."""
    import itertools
    import types

    from conftest import make_tiny
    from crystallized_safety.organism import build
    from crystallized_safety.organism.recipe import Recipe, hardened_recipe
    from crystallized_safety.prompts import bundled

    clock = itertools.count()
    monkeypatch.setattr(build, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    model = make_tiny("llama")
    n_harmful, n_harmless = len(bundled("harmful", "train")), len(bundled("harmless", "train"))
    liquid = Recipe()
    steps = -(-(n_harmful + 2 * n_harmless) // liquid.batch_size) * liquid.epochs
    assert build.estimate_build_seconds(model, liquid) == steps + build.OTHER_PHASES_IN_STEPS

    ladder = Recipe(**{**hardened_recipe(version="v5").__dict__, "attack_band": (1, 2)})  # 2 layers x 4 rungs
    steps = -(-(3 * n_harmful + 2 * n_harmless) // ladder.batch_size)
    refreshes, screens = -(-steps // 10), -(-steps // 10)
    want = steps + build.HARDENED_OTHER_PHASES_IN_STEPS + refreshes + screens  # 8 cells: each one screened
    assert build.estimate_build_seconds(model, ladder) == want
    wide = Recipe(**{**ladder.__dict__, "attack_band": (0, 3)})  # 16 cells: every second one screened, x 2
    assert build.estimate_build_seconds(model, wide) == want + screens
