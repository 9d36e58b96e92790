"""Hostile input, second round (issue 23): numbers and output paths are validated before any model loads, by one
layer (`crystallized_safety.validation`) that the CLI's options and the spec's fields share; `run` never adopts
another tool's SQLite database. Each case is the issue's own input; `--model no-such-model` proves a check runs
before the model loads (otherwise the error would be the unknown model)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import cli_err, cli_ok, make_tiny, tiny_spec
from crystallized_safety import validation
from crystallized_safety.core.directions import DirectionBank
from crystallized_safety.errors import CrystallizedSafetyError
from crystallized_safety.experiments.spec import parse_spec
from crystallized_safety.store import Store, StoreError

CORPUS = Path(__file__).parent / "data" / "hostile"
NO_MODEL = ["--model", "no-such-model"]


@pytest.fixture(scope="module")
def bank_file(tmp_path_factory) -> Path:
    """A direction file of a 4-layer, 32-wide model, with means and norms (no model needed to build it)."""
    path = tmp_path_factory.mktemp("bank") / "d.safetensors"
    torch.manual_seed(0)
    DirectionBank(
        directions=torch.nn.functional.normalize(torch.randn(4, 32), dim=-1),
        layers=[0, 1, 2, 3],
        mean_harmful=torch.randn(4, 32),
        mean_harmless=torch.randn(4, 32),
        raw_norms=torch.ones(4),
        resid_norms=torch.full((4,), 10.0),
    ).save(path)
    return path


# --------------------------------------------------------------------------- 2. sampling options


@pytest.mark.parametrize(
    "args, option",
    [
        (["--sample", "--seed", "100000000000000000000000000000"], "--seed"),
        (["--sample", "--seed", "-1"], "--seed"),
        (["--sample", "--temperature", "nan"], "--temperature"),
        (["--sample", "--temperature", "-1"], "--temperature"),
        (["--sample", "--temperature", "0"], "--temperature"),
        (["--sample", "--temperature", "inf"], "--temperature"),
        (["--sample", "--top-p", "nan"], "--top-p"),
        (["--sample", "--top-p", "2"], "--top-p"),
        (["--sample", "--top-p", "0"], "--top-p"),
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "-3"], "--batch-size"),
    ],
)
def test_sampling_options_are_refused_before_the_model_loads(args, option):
    cli_err(["generate", *NO_MODEL, "-p", "hi", *args], option, max_lines=1)


def test_negative_subspace_is_refused(bank_file):
    steer = ["--directions", str(bank_file), "-l", "1", "--mode", "ablate"]
    cli_err(["generate", *NO_MODEL, "-p", "hi", *steer, "--subspace", "-1"], "--subspace", max_lines=1)
    cli_err(["extract", *NO_MODEL, "--harmful", "bundled:harmful:extract", "--harmless", "bundled:harmless:extract",
             "--out", "x.safetensors", "--subspace", "-1"], "--subspace", max_lines=1)  # fmt: skip


# --------------------------------------------------------------------------- 11, 12. select, budgets, prompt size


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_select_kl_max_is_refused_at_parse_time(value, tmp_path):
    cli_err(["select", *NO_MODEL, "--kl-max", value, "--out", str(tmp_path / "o.safetensors")], "--kl-max")


def test_token_budget_and_prompt_size_before_the_model_loads(tmp_path):
    cli_err(["generate", *NO_MODEL, "-p", "hi", "--max-new-tokens", "10000000"], "--max-new-tokens", max_lines=1)
    cli_err(["generate", *NO_MODEL, "-p", "hi", "--max-new-tokens", "0"], "--max-new-tokens", max_lines=1)
    huge = tmp_path / "huge.txt"
    huge.write_text("word " * 200_000 + "\n")  # 1 MB on one line
    cli_err(["generate", *NO_MODEL, "--prompts", str(huge)], "999,999 characters, beyond the 500,000", max_lines=1)
    cli_err(["generate", *NO_MODEL, "-p", "x" * 1_000_000], "characters", max_lines=1)


# --------------------------------------------------------------------------- 3. output paths, before the work


def _extract(out: str) -> list[str]:
    return ["extract", *NO_MODEL, "--harmful", "bundled:harmful:extract", "--harmless", "bundled:harmless:extract",
            "--out", out]  # fmt: skip


def test_extract_output_is_checked_before_the_model_loads(tmp_path):
    blocker = tmp_path / "harmful.txt"
    blocker.write_text("x\n")
    cli_err(_extract(str(blocker / "x.safetensors")), "is a file, not a directory", max_lines=1)
    cli_err(_extract("/proc/x.safetensors"), "cannot write --out '/proc/x.safetensors'", max_lines=1)
    (tmp_path / "d.safetensors").mkdir()
    cli_err(_extract(str(tmp_path / "d.safetensors")), "exists (a directory)", max_lines=1)
    (tmp_path / "f.safetensors").write_bytes(b"old")
    cli_err(_extract(str(tmp_path / "f.safetensors")), "never overwritten", max_lines=1)
    assert (tmp_path / "f.safetensors").read_bytes() == b"old" and blocker.read_text() == "x\n"


def test_vectors_and_export_model_outputs_are_checked_first(bank_file, tmp_path):
    cli_err(["vectors", "export", "--directions", str(bank_file), "-l", "1", "--alpha", "2", "--out", "/proc/x.gguf"],
            "cannot write --out '/proc/x.gguf'", max_lines=1)  # fmt: skip
    gguf = tmp_path / "v.gguf"
    cli_ok(["vectors", "export", "--directions", str(bank_file), "-l", "1", "--alpha", "2", "--out", str(gguf)])
    cli_err(["vectors", "import", "--in", str(gguf), "--out", "/proc/x.safetensors"], "cannot write", max_lines=1)
    cli_err(["vectors", "import", "--in", str(gguf), "--out", str(bank_file)], "never overwritten", max_lines=1)
    cli_err(["export-model", *NO_MODEL, "--directions", str(bank_file), "-l", "1", "--out", "/proc/m"],
            "cannot write --out '/proc/m'", max_lines=1)  # fmt: skip
    cli_err(["export-model", *NO_MODEL, "--directions", str(bank_file), "-l", "1", "--out", str(tmp_path)],
            "never overwritten", max_lines=1)  # fmt: skip


def test_select_outputs_are_checked_before_scoring(tmp_path):
    out = str(tmp_path / "o.safetensors")
    cli_err(["select", *NO_MODEL, "--out", out, "--table", "/proc/t.json"], "cannot write --table", max_lines=1)
    (tmp_path / "t.json").write_text("{}")
    cli_err(["select", *NO_MODEL, "--out", out, "--table", str(tmp_path / "t.json")], "never overwritten")
    (tmp_path / "o.safetensors").write_bytes(b"old")
    cli_err(["select", *NO_MODEL, "--out", out], "never overwritten", max_lines=1)  # one rule: select refuses too
    cli_err(["select", *NO_MODEL, "--out", str(tmp_path / "o.txt")], "must end in .safetensors", max_lines=1)


def test_late_write_failures_are_one_line(tmp_path):
    with pytest.raises(validation.InvalidValue, match="cannot write --out .*: No space left on device"):
        with validation.writing(tmp_path / "x.safetensors"):
            raise OSError(28, "No space left on device")


# --------------------------------------------------------------------------- 6. a foreign database as the store


def test_run_refuses_a_foreign_database(tiny_model_dirs, tmp_path):
    store = tmp_path / "f.sqlite"
    shutil.copy(CORPUS / "stores" / "foreign.sqlite", store)
    before = store.read_bytes()
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tiny_model_dirs[1], n=35, studies=[{"kind": "readability"}])))
    cli_err(["run", str(spec), "--store", str(store)], "not a crystallized-safety store", max_lines=1)
    assert store.read_bytes() == before and not Path(f"{store}-wal").exists()  # no table added, not made WAL
    with pytest.raises(StoreError, match="tables users"):
        Store(store)
    empty = tmp_path / "empty.sqlite"
    shutil.copy(CORPUS / "stores" / "empty.sqlite", empty)
    Store(empty).close()  # an empty database becomes a store


# --------------------------------------------------------------------------- 7. the spec: the CLI's checks, early


def _dry_run(tmp_path, tiny_model_dirs, **extra) -> list[str]:
    spec = tmp_path / "spec.yaml"
    studies = extra.pop("studies", [{"kind": "layer_sweep", "layers": [1], "alphas": [-1.0], "controls": True}])
    spec.write_text(yaml.safe_dump(tiny_spec(tiny_model_dirs[1], n=35, studies=studies, **extra)))
    return ["run", str(spec), "--store", str(tmp_path / "s.sqlite"), "--dry-run"]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"seed": 10000000000000000}, "seed: seed must be an integer in [0, 4294967295]"),
        ({"studies": [{"kind": "layer_sweep", "layers": [1], "alphas": [1e308]}]}, "alphas 1e+308 is out of range"),
        ({"studies": [{"kind": "sign", "layer": 1, "alpha": 1e308}]}, "alpha 1e+308 is out of range"),
        ({"generation": {"max_new_tokens": 10000000}}, "max_new_tokens must be an integer in [1, 4096]"),
        ({"generation": {"batch_size": 0}}, "batch_size must be an integer >= 1"),
        ({"device_map": "cuda:7"}, "unknown device map 'cuda:7'"),
        ({"device_map": {"": "cuda:7"}}, "on 'cuda:7' but this machine has"),
        ({"device": "cuda:7"}, "cuda"),
    ],
)
def test_dry_run_refuses_what_the_run_would_fail_on(tmp_path, tiny_model_dirs, extra, message):
    cli_err(_dry_run(tmp_path, tiny_model_dirs, **extra), message, max_lines=1)
    assert not (tmp_path / "s.sqlite").exists()


def test_dry_run_refuses_a_random_bytes_direction_file(tmp_path, tiny_model_dirs):
    (tmp_path / "d.safetensors").write_bytes(bytes(range(256)) * 8)
    directions = {"source": "file", "path": str(tmp_path / "d.safetensors")}
    cli_err(_dry_run(tmp_path, tiny_model_dirs, directions=directions), "d.safetensors", max_lines=1)


def test_spec_and_cli_give_the_same_alpha_message():
    """One function: the spec's message for an alpha is the CLI's, with the key in place of the option."""
    data = {"name": "x", "models": ["m"], "studies": [{"kind": "sign", "layer": 1, "alpha": 1e30}]}
    with pytest.raises(CrystallizedSafetyError) as spec_error:
        parse_spec(data)
    with pytest.raises(validation.InvalidValue) as cli_error:
        validation.alpha(1e30, "relative", "alpha")
    assert str(spec_error.value).endswith(str(cli_error.value))


# --------------------------------------------------------------------------- 8. GGUF control vectors


def _gguf(path: Path, tensors: dict[str, np.ndarray], arch: str | None = "controlvector", count: int | None = None):
    """A hand-made GGUF: `arch` None writes no general.architecture at all."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch or "controlvector")
    if arch is None:
        writer.kv_data[0].pop("general.architecture")
    if count is not None:
        writer.add_uint32("controlvector.layer_count", count)
    for name, data in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


