"""The 13 defects a hostile new user found (issue 14), each pinned by exactly that input: one `error:` line and
exit code 2 (nothing written), or the right HTTP status in the OpenAI error shape; plus the store's faults
(damaged WAL, the main file copied alone, read-only media, two runs at once)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import HARMFUL, HARMLESS, cli_err, cli_ok, make_tiny, tiny_spec
from crystallized_safety.cli import app
from crystallized_safety.core.directions import DirectionBank, extract_directions
from crystallized_safety.errors import InterventionError, JudgeError, PromptError
from crystallized_safety.judges.llm import LLMJudge
from crystallized_safety.store import Store


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dirs):
    """A tiny chat model on disk, its direction file, prompt files with brackets in their names and text."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "tiny").symlink_to(tiny_model_dirs[1]["tiny"])  # the shared saved tiny llama (make_tiny("llama"))
    bank = extract_directions(make_tiny("llama"), HARMFUL, HARMLESS, layers=[1, 2])
    bank.save(root / "d.safetensors")
    (root / "[draft]").mkdir()
    (root / "[draft]" / "p.txt").write_text("[/INST] hello [bold]there[/bold]\nsecond [/x] prompt\n")
    return root


def _tensors(bank: DirectionBank) -> dict:
    return {
        "directions": bank.directions.clone(),
        "layers": torch.tensor(bank.layers),
        "mean_harmful": bank.mean_harmful.clone(),
        "mean_harmless": bank.mean_harmless.clone(),
        "raw_norms": bank.raw_norms.clone(),
        "resid_norms": bank.resid_norms.clone(),
    }


def _generate(files, *extra):
    return ["generate", "--model", str(files / "tiny"), "--max-new-tokens", "3", *extra]


# --------------------------------------------------------------------------- 1. brackets (rich markup)


def test_brackets_in_user_text_are_printed_literally(files):
    cli_err(["generate", "--model", "[/x]", "-p", "hi"], "unknown model '[/x]'", max_lines=2)
    cli_err(["generate", "--model", str(files / "tiny"), "--prompts", str(files / "[draft]" / "nope.txt")],
            "[draft]", max_lines=2)  # fmt: skip
    res = cli_ok(_generate(files, "--prompts", str(files / "[draft]" / "p.txt")))
    assert "> [/INST] hello [bold]there[/bold]" in res.output and "> second [/x] prompt" in res.output
    # a usage error (typer's own) is one line too, with the bracketed value intact
    res = CliRunner().invoke(app, ["generate", "--model", "m", "--alpha", "[/x]"])
    assert res.exit_code == 2 and res.output.strip().startswith("error: Invalid value for '--alpha'")
    assert len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(app, ["serve", "--model", "[/nope]", "--served-name", "[/x]"])
    assert res.exit_code == 2 and "[/nope]" in res.output and "Traceback" not in res.output


def test_error_messages_keep_bracketed_parts(files, tmp_path):
    """A message holding brackets (a shape, a list) reaches the user whole."""
    bank = DirectionBank.load(files / "d.safetensors")
    tensors = _tensors(bank)
    tensors["directions"] = torch.ones(2, 3, 4)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    text = cli_err(_generate(files, "-p", "hi", "--directions", str(tmp_path / "bad.safetensors"), "-l", "1"),
                   "must have shape [layers, hidden], got (2, 3, 4)")  # fmt: skip
    assert "shape ," not in text


# --------------------------------------------------------------------------- 2. crafted direction files


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, m: m.update(any_layer="{not json"), "any_layer"),
        (lambda t, m: t.update(layers=torch.tensor([[1, 2]])), "1-D integer tensor"),
        (lambda t, m: t.update(layers=torch.tensor([1.0, 2.0])), "1-D integer tensor"),
        (lambda t, m: t.update(layers=torch.tensor([1, 1])), "distinct layer indices"),
        (lambda t, m: t.update(layers=torch.tensor([-1, 2])), "distinct layer indices >= 0"),
        (lambda t, m: t.update(resid_norms=torch.ones(1)), "'resid_norms' is float32 (1,), expected"),
        (lambda t, m: t.update(resid_norms=torch.tensor([float("nan"), 1.0])), "'resid_norms' must be finite"),
        (lambda t, m: t.update(resid_norms=torch.tensor([0.0, 1.0])), "finite and > 0"),
        (lambda t, m: t.update(mean_harmless=torch.full((2, 64), float("nan"))), "'mean_harmless' must be finite"),
        (lambda t, m: t.update(directions=torch.zeros(2, 64)), "all-zero directions"),
        (lambda t, m: t.update(directions=torch.ones(2, 64, dtype=torch.int8)), "not floating point"),
        (lambda t, m: t.update(directions=torch.full((2, 64), float("inf"))), "NaN or inf"),
    ],
)
def test_crafted_direction_files_give_one_line(files, tmp_path, change, message):
    bank = DirectionBank.load(files / "d.safetensors")
    tensors, meta = _tensors(bank), {"any_layer": "false", "model_id": "x"}
    change(tensors, meta)
    path = tmp_path / "crafted.safetensors"
    save_file(tensors, str(path), metadata=meta)
    args = _generate(files, "-p", "hi", "--directions", str(path), "-l", "1", "--alpha", "-0.5")
    cli_err([*args, "--alpha-unit", "relative"], message, max_lines=2)


