"""Fuzzing every input the tool reads: prompt files of every format, direction files, YAML specs, store files,
HTTP bodies, and command lines. The invariant everywhere: a valid result, or the tool's own one-line error
(`CrystallizedSafetyError`; exit 2 on the command line; a 4xx in the OpenAI shape over HTTP); never another
exception, never NaN/inf in what is returned.

`make test` runs a bounded slice (the `ci` profile: 40 examples per property); `make test-slow` sets
HYPOTHESIS_PROFILE=slow (400 each) and adds the corpus run through real subprocesses."""

from __future__ import annotations

import json
import math
import os
import string
import struct
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import cli_err, make_tiny
from crystallized_safety import validation
from crystallized_safety.core.directions import MAX_MAGNITUDE, DirectionBank
from crystallized_safety.errors import CrystallizedSafetyError
from crystallized_safety.experiments.spec import STUDY_KINDS, parse_spec
from crystallized_safety.prompts import load_prompts
from crystallized_safety.serve.request import BadRequest, decode_body, parse_request
from crystallized_safety.store import Store

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.register_profile(
    "slow", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CORPUS = Path(__file__).parent / "data" / "hostile"
PIECES = list(string.printable) + ["[/INST]", "[/]", "[bold]", "\u202e", "\x00", "\ufeff", "é", "\u2028", "\ud800"]
HOSTILE_TEXT = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)


# --------------------------------------------------------------------------- prompt files


def _prompt_file_bytes() -> st.SearchStrategy[tuple[str, bytes]]:
    lines = st.lists(HOSTILE_TEXT, max_size=8)
    txt = lines.map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass"))
    value = HOSTILE_TEXT | st.integers() | st.none()
    row = st.one_of(st.dictionaries(st.sampled_from(["prompt", "goal", "x", ""]), value, max_size=3), value)
    jsonl = st.lists(row, max_size=6).map(lambda rows: "\n".join(json.dumps(r) for r in rows).encode())
    js = st.recursive(st.none() | st.integers() | HOSTILE_TEXT, lambda c: st.lists(c, max_size=4)
                      | st.dictionaries(st.sampled_from(["prompt", "goal", "a"]), c, max_size=3), max_leaves=12).map(
        lambda v: json.dumps(v).encode())  # fmt: skip
    csv = st.lists(st.lists(HOSTILE_TEXT, min_size=1, max_size=3), max_size=6).map(
        lambda rows: "\n".join(",".join(r) for r in rows).encode("utf-8", "surrogatepass"))  # fmt: skip
    raw = st.binary(max_size=200)
    return st.one_of(
        st.tuples(st.just(".txt"), txt | raw),
        st.tuples(st.just(".jsonl"), jsonl | raw),
        st.tuples(st.just(".json"), js | raw),
        st.tuples(st.just(".csv"), csv | raw),
    )


@given(_prompt_file_bytes())
def test_prompt_files(tmp_path_factory, case):
    suffix, data = case
    path = tmp_path_factory.mktemp("p") / f"prompts{suffix}"
    path.write_bytes(data)
    try:
        found = load_prompts(path)
    except CrystallizedSafetyError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        return
    assert len(found) >= 1 and all(isinstance(p, str) and p.strip() for p in found)


# --------------------------------------------------------------------------- direction files

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool]
SPECIALS = [0.0, 1.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e30, 1e-30]


@st.composite
def direction_files(draw) -> tuple[dict, dict]:
    rows, d = draw(st.integers(0, 3)), draw(st.sampled_from([0, 4, 8]))

    def tensor(shape):
        dtype = draw(st.sampled_from(DTYPES))
        values = draw(st.lists(st.sampled_from(SPECIALS) | st.floats(-10, 10), min_size=1, max_size=4))
        flat = torch.tensor([values[i % len(values)] for i in range(math.prod(shape))], dtype=torch.float64)
        if dtype.is_floating_point:
            return flat.reshape(shape).to(dtype)
        return torch.nan_to_num(flat, nan=0, posinf=1, neginf=-1).clamp(-100, 100).reshape(shape).to(dtype)

    shapes = st.sampled_from([(rows, d), (rows,), (rows + 1, d), (d,), (rows, d, 1), ()])
    tensors = {}
    for name in ("directions", "layers", "mean_harmful", "mean_harmless", "raw_norms", "resid_norms"):
        if draw(st.booleans()) or name == "directions":
            tensors[name] = tensor(draw(shapes))
    meta = draw(st.dictionaries(st.sampled_from(["any_layer", "layers", "model_id", "n_layers"]), HOSTILE_TEXT,
                                max_size=3))  # fmt: skip
    return tensors, meta


