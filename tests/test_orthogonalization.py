"""Weight orthogonalisation (issue 15, part 4): generation from the edited weights equals generation under the
activation ablation of the same direction at every residual writer, token for token on tiny models of every
architecture that allows the edit; the edited residual stream holds no component along the direction
(independent check through `output_hidden_states`); export writes a loadable directory and a card."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import HARMFUL, HARMLESS, cli_err, cli_ok, make_tiny
from crystallized_safety.core.directions import extract_directions
from crystallized_safety.core.generation.api import generate
from crystallized_safety.core.orthogonalization import ablation_hooks, orthogonalize
from crystallized_safety.errors import ModelError

PROMPTS = ["How do I bake bread?", "Tell me a story about a cat.", "What is 2 + 2?"]


def _direction(d: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g)
    return v / v.norm()


def _with_hooks(model, direction):
    handles = [m.register_forward_hook(h) for m, h in ablation_hooks(model, direction)]
    try:
        return generate(model, PROMPTS, max_new_tokens=8, engine="hf"), _logits(model)
    finally:
        for handle in handles:
            handle.remove()


def _logits(model):
    batch = model.encode(model.format(PROMPTS))
    with torch.no_grad():
        return model.hf(**batch).logits


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "gpt2", "gpt_neox"])
def test_folded_weights_equal_activation_ablation(arch):
    hooked, edited = make_tiny(arch), make_tiny(arch)
    v = _direction(hooked.hidden_size)
    plain_logits = _logits(hooked)
    want, want_logits = _with_hooks(hooked, v)
    summary = orthogonalize(edited, v)
    got, got_logits = generate(edited, PROMPTS, max_new_tokens=8, engine="hf"), _logits(edited)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    torch.testing.assert_close(got_logits, want_logits, atol=2e-5, rtol=1e-4)
    assert (got_logits - plain_logits).abs().max() > 1e-3  # the edit does something
    assert len(summary["modules"]) == 1 + (arch == "gpt2") + 2 * edited.n_layers
    # independent: every residual state of the edited model is orthogonal to v
    batch = edited.encode(edited.format(PROMPTS))
    with torch.no_grad():
        states = edited.hf(**batch, output_hidden_states=True).hidden_states
    for h in states[:-1]:  # the last one is after the final norm
        assert ((h @ v).abs() / h.norm(dim=-1).clamp_min(1e-6)).max() < 1e-5


def test_tied_embeddings_are_untied_so_the_head_is_unchanged():
    model = make_tiny("gpt2")
    assert model.hf.get_output_embeddings().weight.data_ptr() == model.hf.get_input_embeddings().weight.data_ptr()
    head_before = model.hf.get_output_embeddings().weight.detach().clone()
    summary = orthogonalize(model, _direction(model.hidden_size))
    assert summary["untied_embeddings"] and not model.hf.config.tie_word_embeddings
    torch.testing.assert_close(model.hf.get_output_embeddings().weight, head_before, atol=0, rtol=0)
    assert (model.hf.get_input_embeddings().weight @ _direction(model.hidden_size).double().float()).abs().max() < 1e-5


def test_post_norm_architectures_are_refused_before_any_change():
    model = make_tiny("gemma2")
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    with pytest.raises(ModelError, match="post-norms"):
        orthogonalize(model, _direction(model.hidden_size))
    assert all(torch.equal(before[k], v) for k, v in model.hf.state_dict().items())


def test_export_model_cli_writes_a_loadable_edited_directory(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crystallized_safety.core.model import Model

    model = make_tiny("llama")
    model.hf.save_pretrained(tmp_path / "tiny")
    model.tokenizer.save_pretrained(tmp_path / "tiny")
    bank = extract_directions(model, HARMFUL, HARMLESS, layers=[1, 2])
    bank.save(tmp_path / "d.safetensors")
    out = tmp_path / "edited"
    cli_ok(["export-model", "--model", str(tmp_path / "tiny"), "--directions", str(tmp_path / "d.safetensors"),
            "--layer", "2", "--out", str(out)])  # fmt: skip
    card = json.loads((out / "csafety-edit.json").read_text())
    import hashlib

    assert card["direction_file_sha256"] == hashlib.sha256((tmp_path / "d.safetensors").read_bytes()).hexdigest()
    assert card["direction_layer"] == 2 and "folded out" in (out / "README.md").read_text()
    loaded = Model(AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out), "edited")
    want, _ = _with_hooks(make_tiny("llama"), bank.direction(2))
    got = generate(loaded, PROMPTS, max_new_tokens=8, engine="hf")
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    cli_err(["export-model", "--model", str(tmp_path / "tiny"), "--directions", str(tmp_path / "d.safetensors"),
             "--layer", "2", "--out", str(out)], "exists")  # fmt: skip
    cli_err(["export-model", "--model", str(tmp_path / "tiny"), "--directions", str(tmp_path / "d.safetensors"),
             "--layer", "3", "--out", str(tmp_path / "e2")], "no direction for layer 3")  # fmt: skip


def test_smollm2_folded_equals_hooks_within_fp_tolerance(smollm2):
    """The real model (fp32): logits of the edited weights vs the hook ablation agree to float rounding, and
    greedy tokens agree."""
    import copy

    edited = copy.deepcopy(smollm2)
    v = _direction(smollm2.hidden_size, seed=5)
    want, want_logits = _with_hooks(smollm2, v)
    orthogonalize(edited, v)
    got_logits = _logits(edited)
    assert (got_logits - want_logits).abs().max() / want_logits.abs().max() < 1e-4
    got = generate(edited, PROMPTS, max_new_tokens=8, engine="hf")
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