# --------------------------------------------------------------------------- 3. NaN / inf / huge numbers


@pytest.mark.parametrize("alpha, message", [("nan", "finite"), ("inf", "finite"), ("1e30", "out of range")])
def test_non_finite_or_huge_alpha_is_refused(files, alpha, message):
    args = _generate(files, "-p", "hi", "--directions", str(files / "d.safetensors"), "-l", "1", "--alpha", alpha)
    cli_err(args, message, max_lines=2)


def test_nan_logits_raise_instead_of_empty_responses(tiny_llama):
    """Steering that overflows (here: a finite but enormous vector in fp16-like range) is an error, never an
    empty 'response' a substring judge would count as a flip."""
    from crystallized_safety.core.generation.api import generate
    from crystallized_safety.core.steering import Intervention

    v = torch.zeros(64)
    v[0] = 3e38  # finite in fp32; adding it twice overflows to inf, then NaN
    iv = Intervention(directions={1: v, 2: v}, alpha=1e5)
    for engine in ("fast", "hf"):
        with pytest.raises(InterventionError, match="NaN/inf logits"):
            generate(tiny_llama, ["hello"], iv, max_new_tokens=2, engine=engine)


def test_intervention_rejects_zero_and_bad_numbers():
    from crystallized_safety.core.steering import Intervention

    v = torch.randn(8)
    with pytest.raises(InterventionError, match="all zeros"):
        Intervention(directions={1: torch.zeros(8)}, alpha=1.0)
    with pytest.raises(InterventionError, match="layer residual norm must be > 0"):
        Intervention(directions={1: v}, alpha=1.0, alpha_unit="relative", layer_norms={1: 0.0})
    with pytest.raises(InterventionError, match="layer residual norm must be finite"):
        Intervention(directions={1: v}, alpha=1.0, alpha_unit="relative", layer_norms={1: float("nan")})
    with pytest.raises(InterventionError, match="ablation target must be finite"):
        Intervention(directions={1: v}, mode="ablate", ablate_to={1: float("inf")})
    with pytest.raises(InterventionError, match="relative alpha 5000 is out of range"):
        Intervention(directions={1: v}, alpha=[1.0, -5000.0], alpha_unit="relative", layer_norms={1: 1.0})


def test_json_output_never_holds_nan():
    from crystallized_safety import jsonio

    text = jsonio.dumps({"a": float("nan"), "b": [float("inf"), 1.5], "c": (float("-inf"),)})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": [None]}
    assert "NaN" not in text and "Infinity" not in text


# --------------------------------------------------------------------------- 4. length bounds


def test_prompt_and_token_budget_are_bounded_by_the_context(files, tmp_path):
    huge = tmp_path / "huge.txt"
    huge.write_text("word " * 20_000 + "\n")  # 100 kB on one line: under the cap on any prompt (issue 23); context 256
    cli_err(["generate", "--model", str(files / "tiny"), "--prompts", str(huge)], "far beyond the model's context")
    cli_err(_generate(files, "-p", "hi", "--max-new-tokens", "1000"), "does not fit the model's context of 256")
    cli_err(_generate(files, "-p", "x " * 300), "exceeds the model's context of 256 tokens")


def test_check_fits_counts_tokens(tiny_llama):
    counts = tiny_llama.check_fits(["abc", "hello"], 4, raw=True)
    assert counts == [len(tiny_llama.tokenizer("abc")["input_ids"]), len(tiny_llama.tokenizer("hello")["input_ids"])]
    with pytest.raises(PromptError, match="prompt 2"):
        tiny_llama.check_fits(["abc", "y" * 250], 10, raw=True)


