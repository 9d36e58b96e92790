"""Runner + store on tiny models: every study end to end, resume after a real `kill -9`, a changed
spec makes a new run, and the Ray executor (a real local cluster) gives the same rows as local."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml

from conftest import tiny_spec
from crystallized_safety.experiments.spec import parse_spec
from crystallized_safety.run.executors.local import LocalExecutor
from crystallized_safety.run.runner import run_experiment
from crystallized_safety.store import Store, StoreError

COMPARE = (
    "model",
    "condition_key",
    "prompt_set",
    "prompt_index",
    "prompt",
    "response",
    "token_ids",
    "refusal",
    "coherent",
    "score",
)


@pytest.fixture(scope="module")
def tiny_dirs(tiny_model_dirs):
    return tiny_model_dirs


def rows(store_path):
    store = Store(store_path)
    run = store.run()
    return [{k: r[k] for k in COMPARE} for r in store.generations(run.run_id)], store


@pytest.mark.filterwarnings("ignore:.*underpowered")
def test_all_studies_end_to_end_and_rerun_skips(tiny_dirs, tiny_run, tmp_path):
    _root, paths = tiny_dirs
    spec = parse_spec(tiny_spec(paths))
    path, first = tiny_run
    shutil.copy(path, tmp_path / "s.sqlite")
    store = Store(tmp_path / "s.sqlite")
    assert not first.resumed and first.chunks_run > 0 and first.chunks_skipped == 0
    kinds = {a["study"]: a for a in store.analyses(first.run_id)}
    assert set(kinds) == {
        "baseline",
        "layer_sweep",
        "threshold",
        "controls",
        "sign",
        "multilayer",
        "induction",
        "transfer",
        "readability",
        "min_layers",
        "selection",
        "judges",
    }
    assert len(kinds["selection"]["result"]["candidates"]) == 2 * 4  # positions -1, -2 x the tiny model's 4 layers
    assert kinds["judges"]["result"]["n"] == 12 and "threshold" in kinds["judges"]["result"]
    assert kinds["sign"]["result"]["equivalent"] is True  # inverted +alpha == -alpha, token for token
    assert len(kinds["readability"]["result"]["layers"]) == 4
    assert all(0 <= r["projection_auc"] <= 1 for r in kinds["readability"]["result"]["layers"])
    fits = json.loads(store.get_artifact(first.run_id, paths["tiny"], f"transfer:{paths['tiny2']}")[0]["fits"])
    assert [(f["target_layer"], f["source_layer"]) for f in fits] == [(1, 1), (2, 2)]  # 4 and 4 layers: same depth
    assert all(f["map_r2"] is None for f in fits)  # equal hidden sizes (64): directions used as is, no map
    (v,) = store.verdicts(first.run_id)
    # random weights never write a refusal phrase: the baseline refuses nothing, so steering cannot be read
    base = kinds["baseline"]["result"]["harmful"]
    assert (base["k"], base["n"]) == (0, 6)
    assert v["verdict"] == "floor effect" and v["rule"].startswith("baseline harmful refusal 0.0% (0/6")
    n_rows = store.counts(first.run_id)["generations"]
    again = run_experiment(spec, store)
    assert again.resumed and again.chunks_run == 0 and again.chunks_skipped == first.chunks_run
    assert store.counts(first.run_id)["generations"] == n_rows
    # a changed spec is a new run, never mixed with the old one
    changed = parse_spec(tiny_spec(paths, studies=[{"kind": "threshold", "layer": 1, "alphas": [-1.0, -2.0]}]))
    other = run_experiment(changed, store)
    assert other.run_id != first.run_id and len(store.runs()) == 2
    assert store.counts(first.run_id)["generations"] == n_rows
    # export: json parses and csv has one line per generation
    payload = json.loads(store.export(first.run_id, "json"))
    assert len(payload["generations"]) == n_rows and payload["verdicts"][0]["verdict"] == v["verdict"]
    assert store.export(first.run_id, "csv").count("\n") >= n_rows + 1


def test_readability_reads_the_extraction_pass(tiny_dirs, tiny_run, monkeypatch):
    """The readability probes reuse the direction extraction's activations of the extraction split: the stored
    table equals one computed from a pass of its own (an independent capture), and the run's directions phase
    captures each prompt set once (extraction split twice, evaluation split twice), not six times."""
    from crystallized_safety.core import directions as directions_module
    from crystallized_safety.experiments import readability as readability_module
    from crystallized_safety.experiments.prompt_sets import load_prompt_sets
    from crystallized_safety.experiments.spec import Readability
    from crystallized_safety.registry import load_model
    from crystallized_safety.run.runner import prepare_bank

    _root, paths = tiny_dirs
    spec = parse_spec(tiny_spec(paths))
    path, first = tiny_run
    store = Store(path)
    (study,) = [s for s in spec.studies if isinstance(s, Readability)]
    stored = store.get_artifact(first.run_id, paths["tiny"], f"readability:{study.label}")[0]
    model, sets = load_model(paths["tiny"]), load_prompt_sets(spec)
    assert stored == json.loads(json.dumps(readability_module.readability(spec, study, model, sets)))
    calls = []
    for module in (directions_module, readability_module):
        real = module.capture
        monkeypatch.setattr(module, "capture", lambda *a, real=real, **k: calls.append(len(a[1])) or real(*a, **k))
    tables = []
    prepare_bank(
        spec, model, sets, lambda h, n: tables.append(readability_module.readability(spec, study, model, sets, (h, n)))
    )
    assert calls == [len(sets.extract_harmful), len(sets.extract_harmless), len(sets.eval_harmful),
                     len(sets.eval_harmless)]  # fmt: skip
    assert json.loads(json.dumps(tables[0])) == stored


def test_store_rejects_non_sqlite(tmp_path):
    bad = tmp_path / "x.sqlite"
    bad.write_text("not a database, just text " * 100)
    with pytest.raises(StoreError, match="not a crystallized-safety store"):
        Store(bad)


def test_kill_9_then_resume_is_identical(tiny_dirs, tmp_path):
    root, paths = tiny_dirs
    spec_data = tiny_spec(
        paths,
        n=9,
        studies=[
            {"kind": "layer_sweep", "layers": [0, 1, 2, 3], "alphas": [-0.5, -1.0, -2.0]},
            {"kind": "controls", "layer": 2, "alpha": -1.0, "seeds": 2},
        ],
    )
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_data))
    killed, clean = tmp_path / "killed.sqlite", tmp_path / "clean.sqlite"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "crystallized_safety.cli", "run", str(spec_path), "--store"]
    proc = subprocess.Popen(cmd + [str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, done = time.time() + 240, 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
        try:
            with sqlite3.connect(killed) as db:
                done = db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        except sqlite3.Error:
            continue
        if done >= 8:
            break
    assert proc.poll() is None, "run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(killed) as db:
        partial = db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        status = db.execute("SELECT status FROM runs").fetchone()[0]
    assert partial >= 8 and status == "running"
    subprocess.run(cmd + [str(killed)], env=env, check=True, capture_output=True, timeout=600)
    subprocess.run(cmd + [str(clean)], env=env, check=True, capture_output=True, timeout=600)
    got, store_k = rows(killed)
    want, store_c = rows(clean)
    assert got == want and len(got) == len({(r["condition_key"], r["prompt_set"], r["prompt_index"]) for r in got})
    assert store_k.verdicts(store_k.run().run_id) == store_c.verdicts(store_c.run().run_id)
    assert store_k.run().status == "finished"


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=128 * 1024 * 1024)
    yield ray
    ray.shutdown()


@pytest.mark.filterwarnings("ignore:.*underpowered")
def test_ray_executor_matches_local_and_retries(tiny_dirs, tmp_path, ray_cluster):
    from crystallized_safety.experiments.prompt_sets import load_prompt_sets
    from crystallized_safety.run.chunks import expand
    from crystallized_safety.run.executors.ray import RayExecutor

    _root, paths = tiny_dirs
    spec = parse_spec(
        tiny_spec(
            paths,
            n=6,
            studies=[
                {"kind": "layer_sweep", "layers": [1, 2], "alphas": [-1.0, -2.0]},
                {"kind": "controls", "layer": 2, "alpha": -1.0, "seeds": 1},
            ],
        )
    )
    local = Store(tmp_path / "local.sqlite")
    run_experiment(spec, local, LocalExecutor())
    _plans, chunks = expand(spec, paths["tiny"], 4, load_prompt_sets(spec))
    executor = RayExecutor(workers=2, fail_once=[chunks[3].key])
    remote = Store(tmp_path / "ray.sqlite")
    result = run_experiment(spec, remote, executor)
    assert executor.retried == 1 and result.chunks_run == len(chunks)
    workers = {r[0] for r in remote.db.execute("SELECT DISTINCT worker FROM chunks")}
    assert all(w.startswith("ray:") for w in workers) and len(workers) == 2
    got = [{k: r[k] for k in COMPARE} for r in remote.generations(result.run_id)]
    want = [{k: r[k] for k in COMPARE} for r in local.generations(result.run_id)]
    assert got == want
    assert remote.verdicts(result.run_id) == local.verdicts(result.run_id)
    assert executor.actor_info == [{"device": "cpu", "dtype": "float32"}] * 2


def test_ray_actor_opens_the_model_with_the_spec_device_and_dtype(tiny_dirs):
    """The actor (run here in-process) opens the model with the context's device and dtype, not 'auto'."""
    import torch

    from crystallized_safety.core.directions import DirectionBank
    from crystallized_safety.run.executors.ray import _Actor
    from crystallized_safety.run.worker import ModelContext, bank_to_bytes

    _root, paths = tiny_dirs
    bank = DirectionBank(torch.eye(4, 64), [0, 1, 2, 3], metadata={"n_layers": "4", "hidden_size": "64"})
    ctx = ModelContext(paths["tiny"], bank_to_bytes(bank), device="cpu", dtype="bfloat16")
    assert _Actor(ctx, 1, frozenset()).describe() == {"device": "cpu", "dtype": "bfloat16"}