@given(direction_files())
def test_direction_files(tmp_path_factory, case):
    from safetensors.torch import save_file

    tensors, meta = case
    path = tmp_path_factory.mktemp("d") / "d.safetensors"
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    except Exception:  # noqa: BLE001 - safetensors itself refuses some (0-d, bool): not our input then
        return
    try:
        bank = DirectionBank.load(path)
    except CrystallizedSafetyError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        return
    assert torch.isfinite(bank.directions).all() and (bank.directions.norm(dim=-1) > 0).all()
    assert len(set(bank.layers)) == len(bank.layers) == bank.directions.shape[0] and min(bank.layers) >= 0
    for name in ("resid_norms", "raw_norms"):
        value = getattr(bank, name)
        assert value is None or (torch.isfinite(value).all() and (value > 0).all())
        assert value is None or value.double().max() <= MAX_MAGNITUDE  # issue 23: no finite but huge norm
    for name in ("directions", "mean_harmful", "mean_harmless"):  # rows, means (hence affine targets) bounded
        value = getattr(bank, name)
        assert value is None or value.double().norm(dim=-1).max() <= MAX_MAGNITUDE


@given(st.binary(max_size=300), st.booleans())
def test_direction_file_bytes(tmp_path_factory, data, with_header):
    """Random bytes, alone or after a valid safetensors header: the tool's error, or a bank that holds up."""
    path = tmp_path_factory.mktemp("d") / "d.safetensors"
    header = json.dumps({"directions": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data if with_header else data)
    try:
        bank = DirectionBank.load(path)
    except CrystallizedSafetyError as exc:
        assert str(exc)
        return
    assert torch.isfinite(bank.directions).all() and (bank.directions.norm(dim=-1) > 0).all()


# --------------------------------------------------------------------------- YAML specs

SPEC_KEYS = ["name", "models", "prompts", "generation", "studies", "judges", "coherence", "directions", "seed",
             "device", "dtype", "screening", "verdict", "bogus"]  # fmt: skip
YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | HOSTILE_TEXT,
    lambda c: (
        st.lists(c, max_size=3)
        | st.dictionaries(st.sampled_from(SPEC_KEYS + ["kind", "layers", "alphas", "n"]), c, max_size=4)
    ),  # fmt: skip
    max_leaves=15,
)


@given(st.dictionaries(st.sampled_from(SPEC_KEYS), YAML_VALUES, max_size=6))
def test_spec_dicts(data):
    try:
        spec = parse_spec(data)
    except CrystallizedSafetyError as exc:
        assert str(exc)
        return
    assert spec.models and spec.studies


STUDY = st.fixed_dictionaries(
    {"kind": st.sampled_from([*STUDY_KINDS, "nope"])},  # fmt: skip
    optional={
        "layers": st.lists(st.integers(-3, 3000) | st.floats() | HOSTILE_TEXT, max_size=3),
        "layer": st.integers(-3, 3000) | st.floats(),
        "alphas": st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3),
        "alpha": st.floats(allow_nan=True, allow_infinity=True),
        "ks": st.lists(st.integers(-2, 40), max_size=3),
        "window_range": st.lists(st.integers(-2, 40), max_size=3),
        "source_model": HOSTILE_TEXT,
    },
)


@given(st.lists(STUDY, min_size=1, max_size=3), st.integers(-5, 10**6) | st.floats())
def test_spec_studies(studies, n):
    data = {"name": "f", "models": ["m"], "prompts": {"n": n}, "studies": studies}
    try:
        spec = parse_spec(data)
    except CrystallizedSafetyError as exc:
        assert str(exc)
        return
    for study in spec.studies:  # what passes has finite alphas and non-negative layers
        for alpha in getattr(study, "alphas", []) or []:
            assert math.isfinite(alpha)
        layers = getattr(study, "layers", None)
        for layer in [] if layers in (None, "all") else layers:
            assert isinstance(layer, int) and layer >= 0


# --------------------------------------------------------------------------- store files