# --------------------------------------------------------------------------- 5. file-system errors


def test_file_system_errors_are_one_line(files, tmp_path, tiny_run):
    store_path, _result = tiny_run
    blocker = tmp_path / "file"
    blocker.write_text("x")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec({"tiny": str(files / "tiny")}, studies=[{"kind": "readability"}])))
    cli_err(["run", str(spec), "--store", str(blocker / "results.sqlite")], "is a file, not a directory")
    cli_err(["export", "--store", str(store_path), "--out", str(tmp_path / "missing" / "x.json")],
            "does not exist")  # fmt: skip
    cli_err(["report", "--store", str(store_path), "--out", str(blocker / "report")], "Not a directory")
    cli_err(["report", "--store", str(store_path), "--out", str(blocker)], "is a file")
    assert blocker.read_text() == "x"


def _read_only_media_works(root) -> bool:
    probe = root / "probe"
    probe.mkdir(exist_ok=True)
    script = f"mount --bind {probe} {probe} && mount -o remount,bind,ro {probe} && ! touch {probe}/x 2>/dev/null"
    try:
        return (
            subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, timeout=30).returncode == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


def _on_read_only_media(directory, args):
    """`csafety ARGS` run with `directory` mounted read-only (a private mount namespace), as on read-only media."""
    cli = " ".join(["exec", sys.executable, "-m", "crystallized_safety.cli", *map(str, args)])
    script = f"mount --bind {directory} {directory} && mount -o remount,bind,ro {directory} && {cli}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


def test_store_on_read_only_media(tmp_path, tiny_run, tiny_model_dirs):
    """A valid store (with its WAL still holding data) on a read-only mount: status, export and report read it;
    a run into it says it cannot write, in one line."""
    if not _read_only_media_works(tmp_path):
        pytest.skip("no private mount namespaces here (needs root and unshare)")
    store_path, result = tiny_run
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copy(store_path, ro / "results.sqlite")
    store = ro / "results.sqlite"
    res = _on_read_only_media(ro, ["status", "--store", store, "--json"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)[0]["run_id"] == result.run_id
    res = _on_read_only_media(ro, ["export", "--store", store, "--format", "csv"])
    assert res.returncode == 0 and len(res.stdout.splitlines()) > 10, res.stderr
    res = _on_read_only_media(ro, ["report", "--store", store, "--out", tmp_path / "rep"])
    assert res.returncode == 0 and (tmp_path / "rep" / "report.html").is_file(), res.stderr
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tiny_model_dirs[1], studies=[{"kind": "readability"}])))
    res = _on_read_only_media(ro, ["run", spec, "--store", ro / "new.sqlite"])
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and res.stderr.count("error:") == 1 and "Traceback" not in res.stderr
    assert last.startswith("error: cannot write store") and "read-only media or not writable" in last


# --------------------------------------------------------------------------- 11-13. runs and stores


def test_spec_errors_caught_before_work(files, tmp_path):
    spec = tmp_path / "spec.yaml"
    paths = {"tiny": str(files / "tiny")}
    store = tmp_path / "s.sqlite"
    for studies, message in (
        ([{"kind": "layer_sweep", "layers": [-1], "alphas": [-1.0]}], "greater than or equal to 0"),
        ([{"kind": "transfer", "source_model": "no-such-model", "layers": [1], "alphas": [-1.0]}], "unknown model"),
    ):
        spec.write_text(yaml.safe_dump(tiny_spec(paths, studies=studies)))
        cli_err(["run", str(spec), "--store", str(store)], message)
    assert not store.exists() or Store(store).runs() == []
    # a layer beyond the model: caught right after loading, before extraction; the run is marked failed
    spec.write_text(
        yaml.safe_dump(tiny_spec(paths, studies=[{"kind": "layer_sweep", "layers": [999], "alphas": [-1.0]}]))
    )
    cli_err(["run", str(spec), "--store", str(store)], "layers [999] outside")
    runs = Store(store).runs()
    assert [r.status for r in runs] == ["failed"] and "999" in runs[0].error
    assert Store(store).artifact_kinds(runs[0].run_id, paths["tiny"]) == []  # nothing extracted