VEC = np.linspace(-1, 1, 32)


@pytest.mark.parametrize(
    "tensors, arch, count, message",
    [
        ({"direction.99999999999999999999": VEC}, "controlvector", None, "layer numbers go up to 10,000"),
        ({"direction.2": VEC}, "llama", None, "architecture 'llama', not 'controlvector'"),
        ({"direction.2": VEC}, None, None, "no architecture"),
        ({"direction.2": np.ones((4, 32))}, "controlvector", 1, "shape (4, 32), not one vector"),
        ({"direction.2": VEC, "direction.3": VEC}, "controlvector", 5, "declares layer_count 5 but holds 2"),
    ],
    ids=["huge-layer", "llama", "no-arch", "2d", "layer-count"],
)
def test_crafted_gguf_imports_are_one_line(tmp_path, tensors, arch, count, message):
    source = _gguf(tmp_path / "cv.gguf", tensors, arch, count)
    cli_err(["vectors", "import", "--in", str(source), "--out", str(tmp_path / "d.safetensors")], message, max_lines=1)
    assert not (tmp_path / "d.safetensors").exists()


def test_export_refuses_alpha_zero(bank_file, tmp_path):
    """alpha 0 writes all-zero vectors, which import (and llama.cpp's steering) cannot use: refused up front."""
    out = tmp_path / "z.gguf"
    for alpha in ("0", "0.0", "-0"):
        cli_err(["vectors", "export", "--directions", str(bank_file), "-l", "1", "--alpha", alpha, "--out", str(out)],
                "--alpha 0 writes all-zero vectors", max_lines=1)  # fmt: skip
    assert not out.exists()