@given(st.binary(max_size=400), st.booleans())
def test_store_files(tmp_path_factory, data, sqlite_header):
    """Random bytes as a store: read-only, always "not a crystallized-safety store" naming the file (a store needs
    its `meta` table); writable, the same refusal, or a new empty store when SQLite reads the file as an empty
    database. Never another exception, never a run made up from the bytes."""
    path = tmp_path_factory.mktemp("s") / "results.sqlite"
    path.write_bytes((b"SQLite format 3\x00" + data) if sqlite_header else data)
    for readonly in (True, False):
        try:
            store = Store(path, readonly=readonly)
        except CrystallizedSafetyError as exc:
            assert str(exc).startswith(f"'{path}' is not a crystallized-safety store ("), str(exc)
            assert str(exc).endswith("; pass another --store") and "\n" not in str(exc), str(exc)
            continue
        assert not readonly, "random bytes were read as an existing store"
        assert store.runs() == [] and store.warnings == []
        store.close()


# --------------------------------------------------------------------------- HTTP bodies


@pytest.fixture(scope="module")
def chat_model():
    return make_tiny("llama")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats(allow_nan=False) | HOSTILE_TEXT,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(HOSTILE_TEXT, c, max_size=3),
    max_leaves=10,
)
BODY = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "other", ""]) | JSON_VALUES},
    optional={
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"])},
                             optional={"content": HOSTILE_TEXT | JSON_VALUES}), max_size=3) | JSON_VALUES,
        "max_tokens": st.integers(-5, 10**20) | JSON_VALUES,
        "temperature": st.floats(allow_nan=False) | JSON_VALUES,
        "top_p": st.floats(allow_nan=False) | JSON_VALUES,
        "seed": st.integers(-(2**70), 2**70) | JSON_VALUES,
        "n": JSON_VALUES,
        "stream": JSON_VALUES,
    },
)  # fmt: skip


@given(BODY)
def test_http_bodies(chat_model, body):
    try:
        chat = parse_request(decode_body(json.dumps(body).encode()), chat_model, "tiny", 64)
    except BadRequest as exc:
        assert 400 <= exc.status < 500 and exc.message and "\n" not in exc.message
        return
    assert 1 <= chat.max_tokens <= 64 and math.isfinite(chat.temperature) and math.isfinite(chat.top_p)
    assert 0 <= chat.seed < 2**63 and chat.text


def _strict_json(data: bytes) -> tuple[bool, object]:
    """The oracle: Python's JSON parser with NaN / Infinity refused."""

    def refuse(name: str) -> object:
        raise ValueError(name)

    try:
        return True, json.loads(data, parse_constant=refuse)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False, None


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@given(st.binary(max_size=200) | JSON_VALUES.map(lambda v: json.dumps(v).encode())
       | st.integers(0, 40).map(lambda d: b"[" * d + b"1" + b"]" * d))  # fmt: skip
@example(b"NaN")
@example(b'{"temperature": -Infinity}')
@example(b"[" * 33 + b"]" * 33)
@example(b"[" * 32 + b"]" * 32)
@example(b'["' + b"[" * 40 + b'", "\\ud800"]')  # brackets in a string do not nest
@example(b"")
def test_http_raw_bytes(data):
    """Any body: decoded to exactly what strict JSON reads, or a 400 saying the body is not valid JSON (or nests
    too deep) exactly when strict JSON refuses it or it nests deeper than MAX_DEPTH."""
    from crystallized_safety.serve.request import MAX_DEPTH

    valid, expected = _strict_json(data)
    try:
        decoded = decode_body(data)
    except BadRequest as exc:
        assert exc.status == 400 and "\n" not in exc.message, exc.message
        if valid:
            assert _depth(expected) > MAX_DEPTH and exc.message.startswith("request body nests "), exc.message
        else:
            assert exc.message.startswith("request body is not valid JSON ("), exc.message
        return
    assert valid and _depth(expected) <= MAX_DEPTH, data
    assert decoded == expected and type(decoded) is type(expected)


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dirs):
    return tiny_model_dirs[0]  # holds the saved tiny llama as "tiny"


def corpus(kind: str) -> list[Path]:
    return sorted((CORPUS / kind).iterdir())


@pytest.mark.parametrize("path", corpus("prompts"), ids=lambda p: p.name)
def test_corpus_prompt_files_on_the_command_line(tiny_dir, path):
    """Each hostile prompt file through `generate`: it runs, or one error line with exit 2."""
    from typer.testing import CliRunner

    from crystallized_safety.cli import app

    res = CliRunner().invoke(app, ["generate", "--model", str(tiny_dir / "tiny"), "--prompts", str(path),
                                   "--max-new-tokens", "2", "--json"])  # fmt: skip
    assert "Traceback" not in res.output and res.exit_code in (0, 2), res.output
    if res.exit_code == 2:
        assert res.output.count("error:") == 1
    else:
        for line in res.stdout.splitlines():
            record = json.loads(line)  # standard JSON, no NaN
            assert isinstance(record["response"], str)


