"""Blind re-analysis on a tiny run whose models have distinctive names and which includes a transfer study:
the blind copy holds none of the names in any cell or byte, the stored responses are re-judged (labels equal
to the originals, verdicts too), a tampered label comes back corrected, and a name that cannot be scrubbed
stops the copy with a one-line error."""

from __future__ import annotations

import json
import shutil
import sqlite3
import warnings

import pytest
import yaml

from conftest import make_tiny, tiny_spec
from crystallized_safety import jsonio
from crystallized_safety.blind_store import BlindError
from crystallized_safety.experiments.blind import blind_verdicts
from crystallized_safety.experiments.spec import parse_spec
from crystallized_safety.registry import load_model
from crystallized_safety.run.runner import run_experiment
from crystallized_safety.run.worker import bank_from_bytes
from crystallized_safety.store import Store

TARGET, SOURCE = "Zorblax-Refusal-7B", "QuuxSource-Grumm"
LABELS = ("refusal", "judge", "judge_reason", "coherent", "distinct_n", "n_tokens", "response", "score")
pytestmark = pytest.mark.filterwarnings("ignore:.*underpowered")


@pytest.fixture(scope="module")
def named_run(tmp_path_factory):
    """(spec, store path, run id, real names) of a small run: sweep with controls, transfer, K*."""
    root = tmp_path_factory.mktemp("blind-models")
    paths = {}
    for name, arch, seed in ((TARGET, "llama", 0), (SOURCE, "gpt2", 1)):
        model = make_tiny(arch, seed=seed)
        model.hf.save_pretrained(root / name)
        model.tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    studies = [
        {"kind": "layer_sweep", "layers": [1, 2], "alphas": [-0.5, -1.0], "controls": True},
        {"kind": "transfer", "source_model": paths[SOURCE], "layers": [1, 2], "alphas": [-0.5]},
        {"kind": "min_layers", "ks": [1, 2], "window_range": [1, 2], "alphas": [-0.5]},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = parse_spec(tiny_spec({"tiny": paths[TARGET], "tiny2": paths[SOURCE]}, studies=studies))
    path = tmp_path_factory.mktemp("blind-run") / "results.sqlite"
    store = Store(path)
    result = run_experiment(spec, store)
    store.close()
    names = [paths[TARGET], paths[SOURCE], TARGET, SOURCE, "zorblax", "quuxsource"]
    return spec, path, result.run_id, [n.lower() for n in names]


def private_copy(named_run, tmp_path):
    spec, path, run_id, _names = named_run
    shutil.copy(path, tmp_path / "named.sqlite")
    return spec, tmp_path / "named.sqlite", run_id


def every_cell(path):
    """(table, column, value) of every text or blob cell of the file, read through sqlite itself."""
    db = sqlite3.connect(path)
    try:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
            columns = [c[1] for c in db.execute(f'PRAGMA table_info("{table}")')]
            for row in db.execute(f'SELECT * FROM "{table}"'):
                yield from ((table, c, v) for c, v in zip(columns, row) if isinstance(v, (str, bytes)))
    finally:
        db.close()


def rows_by_key(store_path, run_id):
    store = Store(store_path, readonly=True)
    try:
        return {(r["condition_key"], r["prompt_set"], r["prompt_index"]): r for r in store.generations(run_id)}
    finally:
        store.close()


def test_the_blind_copy_names_no_model_in_any_cell_or_byte(named_run, tmp_path):
    spec, path, run_id = private_copy(named_run, tmp_path)
    names = named_run[3]
    blind_verdicts(Store(path), run_id, spec, tmp_path)
    copy = tmp_path / "blind-0.sqlite"
    for file in (copy, tmp_path / "blind-0.sqlite-wal"):
        raw = file.read_bytes().lower() if file.exists() else b""
        assert [n for n in names if n.encode() in raw] == [], file.name
    leaks = [(t, c) for t, c, v in every_cell(copy) for n in names if n in (v.lower() if isinstance(v, str) else "")]
    leaks += [(t, c) for t, c, v in every_cell(copy) for n in names if isinstance(v, bytes) and n.encode() in v.lower()]
    assert leaks == []
    # what the names were scrubbed from is still usable: the spec is the blind one, the direction file loads
    blind = Store(copy, readonly=True)
    stored = parse_spec(yaml.safe_load(blind.run_row(run_id)["spec_yaml"]), "copy")
    assert stored.models == ["model-a"] and "transfer" not in [s.kind for s in stored.studies]
    assert not [k for k in blind.artifact_kinds(run_id, "model-a") if k.startswith("transfer:")]
    assert not [r for r in blind.generations(run_id) if "transfer:" in r["condition"]]
    meta, blob = blind.get_artifact(run_id, "model-a", "directions")
    original = Store(path, readonly=True).get_artifact(run_id, spec.models[0], "directions")
    bank, named_bank = bank_from_bytes(blob), bank_from_bytes(original[1])
    assert bank.metadata["model_id"] == meta["model_id"] == "model-a"
    assert bank.layers == named_bank.layers and bank.directions.equal(named_bank.directions)


def test_rejudged_labels_and_verdicts_equal_the_originals(named_run, tmp_path):
    spec, path, run_id = private_copy(named_run, tmp_path)
    store = Store(path)
    got = blind_verdicts(store, run_id, spec, tmp_path, load=load_model)[spec.models[0]]
    report = got["rejudged"]
    assert report["rederived"] == [
        "refusal",
        "judge",
        "judge_reason",
        "coherent",
        "perplexity",
        "distinct_n",
        "relevance",
    ]
    assert report["changed"] == {"refusal": 0, "coherent": 0} and "score" in report["kept"]
    named, blind = rows_by_key(path, run_id), rows_by_key(tmp_path / "blind-0.sqlite", run_id)
    assert report["rows"] == len(blind) and 0 < len(blind) < len(named)  # the transfer rows are gone
    for key, row in blind.items():
        assert {k: row[k] for k in LABELS} == {k: named[key][k] for k in LABELS}, key
        ppl = named[key]["perplexity"]  # None for an empty response
        assert row["perplexity"] == (None if ppl is None else pytest.approx(ppl, rel=1e-4)), key
    copy = tmp_path / "blind-0.sqlite"
    (verdict,) = store.verdicts(run_id)
    evidence = json.loads(jsonio.dumps(got["evidence"]))
    assert (got["verdict"], got["rule"], evidence) == (verdict["verdict"], verdict["rule"], verdict["evidence"])
    k_star = [{a["study"]: a["result"].get("k_star") for a in s.analyses(run_id)} for s in (store, Store(copy))]
    assert k_star[0]["min_layers"] == k_star[1]["min_layers"]


def tamper(path, run_id):
    """Set a wrong refusal label on one baseline harmful row and a wrong coherence label on another; returns
    their keys."""
    db = sqlite3.connect(path)
    with db:
        picked = db.execute(
            "SELECT condition_key, prompt_set, prompt_index, refusal, coherent FROM generations WHERE run_id=? "
            "AND study='baseline' AND prompt_set='harmful' AND refusal IS NOT NULL AND coherent IS NOT NULL "
            "ORDER BY prompt_index LIMIT 2",
            (run_id,),
        ).fetchall()
        where = "WHERE run_id=? AND condition_key=? AND prompt_set=? AND prompt_index=?"
        (k1, s1, i1, refusal, _c), (k2, s2, i2, _r, coherent) = picked
        db.execute(f"UPDATE generations SET refusal=? {where}", (1 - refusal, run_id, k1, s1, i1))
        db.execute(f"UPDATE generations SET coherent=? {where}", (1 - coherent, run_id, k2, s2, i2))
    db.close()
    return (k1, s1, i1), refusal, (k2, s2, i2), coherent


def test_a_tampered_label_is_rejudged_from_the_response(named_run, tmp_path):
    spec, path, run_id = private_copy(named_run, tmp_path)
    refusal_key, refusal, coherent_key, coherent = tamper(path, run_id)
    got = blind_verdicts(Store(path), run_id, spec, tmp_path, load=load_model)[spec.models[0]]
    assert got["rejudged"]["changed"] == {"refusal": 1, "coherent": 1}
    blind = rows_by_key(tmp_path / "blind-0.sqlite", run_id)
    assert (blind[refusal_key]["refusal"], blind[coherent_key]["coherent"]) == (refusal, coherent)
    # without a loader the gate's columns cannot be re-derived: kept as stored, and said so
    text_only = blind_verdicts(Store(path), run_id, spec, tmp_path, seed=1)[spec.models[0]]["rejudged"]
    assert text_only["changed"] == {"refusal": 1}
    assert set(text_only["kept"]) == {"score", "coherent", "perplexity", "distinct_n", "relevance"}
    blind = rows_by_key(tmp_path / "blind-1.sqlite", run_id)
    assert (blind[refusal_key]["refusal"], blind[coherent_key]["coherent"]) == (refusal, 1 - coherent)


def test_a_name_that_cannot_be_scrubbed_stops_the_copy(named_run, tmp_path):
    spec, path, run_id = private_copy(named_run, tmp_path)
    store = Store(path)
    store.put_artifact(run_id, spec.models[0], "opaque", blob=b"\xff\xfe" + TARGET.upper().encode() + b"\x00\xff")
    with pytest.raises(BlindError, match=r"still names a model .* artifacts\.blob") as err:
        blind_verdicts(store, run_id, spec, tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "blind-0.sqlite").exists()  # no leaky copy left behind


def test_blind_cli_compares_stored_and_blind_verdicts(named_run, tmp_path):
    from typer.testing import CliRunner

    from crystallized_safety.cli import app

    spec, path, run_id = private_copy(named_run, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    got = CliRunner().invoke(app, ["blind", "--store", str(path), "--workdir", str(work), "--seeds", "2"])
    assert got.exit_code == 0, got.output  # exit 0: every blind verdict and K* equals the stored one
    (stored,) = Store(path).verdicts(run_id)
    assert stored["verdict"].split()[0] in got.output and "blind re-derivation" in got.output
    assert (work / "blind-0.sqlite").exists() and (work / "blind-1.sqlite").exists()
    tamper(path, run_id)  # a relabelled row: still re-judged from its response
    again = CliRunner().invoke(app, ["blind", "--store", str(path), "--workdir", str(tmp_path)])
    assert again.exit_code == 0 and "refusal 1" in again.output
    missing = CliRunner().invoke(app, ["blind", "--store", str(path), "--workdir", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "is not a directory" in missing.output