# --------------------------------------------------------------------------- 9. device maps


@pytest.mark.parametrize(
    "device_map, message",
    [
        ('{"": "disk"}', "no module on cpu or a GPU"),
        ('{"": "meta"}', "no module on cpu or a GPU"),
        ('{"nonexistent.module": "cpu"}', "names 'nonexistent.module', which is not a module"),
    ],
)
def test_device_maps_that_cannot_run_are_one_line(tiny_model_dirs, device_map, message, monkeypatch, tmp_path):
    monkeypatch.setenv("CSAFETY_CACHE", str(tmp_path / "cache"))  # any offload folder goes here
    tiny = tiny_model_dirs[1]["tiny"]
    cli_err(["generate", "--model", tiny, "-p", "hi", "--max-new-tokens", "2", "--device", "cpu",
             "--device-map", device_map], message, max_lines=1)  # fmt: skip


# --------------------------------------------------------------------------- 1. finite huge values, degenerate output


@pytest.mark.parametrize(
    "name, what",
    [("huge-row", "'directions'"), ("huge-resid-norms", "'resid_norms'"), ("huge-affine-target", "'mean_harmless'")],
)
def test_huge_finite_direction_files_are_refused(tiny_model_dirs, name, what):
    """The issue's files (a row of 1e30, resid_norms of 1e30 with relative alphas, an affine target of 1e30) gave
    empty answers and exit 0; now one line naming the tensor and the bound, before the model loads."""
    path = CORPUS / "directions" / f"{name}.safetensors"
    args = ["generate", "--model", tiny_model_dirs[1]["tiny"], "-p", "hi", "--directions", str(path), "-l", "1",
            "--max-new-tokens", "3"]  # fmt: skip
    mode = ["--mode", "affine"] if name == "huge-affine-target" else ["--alpha", "-0.5", "--alpha-unit", "relative"]
    cli_err([*args, *mode], f"{what} has magnitude 1e+30 (rows", max_lines=1)
    cli_err([*args, *mode], "beyond the 1e+06 of any real residual stream", max_lines=1)