CORPUS_SPEC_ERRORS = {  # what each hostile spec is refused with (one `error:` line, exit 2)
    "binary.yaml": "not UTF-8 text: a spec is a YAML file",
    "bomb.yaml": "name: Input should be a valid string",  # the alias bomb is never expanded
    "device-map-cuda7.yaml": "on 'cuda:7' but this machine has",
    "empty.yaml": "the spec must be a YAML mapping with 'name', 'models' and 'studies'",
    "huge-alpha.yaml": "alphas 1e+308 is out of range for relative alphas",
    "huge-max-new-tokens.yaml": "max_new_tokens must be an integer in [1, 4096], got 10000000",
    "inf-alpha.yaml": "studies[0].alphas[0]: Input should be a finite number",
    "nan-alpha.yaml": "studies[0].alphas[0]: Input should be a finite number",
    "negative-layer.yaml": "studies[0].layers[0]: Input should be greater than or equal to 0",
    "not-a-mapping.yaml": "the spec must be a YAML mapping with 'name', 'models' and 'studies'",
    "python-tag.yaml": "not valid YAML at line 1",
    "random-direction-file.yaml": "random-bytes.safetensors' is not a valid safetensors direction file",
    "seed-overflow.yaml": "seed: seed must be an integer in [0, 4294967295]",
    "tabs.yaml": "not valid YAML at line 2",
    "unknown-model.yaml": "unknown model '[/x]': not a registry alias",
    "unknown-transfer.yaml": "unknown model 'nowhere'",
    "wrong-types.yaml": "name: Input should be a valid string",
}


@pytest.mark.parametrize("path", corpus("specs"), ids=lambda p: p.name)
def test_corpus_specs(tmp_path, monkeypatch, path):
    """Each hostile spec is refused with its own one-line message, before a store is created."""
    assert path.name in CORPUS_SPEC_ERRORS, f"add the message {path.name} is refused with to CORPUS_SPEC_ERRORS"
    monkeypatch.chdir(Path(__file__).parent.parent)  # the direction file's path is relative to the repository
    cli_err(["run", str(path), "--store", str(tmp_path / "s.sqlite")], CORPUS_SPEC_ERRORS[path.name])
    assert not (tmp_path / "s.sqlite").exists()


@pytest.mark.parametrize("path", corpus("stores"), ids=lambda p: p.name)
def test_corpus_stores(path):
    for command in (["status", "--store", str(path)], ["export", "--store", str(path)]):
        cli_err(command, str(path.name))


def test_corpus_is_not_empty():
    assert len(corpus("prompts")) >= 8 and len(corpus("specs")) >= 6 and len(corpus("stores")) >= 3


