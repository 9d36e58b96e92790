"""`csafety rejudge`: a stored run re-judged under the coherence gate v2 (relevance) into a copy, without generating:
the copy carries the new spec's run id, relevance is measured on exactly the answers the v1 gate passed (values
equal to the gate's own computation from scratch), those below the floor turn incoherent and nothing else
changes; resuming the copy with the new spec generates nothing for a non-adaptive spec and decides; every bad
input is one line."""

from __future__ import annotations

import shutil
import warnings

import pytest
from typer.testing import CliRunner

from conftest import tiny_spec
from crystallized_safety.cli import app
from crystallized_safety.experiments.rejudge import rejudge_run
from crystallized_safety.experiments.spec import SpecError, parse_spec
from crystallized_safety.judges.coherence import CoherenceGate
from crystallized_safety.registry import load_model
from crystallized_safety.report.build import build_report
from crystallized_safety.run.runner import run_experiment
from crystallized_safety.store import Store

pytestmark = pytest.mark.filterwarnings("ignore:.*underpowered")
STUDIES = [{"kind": "layer_sweep", "layers": [1, 2], "alphas": [-0.5, -1.0], "controls": True}]


def spec_of(paths, **coherence):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = tiny_spec(paths, studies=STUDIES)
        data["coherence"] = {**data["coherence"], **coherence}
        return parse_spec(data, "test")


@pytest.fixture(scope="module")
def v1_run(tiny_model_dirs, tmp_path_factory):
    _root, paths = tiny_model_dirs
    spec = spec_of(paths)
    path = tmp_path_factory.mktemp("rejudge") / "v1.sqlite"
    store = Store(path)
    run_id = run_experiment(spec, store).run_id
    store.close()
    return paths, path, run_id


def rows(store, run_id):
    return {(r["condition_key"], r["prompt_set"], r["prompt_index"]): r for r in store.generations(run_id)}


@pytest.mark.parametrize("floor", [-100.0, 0.0])
def test_rejudged_copy_measures_v1_answers_and_resumes(v1_run, tmp_path, floor):
    paths, path, run_id = v1_run
    old = Store(path, readonly=True)
    before = rows(old, run_id)
    spec = spec_of(paths, min_relevance=floor)
    copy, report = rejudge_run(old, run_id, spec, tmp_path / "v2.sqlite", load_model)
    new_id = spec.spec_hash()
    assert new_id != run_id and [r.run_id for r in copy.runs()] == [new_id]
    assert copy.run().status == "interrupted" and copy.verdicts(new_id) == []
    after = rows(copy, new_id)
    assert after.keys() == before.keys()
    answers = [k for k, r in before.items() if r["refusal"] == 0 and r["coherent"] == 1]
    assert answers and report[spec.models[0]].rows == len(answers)
    # relevance from scratch (both contexts recomputed), against the values the re-judge stored
    gate = CoherenceGate(load_model(spec.models[0]))
    fresh = gate.relevances([before[k]["prompt"] for k in answers], [before[k]["response"] for k in answers])
    assert [after[k]["relevance"] for k in answers] == pytest.approx(fresh, rel=1e-4, abs=1e-5)
    assert all(after[k]["coherent"] == int(after[k]["relevance"] >= floor) for k in answers)
    off = sum(after[k]["coherent"] == 0 for k in answers)
    assert report[spec.models[0]].changed == {"coherent": off}
    assert off == (0 if floor == -100.0 else sum(v < 0.0 for v in fresh))
    for k in before.keys() - set(answers):  # every other label stands, unmeasured
        assert (after[k]["coherent"], after[k]["refusal"], after[k]["relevance"]) == (
            before[k]["coherent"],
            before[k]["refusal"],
            None,
        )
    thresholds = copy.get_artifact(new_id, spec.models[0], "coherence")[0]
    assert thresholds["min_relevance"] == floor
    result = run_experiment(spec, copy)  # the resume: nothing to generate, then the verdict
    assert (result.run_id, result.resumed, result.chunks_run) == (new_id, True, 0)
    assert [v["model"] for v in copy.verdicts(new_id)] == spec.models
    record = copy.get_artifact(new_id, spec.models[0], "rejudged")[0]
    assert record == {
        "from_run": run_id,
        "changed": {"coherence.min_relevance": [None, floor]},
        "measured": len(answers),
        "off_topic": off,
    }
    copy.close()
    old.close()
    md = (build_report(tmp_path / "v2.sqlite", tmp_path / "report").markdown).read_text()
    assert f"coherence gate on (v2, answers relevant >= {floor:g} nats/token)" in md
    assert f"Re-judged after generation: run {run_id} was generated and labelled under the coherence gate v1" in md
    assert f"{len(answers)} answers measured, {off} now off-topic" in md


def test_rejudge_refuses_what_it_cannot_do(v1_run, tmp_path):
    paths, path, run_id = v1_run
    old = Store(path, readonly=True)
    keys = "coherence.min_relevance, verdict.confirm_by, verdict.reference"
    with pytest.raises(SpecError, match=f"only {keys} can change"):
        changed = spec_of(paths, min_relevance=0.5).model_dump(mode="json")
        changed["prompts"]["n"] = 5
        rejudge_run(old, run_id, parse_spec(changed, "x"), tmp_path / "a.sqlite", load_model)
    with pytest.raises(SpecError, match="the new one a min_relevance"):
        rejudge_run(old, run_id, spec_of(paths), tmp_path / "b.sqlite", load_model)
    assert not (tmp_path / "a.sqlite").exists() and not (tmp_path / "b.sqlite").exists()
    old.close()


def test_rejudge_cli(v1_run, tmp_path):
    import yaml

    paths, path, _run_id = v1_run
    shutil.copy(path, tmp_path / "v1.sqlite")
    spec_file = tmp_path / "v2.yaml"
    spec_file.write_text(yaml.safe_dump(spec_of(paths, min_relevance=0.5).model_dump(mode="json")))
    out = tmp_path / "v2.sqlite"
    args = ["rejudge", "--store", str(tmp_path / "v1.sqlite"), "--spec", str(spec_file), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "answers measured" in result.output and f"csafety run {spec_file} --store {out}" in result.output
    again = CliRunner().invoke(app, args)  # the copy exists: one line, nothing overwritten
    errors = [line for line in again.output.splitlines() if line.startswith("error:")]
    assert again.exit_code != 0 and len(errors) == 1 and "exists: pass a new path" in errors[0]