def _huge(model, scale: float):
    from crystallized_safety.core.steering import Intervention

    v = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0))
    return Intervention(directions={1: v / v.norm() * scale}, alpha=1.0)  # past the file check: built in memory


@pytest.mark.parametrize("options", [{"engine": "fast"}, {"engine": "hf"}, {"engine": "hf", "do_sample": True}])
def test_constant_logits_are_flagged_not_written_as_empty_answers(options):
    from crystallized_safety.core.generation.api import generate

    model = make_tiny("llama")
    gens = generate(model, ["hello there", "how are you"], _huge(model, 1e22), max_new_tokens=3, **options)
    assert all(g.degenerate and "constant logits" in g.degenerate for g in gens)
    one_token = generate(model, ["hello there"], _huge(model, 1e18), max_new_tokens=20, engine="fast")[0]
    assert one_token.degenerate == "one token repeated 20 times"
    plain = generate(model, ["hello there", "how are you"], None, max_new_tokens=3)
    assert all(g.degenerate is None for g in plain)


def test_degenerate_rows_are_flagged_and_incoherent(monkeypatch):
    """The worker writes a degenerate row with coherent=0 (never a bypass, gate or no gate) and says why."""
    from crystallized_safety.core.generation.output import Generation
    from crystallized_safety.experiments.conditions import Condition
    from crystallized_safety.run import worker as worker_module
    from crystallized_safety.run.chunks import Chunk

    model = make_tiny("llama")
    bank = DirectionBank(directions=torch.nn.functional.normalize(torch.randn(4, 64), dim=-1), layers=[0, 1, 2, 3])
    ctx = worker_module.ModelContext("tiny", worker_module.bank_to_bytes(bank))
    fake = [Generation("p0", "", (0, 0, 0), False, "constant logits (x)"), Generation("p1", "Sure", (5,), True)]
    monkeypatch.setattr(worker_module, "generate", lambda *a, **k: fake)
    condition = Condition("harmful", layers=(1,), alpha=-1.0, alpha_unit="absolute")
    chunk = Chunk("tiny", "s", condition, 0, ("p0", "p1"), 3)
    rows = worker_module.ChunkWorker(model, ctx).run_pack((chunk,))[0]
    assert rows[0].coherent == 0 and rows[0].judge_reason == "degenerate output: constant logits (x)"
    assert rows[1].coherent is None and rows[1].refusal == 0


