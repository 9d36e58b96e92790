"""KL damage per cell through the runner (issue 15, part 2): every steered cell of every study carries its KL
to the unsteered model, equal to the meter run by hand on the stored answers; harmful and harmless cells of the
same intervention share one measurement; an interrupted measurement resumes without redoing what is stored;
exports and the report carry it."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

from conftest import tiny_spec
from crystallized_safety.core.model import Model
from crystallized_safety.experiments.conditions import HARMLESS, Condition, baseline, build_intervention
from crystallized_safety.experiments.results import DAMAGE_PREFIX, harmless_twin
from crystallized_safety.experiments.spec import parse_spec
from crystallized_safety.judges.divergence import DivergenceMeter
from crystallized_safety.registry import load_model
from crystallized_safety.run.runner import run_experiment
from crystallized_safety.run.worker import bank_from_bytes
from crystallized_safety.store import Store


def analysed_cells(store: Store, run_id: str) -> list[dict]:
    from crystallized_safety.report.collect import walk

    return [c for a in store.analyses(run_id) for c in walk(a["result"])]


def test_every_steered_cell_has_its_kl_and_it_equals_the_meter(tiny_run, tiny_model_dirs):
    path, result = tiny_run
    store = Store(path, readonly=True)
    model_name = tiny_model_dirs[1]["tiny"]
    cells = analysed_cells(store, result.run_id)
    steered = [c for c in cells if not c["condition"].startswith("baseline")]
    assert steered and all("kl" in c for c in steered), [c["condition"] for c in steered if "kl" not in c]
    assert all(c["kl"]["prompts"] == 6 and c["kl"]["kl_first"] >= 0 and c["kl"]["kl_answer"] >= 0 for c in steered)
    # the sign study runs the same intervention on both prompt sets: one measurement, stored once
    by_desc = {c["condition"]: c["kl"] for c in steered}
    assert by_desc["L2 a=1 rel add extracted (harmful)"] == by_desc["L2 a=1 rel add extracted (harmless)"]
    # recompute one cell by hand from the stored answers and direction bank
    rows = store.generations(result.run_id, model_name, baseline(HARMLESS).key, HARMLESS)
    model: Model = load_model(model_name)
    bank = bank_from_bytes(store.get_artifact(result.run_id, model_name, "directions")[1])
    cond = Condition("harmful", (1,), -1.0)
    meter = DivergenceMeter(model, [r["prompt"] for r in rows], [json.loads(r["token_ids"]) for r in rows])
    want = meter.measure([build_intervention(cond, bank)])[0]
    got = next(c["kl"] for c in steered if c["condition_key"] == cond.key)
    assert got["kl_first"] == pytest.approx(want.kl_first, rel=1e-9)
    assert got["kl_answer"] == pytest.approx(want.kl_answer, rel=1e-9)
    assert want.kl_answer > 0
    kinds = [k for k in store.artifact_kinds(result.run_id, model_name) if k.startswith(DAMAGE_PREFIX)]
    assert len(kinds) == len({harmless_twin(Condition(**json.loads(c))).key for c in _conditions(store, result)})


def _conditions(store: Store, result) -> set[str]:
    return {g["condition"] for g in store.generations(result.run_id) if json.loads(g["condition"])["layers"]}


def test_an_interrupted_damage_measurement_resumes_with_the_same_numbers(tiny_run, tiny_model_dirs, tmp_path):
    path, result = tiny_run
    copy = tmp_path / "results.sqlite"
    shutil.copy(path, copy)
    model_name = tiny_model_dirs[1]["tiny"]
    store = Store(copy)
    kinds = sorted(k for k in store.artifact_kinds(result.run_id, model_name) if k.startswith(DAMAGE_PREFIX))
    before = {k: store.get_artifact(result.run_id, model_name, k)[0] for k in kinds}
    lost = kinds[::2]
    with store.transaction() as db:
        for k in lost:
            db.execute("DELETE FROM artifacts WHERE run_id=? AND model=? AND kind=?", (result.run_id, model_name, k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = parse_spec(tiny_spec(tiny_model_dirs[1]))
    lines: list[str] = []
    again = run_experiment(
        spec, store, progress=lambda label, done, total, note="": lines.append(f"{label} {done}/{total}")
    )
    assert again.run_id == result.run_id and again.chunks_run == 0
    damage_lines = [x for x in lines if "KL damage" in x]
    assert damage_lines and damage_lines[-1].endswith(f"{len(kinds)}/{len(kinds)}")
    after = {k: store.get_artifact(result.run_id, model_name, k)[0] for k in kinds}
    for k in kinds:
        assert after[k]["kl_answer"] == pytest.approx(before[k]["kl_answer"], rel=1e-9, abs=1e-12)
        assert after[k]["kl_first"] == pytest.approx(before[k]["kl_first"], rel=1e-9, abs=1e-12)


def test_damage_can_be_switched_off_and_old_specs_keep_their_hash(tiny_model_dirs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on = parse_spec(tiny_spec(tiny_model_dirs[1]))
        also_on = parse_spec(tiny_spec(tiny_model_dirs[1], damage={"enabled": True, "prompts": 16}))
        off = parse_spec(tiny_spec(tiny_model_dirs[1], damage={"enabled": False}))
    assert on.spec_hash() == also_on.spec_hash() != off.spec_hash()


def test_the_report_shows_kl_per_cell_and_the_tradeoff_scatter(tiny_run, tmp_path):
    from crystallized_safety.report import build_report
    from crystallized_safety.report.tables import kl_text

    path, result = tiny_run
    paths = build_report(path, tmp_path / "report")
    md = paths.markdown.read_text()
    store = Store(path, readonly=True)
    sweep = next(a for a in store.analyses(result.run_id) if a["kind"] == "layer_sweep")["result"]
    cell = sweep["cells"][0]
    assert "KL first / answer (nats)" in md and kl_text(cell) in md and kl_text(cell) != "—"
    assert list((tmp_path / "report").glob("fig-*tradeoff.png"))
    exported = json.loads(store.export(result.run_id, "json"))
    walked = [c for a in exported["analyses"] for c in _walk(a["result"]) if c.get("kl")]
    assert walked and walked[0]["kl"]["prompts"] == 6


def _walk(obj):
    from crystallized_safety.report.collect import walk

    return walk(obj)
