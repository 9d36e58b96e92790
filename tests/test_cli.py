"""CLI: the three commands on a tiny local model, and every bad input -> one line, exit code 2."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import HARMFUL, HARMLESS, cli_err, cli_ok, make_tiny
from crystallized_safety.core.directions import DirectionBank


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    chat, plain = root / "tiny-chat", root / "tiny-plain"
    for path, with_chat in ((chat, True), (plain, False)):
        model = make_tiny("llama", chat=with_chat)
        model.hf.save_pretrained(path)
        model.tokenizer.save_pretrained(path)
    (root / "harmful.txt").write_text("\n".join(HARMFUL) + "\n")
    (root / "harmless.txt").write_text("\n".join(HARMLESS) + "\n")
    (root / "empty.txt").write_text("\n# only a comment\n")
    (root / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in HARMFUL[:2]) + "\n")
    return root


_ok, _err = cli_ok, cli_err


def test_models_lists_registry():
    out = _ok(["models"]).output
    for alias in ("smollm2-135m", "gemma-2-9b", "mistral-7b"):
        assert alias in out


def test_extract_then_generate(files, tmp_path):
    out = tmp_path / "d.safetensors"
    _ok(
        [
            "extract",
            "--model",
            str(files / "tiny-chat"),
            "--harmful",
            str(files / "harmful.txt"),
            "--harmless",
            str(files / "harmless.txt"),
            "--out",
            str(out),
            "--layers",
            "1,2",
        ]
    )
    bank = DirectionBank.load(out)
    assert bank.layers == [1, 2] and bank.directions.shape == (2, 64)
    res = _ok(
        [
            "generate",
            "--model",
            str(files / "tiny-chat"),
            "--prompts",
            str(files / "prompts.jsonl"),
            "--directions",
            str(out),
            "--layer",
            "1",
            "--alpha",
            "-4",
            "--max-new-tokens",
            "5",
            "--json",
        ]
    )
    lines = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert [r["prompt"] for r in lines] == HARMFUL[:2]
    assert all(isinstance(r["response"], str) and r["n_tokens"] <= 5 and r["alpha"] == -4 for r in lines)


def test_bad_inputs_one_line_exit_2(files, tmp_path):
    chat = str(files / "tiny-chat")
    h, n = str(files / "harmful.txt"), str(files / "harmless.txt")
    good = tmp_path / "good.safetensors"
    _ok(["extract", "--model", chat, "--harmful", h, "--harmless", n, "--out", str(good)])
    _err(["generate", "--model", "no-such-model", "--prompt", "hi"], "unknown model 'no-such-model'")
    _err(
        ["generate", "--model", chat, "--prompt", "hi", "--directions", str(good), "--layer", "9", "--alpha", "1"],
        "layer 9 is out of range",
    )
    _err(
        [
            "extract",
            "--model",
            chat,
            "--harmful",
            h,
            "--harmless",
            n,
            "--out",
            str(tmp_path / "x.safetensors"),
            "--layers",
            "0,12",
        ],
        "layer 12 is out of range",
    )
    small = tmp_path / "small.safetensors"
    DirectionBank(directions=torch.eye(4, 32), layers=[0, 1, 2, 3]).save(small)
    _err(
        ["generate", "--model", chat, "--prompt", "hi", "--directions", str(small), "--layer", "1", "--alpha", "1"],
        "hidden size 32",
    )
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage")
    _err(
        ["generate", "--model", chat, "--prompt", "hi", "--directions", str(corrupt), "--layer", "1", "--alpha", "1"],
        "not a valid safetensors",
    )
    notst = tmp_path / "vec.npy"
    notst.write_bytes(b"\x93NUMPY")
    _err(
        ["generate", "--model", chat, "--prompt", "hi", "--directions", str(notst), "--layer", "1", "--alpha", "1"],
        "not a valid safetensors",
    )
    _err(
        ["extract", "--model", chat, "--harmful", str(files / "empty.txt"), "--harmless", n, "--out", str(good)],
        "no prompts found",
    )
    _err(
        ["extract", "--model", chat, "--harmful", h, "--harmless", h, "--out", str(tmp_path / "new.safetensors")],
        "identical",
    )
    _err(["generate", "--model", str(files / "tiny-plain"), "--prompt", "hi"], "no chat template; pass --raw")
    _ok(["generate", "--model", str(files / "tiny-plain"), "--prompt", "hi", "--raw", "--max-new-tokens", "2"])
    _err(["generate", "--model", chat, "--prompt", "hi", "--layer", "1", "--alpha", "2"], "need --directions")
    _err(["generate", "--model", chat], "no prompt given")
    _err(
        ["extract", "--model", chat, "--harmful", h, "--harmless", n, "--out", str(tmp_path / "x.pt")],
        "--out must end in .safetensors",
    )
    _err(
        [
            "generate",
            "--model",
            chat,
            "--prompt",
            "hi",
            "--directions",
            str(good),
            "--layer",
            "1",
            "--alpha",
            "1",
            "--mode",
            "subtract",
        ],
        "unknown mode",
    )


def test_models_table_fits_80_columns(monkeypatch):
    from crystallized_safety.registry import registry

    monkeypatch.setenv("COLUMNS", "80")
    out = _ok(["models"]).output
    assert max(len(line) for line in out.splitlines()) <= 80
    for entry in registry().values():  # nothing folded: every alias and source on one line
        assert any(entry.alias in line and entry.source in line for line in out.splitlines()), entry.alias


def test_eval_refusal_json_per_prompt_records_with_coherence(files):
    args = ["eval-refusal", "--model", str(files / "tiny-chat"), "--prompts", str(files / "harmful.txt"),
            "--max-new-tokens", "6", "--calibration", str(files / "harmless.txt"), "--json"]  # fmt: skip
    lines = [json.loads(line) for line in _ok(args).stdout.splitlines()]
    records, summary = lines[:-1], lines[-1]
    assert [r["prompt"] for r in records] == HARMFUL
    for r in records:
        assert set(r) >= {"response", "refusal", "reason", "coherent", "coherence", "perplexity", "n_tokens"}
    refused = sum(r["refusal"] is True for r in records)
    coherent_compliance = sum(r["refusal"] is False and r["coherent"] for r in records)
    assert (summary["k"], summary["n"]) == (refused, len(HARMFUL))
    assert summary["coherent_compliance"]["k"] == coherent_compliance
    assert summary["incoherent"] == sum(not r["coherent"] for r in records)
    assert summary["coherence_thresholds"]["n_calibration"] >= 1
    no_gate = [json.loads(line) for line in _ok([*args, "--no-coherence"]).stdout.splitlines()]
    assert "coherent" not in no_gate[0] and "coherent_compliance" not in no_gate[-1]
    assert [r["response"] for r in no_gate[:-1]] == [r["response"] for r in records]


def test_generate_and_serve_share_one_steering_option_block():
    """`steering_options` puts the one declared block in both commands, in place: same options, defaults and help
    (serve has no --subspace), and the command body gets them as one `Steering`."""
    import typer.main

    from crystallized_safety.cli import app

    group = typer.main.get_command(app)
    steering = ["--directions", "--layer", "--alpha", "--mode", "--positions", "--alpha-unit", "--ablate-to"]

    def options(name: str) -> dict[str, tuple]:
        command = group.commands[name]  # type: ignore[attr-defined]
        return {p.opts[0]: (p.default, p.help) for p in command.params if p.param_type_name == "option"}

    generate, serve = options("generate"), options("serve")
    assert [o for o in generate if o in steering + ["--subspace"]] == steering + ["--subspace"]
    assert [o for o in serve if o in steering + ["--subspace"]] == steering
    assert {o: generate[o] for o in steering} == {o: serve[o] for o in steering}
    assert list(generate)[list(generate).index("--dedupe") + 1] == "--directions"  # where the block always was
    assert list(serve)[list(serve).index("--served-name") + 1] == "--directions"