@pytest.mark.slow
def test_corpus_through_real_processes(tiny_dir, tmp_path):
    """The same corpus through `python -m crystallized_safety.cli` (no CliRunner): no traceback, exit 0 or 2."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "crystallized_safety.cli"]
    runs = [["generate", "--model", str(tiny_dir / "tiny"), "--prompts", str(p), "--max-new-tokens", "2"]
            for p in corpus("prompts")]  # fmt: skip
    runs += [["run", str(p), "--store", str(tmp_path / "s.sqlite")] for p in corpus("specs")]
    runs += [["status", "--store", str(p)] for p in corpus("stores")]
    for args in runs:
        proc = subprocess.run(base + args, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        if proc.returncode == 2:
            assert proc.stderr.count("error:") == 1, proc.stderr


@pytest.mark.parametrize("field, message", [
    ("name", "name: Input should be a valid string"),
    ("studies", "studies[0]: Input should be a valid dictionary"),
    ("prompts", "prompts: Input should be a valid dictionary or instance of PromptSpec"),
])  # fmt: skip
def test_yaml_bombs_are_refused_without_expanding(tmp_path, field, message):
    """A billion-laughs spec (9**8 = 43 million leaves if its aliases were expanded) in any field is refused by
    that field's type check, which never walks the expansion: the one-line error names the field. The time
    bound only catches an expansion (minutes); it is far above the milliseconds a refusal takes, loaded CI too.
    The corpus holds a smaller bomb (`test_corpus_specs`)."""
    import time

    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i, name in enumerate("bcdefgh"):
        prev = "abcdefgh"[i]
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    rest = {"name": "x", "models": ["m"], "studies": [{"kind": "readability"}], field: "*h"}
    lines += [f"{key}: {value if key == field else json.dumps(value)}" for key, value in rest.items()]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    assert yaml.safe_load((tmp_path / "bomb.yaml").read_text())[field][0][0] is not None  # a real alias bomb
    t0 = time.monotonic()
    cli_err(["run", str(tmp_path / "bomb.yaml"), "--store", str(tmp_path / "s.sqlite")], message, max_lines=1)
    assert time.monotonic() - t0 < 120
    assert not (tmp_path / "s.sqlite").exists()


# --------------------------------------------------------------------------- one validation layer (issue 23)

ISSUE_23_SPECS = {
    "seed-overflow.yaml": "seed: seed must be an integer in [0, 4294967295]",
    "huge-alpha.yaml": "alphas 1e+308 is out of range for relative alphas",
    "huge-max-new-tokens.yaml": "max_new_tokens must be an integer in [1, 4096]",
    "device-map-cuda7.yaml": "on 'cuda:7' but this machine has",
    "random-direction-file.yaml": "is not a valid safetensors direction file",
}


@pytest.mark.parametrize("name, message", ISSUE_23_SPECS.items())
def test_corpus_specs_fail_in_the_dry_run(tiny_dir, tmp_path, name, message):
    """What a run would die on late is refused by `--dry-run` too, by the same checks (on the tiny model)."""
    data = yaml.safe_load((CORPUS / "specs" / name).read_text())
    data["models"] = [str(tiny_dir / "tiny")]
    if "directions" in data:
        data["directions"]["path"] = str(Path(__file__).parent.parent / data["directions"]["path"])
    (tmp_path / name).write_text(yaml.safe_dump(data))
    cli_err(["run", str(tmp_path / name), "--store", str(tmp_path / "s.sqlite"), "--dry-run"], message)
    assert not (tmp_path / "s.sqlite").exists()


@pytest.mark.parametrize("path", corpus("directions"), ids=lambda p: p.name)
def test_corpus_direction_files_fail_before_the_model_loads(path):
    cli_err(["generate", "--model", "no-such-model", "-p", "hi", "--directions", str(path), "-l", "1"], path.name)


@pytest.mark.parametrize("path", [p for p in corpus("stores") if p.suffix == ".sqlite" and p.stat().st_size],
                         ids=lambda p: p.name)  # fmt: skip
def test_corpus_stores_are_never_adopted_by_run(tiny_dir, tmp_path, path):
    """`run` refuses every non-empty store of the corpus (another tool's database too) and leaves it unchanged."""
    store = tmp_path / path.name
    store.write_bytes(path.read_bytes())
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({"name": "t", "models": [str(tiny_dir / "tiny")], "prompts": {"n": 35},
                                    "studies": [{"kind": "readability"}]}))  # fmt: skip
    cli_err(["run", str(spec), "--store", str(store)], path.name)
    assert store.read_bytes() == path.read_bytes()


NUMBERS = st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)


@given(st.integers(-(2**70), 2**70), NUMBERS)
def test_spec_and_cli_share_the_number_checks(seed, alpha):
    """A spec refuses a seed or an alpha exactly when the CLI's check (the same function) does, with its message."""
    expected = []
    for check, args in ((validation.seed, (seed, "seed")), (validation.alpha, (alpha, "relative", "alpha"))):
        try:
            check(*args)
        except validation.InvalidValue as exc:
            expected.append(str(exc))
    data = {"name": "f", "models": ["m"], "seed": seed, "studies": [{"kind": "sign", "layer": 1, "alpha": alpha}]}
    try:
        parse_spec(data)
    except CrystallizedSafetyError as exc:
        assert expected, exc
        assert str(exc).endswith(expected[0]) or not math.isfinite(alpha), (str(exc), expected)
        return
    assert not expected


FLOAT_OVERFLOW = 2**1024 - 2**970  # the smallest int that float() refuses (rounds past the largest float)


@given(st.booleans() | st.integers(-(10**400), 10**400) | st.floats() | st.none() | st.text(max_size=2)
       | st.sampled_from([FLOAT_OVERFLOW - 1, FLOAT_OVERFLOW, -FLOAT_OVERFLOW, 1, 0, -1]))  # fmt: skip