def test_server_answers_an_error_for_degenerate_steering():
    import httpx

    from conftest import ThreadServer
    from crystallized_safety.serve.app import ServeConfig, create_app

    model = make_tiny("llama")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    config = ServeConfig(model_name="tiny", intervention=_huge(model, 1e22))
    with ThreadServer(create_app(model, config)) as server:
        reply = httpx.post(f"{server.url}/chat/completions", json=body, timeout=60)
    assert reply.status_code == 500, reply.text
    error = reply.json()["error"]
    assert error["code"] == "degenerate_output" and "constant logits" in error["message"]
    assert len(error["message"].splitlines()) == 1


# --------------------------------------------------------------------------- 5. a damaged WAL header


def _store_with_pending_wal(tmp_path: Path) -> tuple[Path, bytes]:
    """A real store whose WAL holds 4 committed transactions not yet checkpointed, copied beside a new name."""
    import sqlite3

    live = tmp_path / "live.sqlite"
    Store(live).close()
    db = sqlite3.connect(live, isolation_level=None)
    db.execute("PRAGMA wal_autocheckpoint=0")
    for i in range(4):
        db.execute("INSERT INTO meta VALUES (?, ?)", (f"k{i}", "x" * 3000))
    path = tmp_path / "s.sqlite"
    shutil.copy(live, path)
    wal = Path(f"{live}-wal").read_bytes()
    db.close()
    return path, wal


WAL_DAMAGE = {
    "magic": (lambda w: b"\x00\x00\x00\x00" + w[4:], "has magic 0x00000000, not a SQLite WAL's"),
    "page-size": (lambda w: w[:8] + (3000).to_bytes(4, "big") + w[12:], "page size 3000, not a power of two"),
    "page-size-valid": (lambda w: w[:8] + (8192).to_bytes(4, "big") + w[12:], "header checksum does not match"),
    "salt": (lambda w: w[:16] + bytes([w[16] ^ 0xFF]) + w[17:], "header checksum does not match"),
    "random": (lambda w: bytes(np.random.default_rng(0).integers(0, 256, len(w), dtype=np.uint8)), "has magic"),
    "truncated": (lambda w: w[:20], "is 20 bytes, shorter than its 32-byte header"),
}