def test_second_process_on_the_same_run_is_refused(tiny_run, tmp_path):
    from crystallized_safety.store import StoreError

    store_path, result = tiny_run
    copy = tmp_path / "s.sqlite"
    shutil.copy(store_path, copy)
    store = Store(copy)
    with store.lock_run(result.run_id):
        assert store.run_active(result.run_id)
        with pytest.raises(StoreError, match="already being computed by another process"):
            with Store(copy).lock_run(result.run_id):
                pass
    assert not store.run_active(result.run_id)


def test_interrupted_run_shows_as_interrupted(tiny_run, tmp_path):
    store_path, result = tiny_run
    copy = tmp_path / "s.sqlite"
    shutil.copy(store_path, copy)
    with sqlite3.connect(copy) as db:
        db.execute("UPDATE runs SET status='running'")
    rows = json.loads(cli_ok(["status", "--store", str(copy), "--json"]).stdout)
    assert rows[0]["status"] == "interrupted"


def test_main_file_alone_holds_every_committed_chunk(files, tmp_path):
    """The store checkpoints after each write: copying only results.sqlite of a live run keeps its chunks."""
    from crystallized_safety.experiments.spec import parse_spec
    from crystallized_safety.run.runner import run_experiment

    paths = {"tiny": str(files / "tiny")}
    spec = parse_spec(tiny_spec(paths, n=3, studies=[{"kind": "layer_sweep", "layers": [1], "alphas": [-1.0]}],
                                judges=["substring"], coherence={"enabled": False}))  # fmt: skip
    store = Store(tmp_path / "live.sqlite")
    run_experiment(spec, store)
    want = store.counts(store.run().run_id)
    shutil.copy(tmp_path / "live.sqlite", tmp_path / "alone.sqlite")  # while `store` is still open, no -wal copied
    alone = Store(tmp_path / "alone.sqlite", readonly=True)
    assert alone.counts(alone.run().run_id) == want and want["chunks"] > 0


def test_damaged_wal_is_detected_and_kept(tmp_path):
    """Commits past a damaged WAL frame are dropped by SQLite: the store says so and keeps the WAL."""
    path = tmp_path / "s.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE t (x)")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for i in range(6):
        db.execute("INSERT INTO t VALUES (?)", (os.urandom(64).hex() * i,))
    wal = (tmp_path / "s.sqlite-wal").read_bytes()
    shutil.copy(path, tmp_path / "c.sqlite")
    page = int.from_bytes(wal[8:12], "big")
    damaged = bytearray(wal)
    damaged[32 + 24 + 100] ^= 0xFF  # first frame's page data: its checksum fails, every later commit is lost
    (tmp_path / "c.sqlite-wal").write_bytes(bytes(damaged))
    db.close()
    from crystallized_safety.store import wal_commits_beyond_valid

    assert wal_commits_beyond_valid(tmp_path / "c.sqlite") == 6
    assert (tmp_path / "c.sqlite-wal.damaged").read_bytes() == bytes(damaged) and page >= 512


def test_store_backup_and_check(tiny_run, tmp_path):
    store_path, result = tiny_run
    cli_ok(["store", "backup", "--store", str(store_path), "--out", str(tmp_path / "b.sqlite")])
    backup = Store(tmp_path / "b.sqlite", readonly=True)
    assert backup.counts(result.run_id) == Store(store_path, readonly=True).counts(result.run_id)
    res = cli_ok(["store", "check", "--store", str(tmp_path / "b.sqlite")])
    assert "0 problems" in res.output
    with sqlite3.connect(tmp_path / "b.sqlite") as db:
        db.execute("DELETE FROM generations WHERE rowid IN (SELECT rowid FROM generations LIMIT 3)")
    res = CliRunner().invoke(app, ["store", "check", "--store", str(tmp_path / "b.sqlite")])
    assert res.exit_code == 1 and "marked done with" in res.output
    cli_err(["store", "backup", "--store", str(store_path), "--out", str(tmp_path / "b.sqlite")], "exists")


# --------------------------------------------------------------------------- 12. LLM judge


def test_llm_judge_exits_nonzero_when_nothing_answered(tmp_path):
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    args = ["judge", "--judge", "llm", "--input", str(records), "--base-url", "http://127.0.0.1:9/v1",
            "--judge-model", "m", "--api-key-env", "", "--judge-timeout", "0.5", "--judge-retries", "0"]  # fmt: skip
    cli_err(args, "reached no verdict for any of 1 responses")
    cli_err(["judge", "--judge", "substring", "--input", str(records), "--judge-retries", "1"], "--judge llm only")


