"""results/interop.json, the record `make interop` writes (tests/interop/record.py): its tables are what its
figures render to (so the docs and README blocks rendered from it, checked by test_results_docs, carry the
measured numbers), its figures meet what the interop tests assert, and a new session's figures merge into it
without losing the tests that did not run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tests.interop import record

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "results" / "interop.json"


def test_the_committed_tables_are_what_the_figures_render_to():
    data = json.loads(RECORD.read_text())
    assert data["models"] == [{"model": "interop", "tables": record.tables(data["tests"], data["environments"])}]
    assert set(data["tests"]) == {record.LLAMA_CV, record.LLAMA_EDIT, record.REPENG, record.SV}


def test_the_committed_figures_meet_what_the_interop_tests_assert():
    tests = {k: v["figures"] for k, v in json.loads(RECORD.read_text())["tests"].items()}
    cv, edit, rp, sv = (tests[k] for k in (record.LLAMA_CV, record.LLAMA_EDIT, record.REPENG, record.SV))
    shares = [cv["plain"]["same_tokens"], cv["steered"]["same_tokens"], edit["same_tokens"], sv["steered_same_tokens"]]
    shares += [rp["repeng_vector_same_tokens"], rp["our_vector_same_tokens"]]
    assert all(0.9 <= share <= 1.0 for share in shares)
    diffs = [cv["plain"]["max_abs_logit_diff"], cv["steered"]["max_abs_logit_diff"], edit["max_abs_logit_diff"]]
    assert max(diffs) < 1e-3
    assert cv["refusals_of_harmful"]["steered"] < cv["refusals_of_harmful"]["plain"]
    assert sv["min_cosine"] >= 0.9999 and sv["max_abs_logit_diff_without_rope_keys"] > 0.1


def test_numbers_are_rendered_as_the_docs_write_them():
    assert record._sci(4.673004150390625e-05) == "4.7e-5"
    assert record._sci(0.00072) == "7.2e-4"
    assert record._of(1.0) == "24/24" and record._of(23 / 24) == "23/24"


def test_a_session_merges_into_the_record_keeping_tests_that_did_not_run(tmp_path, monkeypatch):
    path = tmp_path / "interop.json"
    old = json.loads(RECORD.read_text())
    kept = {k: v for k, v in old["tests"].items() if k != record.SV}
    path.write_text(json.dumps({**old, "tests": kept}))
    new = json.loads(json.dumps(old["tests"][record.SV]["figures"]))
    new["steered_same_tokens"] = 23 / 24
    repeng = json.loads(json.dumps(old["tests"][record.REPENG]["figures"]))
    repeng["cosine_with_ours"] = {int(k): v for k, v in repeng["cosine_with_ours"].items()}  # as the test hands them
    monkeypatch.setattr(record, "FIGURES", {record.SV: new, record.REPENG: repeng})
    monkeypatch.setattr(record, "DURATIONS", {record.SV: 12.34})
    record.write_record(path)
    data = json.loads(path.read_text())
    assert set(data["tests"]) == set(old["tests"])  # the tests that did not run kept their entries
    assert (
        data["tests"][record.REPENG]["figures"]["cosine_with_ours"]
        == old["tests"][record.REPENG]["figures"]["cosine_with_ours"]
    )
    assert data["tests"][record.LLAMA_CV] == old["tests"][record.LLAMA_CV]
    assert data["tests"][record.SV]["seconds"] == 12.3
    assert data["tests"][record.SV]["figures"]["steered_same_tokens"] == pytest.approx(23 / 24)
    peers = next(t for t in data["models"][0]["tables"] if t["id"] == "peers")
    assert any("same tokens 23/24 steered" in row[-1] for row in peers["rows"])
    assert not list(tmp_path.glob("*.tmp"))


def test_nothing_is_written_when_no_test_passed(tmp_path, monkeypatch):
    monkeypatch.setattr(record, "FIGURES", {})
    record.write_record(tmp_path / "interop.json")
    assert not (tmp_path / "interop.json").exists()


def test_build_seconds_are_read_from_the_installed_markers(tmp_path, monkeypatch):
    folders = {"llama-cpp": (tmp_path / "a",), "repeng": (tmp_path / "b",), "steering-vectors": (tmp_path / "c",)}
    for f in folders.values():
        f[0].mkdir()
    (tmp_path / "a" / ".installed").write_text("459\n")
    (tmp_path / "b" / ".installed").write_text("")  # built before the Makefile timed builds: no figure
    monkeypatch.setattr(record, "ENVS", folders)
    machine = {"cpu": "X", "cores": 2}
    assert record.built_envs(machine) == {"llama-cpp": {"seconds": 459, "machine": machine}}
    assert record.build_rows(record.built_envs(machine)) == [["llama-cpp", "7.7 min", "X, 2 cores"]]
    assert math.isclose(459 / 60, 7.65)