@pytest.mark.filterwarnings("ignore:.*underpowered")
def test_packed_cells_equal_cells_run_alone(tiny_dirs, tmp_path):
    """Several cells in one batch (per-row vectors, alpha folded in) give the tokens each cell gives alone."""
    from crystallized_safety.experiments.prompt_sets import load_prompt_sets
    from crystallized_safety.registry import load_model
    from crystallized_safety.run.chunks import expand, make_packs, pack_intervention
    from crystallized_safety.run.runner import Loader, _model_context
    from crystallized_safety.run.worker import ChunkWorker

    _root, paths = tiny_dirs
    data = tiny_spec(
        paths,
        n=6,
        studies=[
            {"kind": "layer_sweep", "layers": [1, 2], "alphas": [-1.0, -3.0], "controls": True},
            {"kind": "multilayer", "layer_sets": [[1, 3]], "alphas": [-2.0], "alpha_split": "total"},
            {"kind": "controls", "layer": 2, "alpha": -2.0, "mode": "ablate_add", "seeds": 1},
        ],
    )
    spec = parse_spec(data)
    sets = load_prompt_sets(spec)
    _plans, chunks = expand(spec, paths["tiny"], 4, sets)
    packs = make_packs(chunks, pack_rows=12)
    assert max(len(p) for p in packs) == 4 and all(len(p) == 1 for p in packs if p[0].condition.mode != "add")
    assert sorted(c.key for p in packs for c in p) == sorted(c.key for c in chunks)
    store = Store(tmp_path / "ctx.sqlite")
    ctx, _ = _model_context(spec, store, "r", Loader(spec, paths["tiny"], None), sets, lambda *a: None)
    worker = ChunkWorker(load_model(paths["tiny"]), ctx)
    for pack in packs:
        together = worker.run_pack(pack)
        for chunk, rows in zip(pack, together):
            alone = worker.run_pack((chunk,))[0]
            assert [r.token_ids for r in rows] == [r.token_ids for r in alone]
            assert [r.refusal for r in rows] == [r.refusal for r in alone]
            # first-token scores come from the generation's prefill: equal to the judge's own forward pass
            iv = pack_intervention([chunk.condition], len(chunk.prompts), worker.bank, worker.transfer)
            own = worker.scorer.scores(list(chunk.prompts), iv).tolist()
            assert [r.score for r in rows] == pytest.approx(own, abs=1e-4)
            assert [r.score for r in alone] == pytest.approx(own, abs=1e-4)