# --------------------------------------------------------------------------- 10. pack size stored before work


def test_pack_rows_chosen_before_any_generation(files, tmp_path, monkeypatch):
    """`pack_rows: auto` is tuned and stored before the first chunk, so a run killed at any later point resumes
    with the same packs (a kill during tuning leaves no chunk behind)."""
    from crystallized_safety.experiments.spec import parse_spec
    from crystallized_safety.run import runner

    paths = {"tiny": str(files / "tiny")}
    data = tiny_spec(paths, n=3, studies=[{"kind": "layer_sweep", "layers": [1], "alphas": [-1.0, -2.0]}],
                     judges=["substring"], coherence={"enabled": False}, generation={"max_new_tokens": 3,
                     "pack_rows": "auto"}, screening={"enabled": True})  # fmt: skip
    spec = parse_spec(data)
    store = Store(tmp_path / "s.sqlite")
    seen = []
    real = runner.screen

    def spy(spec, store, run_id, *args):
        seen.append(store.get_artifact(run_id, paths["tiny"], "pack_rows"))
        return real(spec, store, run_id, *args)

    monkeypatch.setattr(runner, "screen", spy)
    runner.run_experiment(spec, store)
    assert seen and seen[0] is not None and seen[0][0]["rows"] >= 1


# --------------------------------------------------------------------------- CLI subprocess: no traceback


def test_real_process_prints_one_line_for_usage_errors():
    proc = subprocess.run([sys.executable, "-m", "crystallized_safety.cli", "generate", "--bogus"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "error: No such option: --bogus (see 'csafety generate --help')"


# --------------------------------------------------------------------------- issue 23, item 10: judge retries bounded


def _dead_url() -> str:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def test_llm_judge_retries_are_bounded(tmp_path):
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    args = ["judge", "--judge", "llm", "--input", str(records), "--base-url", _dead_url(), "--judge-model", "m",
            "--api-key-env", "", "--judge-timeout", "0.5"]  # fmt: skip
    start = time.monotonic()
    cli_err([*args, "--judge-retries", "1000000000"], "--judge-retries must be an integer in [0, 10]", max_lines=1)
    cli_err([*args, "--judge-retries", "-1"], "--judge-retries", max_lines=1)
    cli_err([*args, "--judge-timeout", "nan"], "--judge-timeout", max_lines=1)
    assert time.monotonic() - start < 5
    with pytest.raises(JudgeError, match=r"max_retries must be an int in \[0, 10\]"):
        LLMJudge("http://x/v1", "m", max_retries=10**9)


def test_llm_judge_gives_up_on_a_dead_endpoint_with_progress(tmp_path):
    """A dead URL with the most retries: lines of progress, then every item gives up by the deadline, not after
    (retries x backoff) each; the CLI then says so in one line."""
    lines: list[str] = []
    judge = LLMJudge(_dead_url(), "m", api_key_env=None, timeout=0.5, max_retries=10, backoff=0.5,
                     give_up_after=1.5, on_retry=lines.append, concurrency=2)  # fmt: skip
    start = time.monotonic()
    verdicts = judge.judge(["p"] * 6, ["r"] * 6)
    assert time.monotonic() - start < 6
    assert all(v.refusal is None and "gave up: no answer from" in v.reason for v in verdicts)
    assert lines and all(line.startswith("judge: attempt ") and "retrying in" in line for line in lines)


def test_llm_judge_cli_gives_up_in_one_line(tmp_path, monkeypatch):
    from crystallized_safety.judges import llm

    monkeypatch.setattr(llm, "DEFAULT_GIVE_UP_S", 1.0)
    records = tmp_path / "r.jsonl"
    records.write_text("".join(json.dumps({"prompt": "p", "response": f"r{i}"}) + "\n" for i in range(20)))
    start = time.monotonic()
    result = CliRunner().invoke(app, ["judge", "--judge", "llm", "--input", str(records), "--base-url", _dead_url(),
                                      "--judge-model", "m", "--api-key-env", "", "--judge-timeout", "0.2",
                                      "--judge-retries", "10"])  # fmt: skip
    assert time.monotonic() - start < 10 and result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: the LLM judge reached no verdict for any of 20 responses")
    assert "gave up" in lines[-1] and "judge: attempt 1/11 failed" in lines[0]
    assert "Traceback" not in result.output