@pytest.mark.parametrize("kind", WAL_DAMAGE)
def test_damaged_wal_header_is_detected_and_kept(tmp_path, kind):
    damage, message = WAL_DAMAGE[kind]
    path, wal = _store_with_pending_wal(tmp_path)
    damaged = damage(wal)
    Path(f"{path}-wal").write_bytes(damaged)
    from typer.testing import CliRunner

    from crystallized_safety.cli import app

    result = CliRunner().invoke(app, ["store", "check", "--store", str(path)])
    assert result.exit_code == 1, result.output
    problems = [line for line in result.output.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1 and message in problems[0] and "s.sqlite-wal.damaged" in problems[0], result.output
    if kind not in ("random", "truncated"):  # counted with the main file's page size and the first frame's salts
        assert "up to 4 committed transaction(s)" in problems[0]
    assert Path(f"{path}-wal.damaged").read_bytes() == damaged
    store = Store(path)  # opening for a run: warned, and the copy stays as it was
    assert any(message in w for w in store.warnings)
    store.close()
    assert Path(f"{path}-wal.damaged").read_bytes() == damaged
    result = CliRunner().invoke(app, ["store", "check", "--store", str(path)])  # the WAL is reset by now
    assert result.exit_code == 1 and "holds a damaged WAL found earlier" in result.output


def test_intact_pending_wal_is_no_problem(tmp_path):
    path, wal = _store_with_pending_wal(tmp_path)
    Path(f"{path}-wal").write_bytes(wal)
    from crystallized_safety.store.files import header_problem

    assert header_problem(wal) is None
    store = Store(path, readonly=True)
    assert store.check() == [] and store.db.execute("SELECT COUNT(*) FROM meta").fetchone()[0] == 5


def _row(index: int, response: str):
    from crystallized_safety.store import GenerationRow

    return GenerationRow(model="m", study="s", condition_key="c", condition="{}", prompt_set="harmful",
                         prompt_index=index, prompt=f"p{index}", response=response, n_tokens=3, finished=1, refusal=0,
                         judge="substring", judge_reason=None, score=None, coherent=None, perplexity=None,
                         distinct_n=None, token_ids="[1, 2, 3]")  # fmt: skip


def test_flipped_bit_inside_a_response_is_found_by_check(tmp_path):
    """SQLite keeps no checksum of its own: a bit flipped inside a stored response passes its integrity check,
    but not the chunk's checksum written with the rows."""
    from typer.testing import CliRunner

    from crystallized_safety.cli import app

    path = tmp_path / "s.sqlite"
    store = Store(path)
    store.open_run("r", "t", "spec", "h", {})
    rows = [_row(i, f"Sure, here is answer number {i} MARKER-{i}.") for i in range(4)]
    store.write_chunks("r", [("k1", "m", "s", "c", rows[:2]), ("k2", "m", "s", "c", rows[2:])], 1.0)
    store.close()
    assert "0 problems" in CliRunner().invoke(app, ["store", "check", "--store", str(path)]).output
    data = bytearray(path.read_bytes())
    at = data.index(b"MARKER-3")
    data[at] ^= 0x01  # 'M' -> 'L': still valid text, same length
    path.write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["store", "check", "--store", str(path)])
    assert result.exit_code == 1, result.output
    problems = [line for line in result.output.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1 and "prompts 2..3" in problems[0] and "checksum mismatch" in problems[0]


def test_rewrites_keep_checksums_honest(tmp_path):
    """A re-judge (labels only) keeps the checksums valid; a content rewrite (a scrubbed copy) drops them."""
    store = Store(tmp_path / "s.sqlite")
    store.open_run("r", "t", "spec", "h", {})
    store.write_chunks("r", [("k1", "m", "s", "c", [_row(0, "a"), _row(1, "b")])], 1.0)
    (first, _), (second, _) = store.rows("generations")
    store.rewrite("generations", {first: {"refusal": 1, "judge": "llm"}})
    assert store.check() == []
    store.rewrite("generations", {second: {"response": "scrubbed"}})
    assert store.check() == [] and store.rows("row_sums") == []