def test_the_shared_number_predicates(value):
    """`validation.is_int` / `is_positive_int` / `is_real`, behind every integer and number check of the package:
    a bool is never a number, an int within bounds is an int, and finite means float() gives a finite number (an
    int too large for a float is not finite, not an OverflowError)."""
    exact_int, real = type(value) is int, type(value) in (int, float)
    assert validation.is_int(value) is exact_int
    assert validation.is_positive_int(value) is (exact_int and value >= 1)
    assert validation.is_int(value, -3, 3) is (exact_int and -3 <= value <= 3)
    assert validation.is_int(value, low=0) is (exact_int and value >= 0)
    assert validation.is_real(value) is real
    finite = real and (abs(value) < FLOAT_OVERFLOW if exact_int else math.isfinite(value))
    assert validation.is_real(value, finite=True) is finite


CHECKS = {  # what each numeric option of `generate` accepts (here without --directions: --subspace only 0)
    "--temperature": lambda v: validation.finite(float(v), "t", 0.0, 2.0, low_open=True),
    "--top-p": lambda v: validation.finite(float(v), "p", 0.0, 1.0, low_open=True),
    "--seed": lambda v: validation.seed(int(v)),
    "--batch-size": lambda v: validation.positive_int(int(v), "b"),
    "--max-new-tokens": lambda v: validation.max_new_tokens(int(v)),
    "--subspace": lambda v: validation.integer(int(v), "s", 0, 0),
}
VALUES = ["nan", "inf", "-inf", "0", "-1", "-3", "1e400", "0.5", "1", "2", "3", "4097", "1" + "0" * 29]


@given(st.sampled_from(sorted(CHECKS)), st.sampled_from(VALUES))
def test_generate_numbers_are_checked_before_the_model_loads(option, value):
    """Every numeric option of `generate`: a valid value gets as far as the model (unknown here), a bad one is one
    `error:` line naming the option, before the model loads; never a traceback, never exit 0."""
    from typer.testing import CliRunner

    from crystallized_safety.cli import app

    try:
        CHECKS[option](value)
        valid = True
    except (ValueError, validation.InvalidValue):
        valid = False
    res = CliRunner().invoke(app, ["generate", "--model", "no-such-model", "-p", "hi", "--sample", option, value])
    assert res.exit_code == 2 and "Traceback" not in res.output and res.output.count("error:") == 1, res.output
    assert ("unknown model" in res.output) == valid and (valid or option in res.output), res.output


@pytest.mark.parametrize("path", [p for p in corpus("wal") if p.suffix == ".wal"], ids=lambda p: p.name)
def test_corpus_wal_files_are_checked(tmp_path, path):
    """Each corpus WAL beside the corpus store (4 commits not yet checkpointed): `store check` says what is wrong
    in one line and exits 1, the damaged WAL kept; the intact one reads as 0 problems."""
    from typer.testing import CliRunner

    from crystallized_safety.cli import app

    store = tmp_path / "s.sqlite"
    store.write_bytes((CORPUS / "wal" / "pending.sqlite").read_bytes())
    Path(f"{store}-wal").write_bytes(path.read_bytes())
    result = CliRunner().invoke(app, ["store", "check", "--store", str(store)])
    assert "Traceback" not in result.output
    if path.name == "intact.wal":
        assert result.exit_code == 0 and "0 problems" in result.output, result.output
        return
    problems = [line for line in result.output.splitlines() if line.startswith("problem:")]
    assert result.exit_code == 1 and len(problems) == 1 and "s.sqlite-wal" in problems[0], result.output
    assert Path(f"{store}-wal.damaged").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("path", corpus("http"), ids=lambda p: p.name)
def test_corpus_http_bodies_are_400s(chat_model, path):
    """Deep nesting (25,000 arrays, 5,000 objects, an unclosed array, nesting inside `content`) and a lone
    surrogate in `model`: a 400 whose one-line message can be written out as UTF-8 (no RecursionError, no
    UnicodeEncodeError while answering)."""
    from crystallized_safety.serve.request import error_body

    with pytest.raises(BadRequest) as caught:
        parse_request(decode_body(path.read_bytes()), chat_model, "tiny", 64)
    error = caught.value
    assert error.status == 400 and "\n" not in error.message and len(error.message) < 400
    json.dumps(error_body(error.message, param=error.param), ensure_ascii=False).encode("utf-8")