@pytest.mark.filterwarnings("ignore:.*underpowered")
def test_pack_rows_auto_is_measured_once_and_kept(tiny_dirs, tmp_path, monkeypatch):
    from crystallized_safety.run import runner as fastgen  # autotune_rows, as the runner calls it

    _root, paths = tiny_dirs
    studies = [{"kind": "layer_sweep", "layers": [1, 2], "alphas": [-0.5, -1.0], "controls": False}]
    data = tiny_spec(paths, studies=studies, judges=["substring"], coherence={"enabled": False})
    data["generation"] = {"max_new_tokens": 4, "batch_size": 3, "pack_rows": "auto"}
    spec = parse_spec(data)
    calls = []
    real = fastgen.autotune_rows

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastgen, "autotune_rows", counted)
    store = Store(tmp_path / "auto.sqlite")
    first = run_experiment(spec, store)
    tuned = store.get_artifact(first.run_id, paths["tiny"], "pack_rows")[0]
    assert len(calls) == 1 and calls[0]["start"] == 3
    assert 3 <= tuned["rows"] <= calls[0]["limit"] and tuned["rows"] in [p["rows"] for p in tuned["probes"]]
    again = run_experiment(spec, store)
    assert len(calls) == 1 and again.chunks_run == 0
    for bad in (-1, "fast", True):
        with pytest.raises(Exception, match=r"pack_rows must be a number of rows >= 0 .* or 'auto', got"):
            parse_spec({**data, "generation": {"pack_rows": bad}})


