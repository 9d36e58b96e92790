"""The frontier walk (run/frontier.py): single layers walked weakest first to the coherence cliff, controls only
for cells at the threshold, nothing generated beyond the cliff; and end to end on a tiny model, with resume."""

from __future__ import annotations

import json
import shutil
import warnings

from conftest import tiny_spec
from crystallized_safety.experiments.conditions import HARMFUL, HARMLESS, baseline, plan_studies
from crystallized_safety.experiments.results import DAMAGE_PREFIX, Cells, harmless_twin
from crystallized_safety.experiments.spec import parse_spec
from crystallized_safety.progress import silent
from crystallized_safety.run.chunks import Chunk
from crystallized_safety.run.frontier import walk
from crystallized_safety.run.runner import run_experiment
from crystallized_safety.store import Store

N = 40


class FakeGenerator:
    """Rows by rule: coherent below |alpha| 1.0 (the cliff), 30/40 flips at layer 4, 2/40 elsewhere and for controls."""

    class Ctx:
        model_name = "m"

    ctx = Ctx()

    def __init__(self) -> None:
        self.generated: list = []
        self.rows = self._rows(baseline(HARMFUL), 0, 1) + self._rows(baseline(HARMLESS), 0, 1)

    @staticmethod
    def _rows(cond, flips, coherent):
        return [
            {"condition_key": cond.key, "prompt_set": cond.prompt_set, "prompt_index": i,
             "refusal": 0 if (i < flips or cond.prompt_set == HARMLESS and cond.is_baseline) else 1,
             "coherent": coherent, "token_ids": json.dumps([i])}
            for i in range(N)
        ]  # fmt: skip

    def __call__(self, conds, pack_rows=None, progress=None) -> None:
        if progress is not None:  # one "pack" per condition, as the real generator reports stored packs
            progress(0, len(conds))
        for c in conds:
            self.generated.append(c)
            flips = 2 if c.ref.is_control or c.layers != (4,) else 30
            self.rows += self._rows(c, flips, 0 if abs(c.alpha) >= 1.0 and c.mode == "add" else 1)
            if progress is not None:
                progress(len(self.generated), len(conds))

    def cells(self) -> Cells:
        return Cells(self.rows)


def test_walk_stops_at_the_cliff_and_controls_only_cells_at_the_threshold():
    spec = parse_spec(
        {
            "name": "t",
            "models": ["m"],
            "prompts": {"n": N},
            "verdict": {"band": [3, 5]},
            "studies": [{"kind": "frontier", "alphas": [-0.25, -0.5, -1.0, -1.5, -2.0], "rungs": ["add", "affine"]}],
        }
    )
    plans = plan_studies(spec, 8, "m")
    chunks = [Chunk("m", "frontier", c, 0, ("p",), 5) for _t, c in plans[0].conditions]
    gen = FakeGenerator()
    said: list[tuple] = []
    kept = walk(spec, plans, chunks, gen, lambda *a: said.append(a))
    # each step of the walk is a phase of its own whose steps are the packs stored: a log line with an ETA
    # while a step of many cells runs, not only between steps
    first = [a for a in said if a[0] == "m: frontier walk, step 1 of at most 5 (6 cells), packs"]
    assert [a[1:] for a in first] == [(0, 6)] + [(k, 6) for k in range(1, 7)]
    add = sorted((c.layers[0], c.alpha) for c in gen.generated if c.mode == "add" and not c.ref.is_control)
    # every layer walked -0.25, -0.5, then -1.0 (the cliff, generated as its evidence), nothing stronger
    assert add == sorted((layer, a) for layer in (3, 4, 5) for a in (-0.25, -0.5, -1.0))
    controls = [c for c in gen.generated if c.ref.is_control]
    # layer 4 flips 30/40 while coherent (-0.25, -0.5, and its affine cell): the first control (ties broken by the
    # smallest |alpha|: the affine cell; 30/40 vs 2/40, p ~ 1e-3 < 0.05 / 18 planned cells) already makes the
    # model liquid: no other is run
    assert [(c.layers, c.mode, c.alpha) for c in controls] == [((4,), "affine", 0.0)]
    generated = {c.key for c in gen.generated}
    assert {c.condition.key for c in kept} == generated  # beyond the cliff and unneeded controls are dropped
    # dropped: 6 add cells beyond the cliff, 15 add controls and 2 affine controls
    assert len(chunks) - len(kept) == 6 + 15 + 2
    # with the liquid call out of reach (a threshold of 90%), no control is run at all
    strict = parse_spec({**spec.model_dump(mode="json"), "verdict": {"band": [3, 5], "flip_threshold": 0.9}})
    gen = FakeGenerator()
    walk(strict, plan_studies(strict, 8, "m"), chunks, gen, silent)
    assert not [c for c in gen.generated if c.ref.is_control]


def test_frontier_runs_end_to_end_on_a_tiny_model_and_resumes(tiny_model_dirs, tmp_path):
    _root, paths = tiny_model_dirs
    studies = [
        {"kind": "frontier", "alphas": [-0.5, -1.0], "rungs": ["add", "affine", "subspace", "rotate"],
         "angles": [150.0, 180.0]},
        {"kind": "min_layers", "ks": [1, 2], "window_range": [1, 2], "alphas": [-0.5]},
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = parse_spec(tiny_spec(paths, n=6, studies=studies, verdict={"min_n": 1}))
    store = Store(tmp_path / "r.sqlite")
    first = run_experiment(spec, store)
    v = store.verdicts(first.run_id)[0]
    ev = v["evidence"]
    assert ev["rules"]["band"] == [2] and ev["rules"]["min_n"] == 1
    plans = plan_studies(spec, 4, paths["tiny"])
    first_steps = {c.key for t, c in plans[0].conditions if t["step"] == 0 and "control" not in t}
    assert len(first_steps) == 4  # one per rung, all at layer 2
    assert first_steps <= {r["condition_key"] for r in store.generations(first.run_id)}
    analyses = {a["study"]: a["result"] for a in store.analyses(first.run_id)}
    assert analyses["frontier"]["planned"] == 2 * (2 + 1 + 1 + 2)  # (cells + controls) x steps of every rung
    n_rows = len(store.generations(first.run_id))
    # KL damage only for interventions that were generated: the walk's unreached cells and ungenerated controls
    # have no rates for a KL to stand beside
    generated = {r["condition_key"] for r in store.generations(first.run_id)}
    steered = [c for p in plans for _t, c in p.conditions if not c.is_baseline]
    measured = {k.removeprefix(DAMAGE_PREFIX) for k in store.artifact_kinds(first.run_id, paths["tiny"])
                if k.startswith(DAMAGE_PREFIX)}  # fmt: skip
    want = {harmless_twin(c).key for c in steered if c.key in generated or harmless_twin(c).key in generated}
    assert measured == want and want < {harmless_twin(c).key for c in steered}
    store.close()
    shutil.copy(tmp_path / "r.sqlite", tmp_path / "again.sqlite")
    again = Store(tmp_path / "again.sqlite")
    second = run_experiment(spec, again)
    assert second.resumed and second.chunks_run == 0 and len(again.generations(second.run_id)) == n_rows
    assert again.verdicts(second.run_id)[0]["verdict"] == v["verdict"]