@pytest.mark.filterwarnings("ignore:.*underpowered")
def test_blind_reanalysis_renames_every_model_and_reaches_the_same_analyses(tiny_dirs, tiny_run, tmp_path):
    """The blind copy holds no real model name, and the analyses recomputed under the anonymous name equal the
    named ones (transfer excluded: its conditions name the source model)."""
    from crystallized_safety.experiments.blind import blind_verdicts

    _root, paths = tiny_dirs
    spec = parse_spec(tiny_spec(paths))
    path, first = tiny_run
    store = Store(path)
    got = blind_verdicts(store, first.run_id, spec, tmp_path)
    (named,) = store.verdicts(first.run_id)
    assert set(got) == {paths["tiny"]}
    assert (got[paths["tiny"]]["verdict"], got[paths["tiny"]]["rule"]) == (named["verdict"], named["rule"])
    blind = Store(tmp_path / "blind-0.sqlite")
    assert {r["model"] for r in blind.generations(first.run_id)} == {"model-a"}
    assert paths["tiny"] not in json.dumps([a for a in blind.analyses(first.run_id)])
    named_analyses = {a["study"]: a["result"] for a in store.analyses(first.run_id) if a["study"] != "transfer"}
    blind_analyses = {a["study"]: a["result"] for a in blind.analyses(first.run_id)}
    assert blind_analyses == named_analyses
    with pytest.raises(StoreError, match="exists"):
        store.copy_run(first.run_id, tmp_path / "blind-0.sqlite")


def test_summary_export_leaves_out_the_generations(tiny_run, tmp_path):
    from conftest import cli_ok

    path, result = tiny_run
    out = tmp_path / "summary.json"
    cli_ok(["export", "--store", str(path), "--format", "json", "--summary", "--out", str(out)])
    data = json.loads(out.read_text())
    assert "generations" not in data and data["verdicts"] and data["analyses"]
    assert data["verdicts"] == Store(path, readonly=True).verdicts(result.run_id)
    from typer.testing import CliRunner

    from crystallized_safety.cli import app

    bad = CliRunner().invoke(app, ["export", "--store", str(path), "--format", "csv", "--summary"])
    assert bad.exit_code == 2 and "--summary is a json export" in bad.output
