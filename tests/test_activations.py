"""Activation capture: one batched left-padded pass == independent per-prompt computations."""

from __future__ import annotations

import pytest
import torch

from conftest import HARMFUL, HARMLESS, make_tiny
from crystallized_safety.core.activations import capture, parse_position
from crystallized_safety.errors import CrystallizedSafetyError

PROMPTS = HARMFUL[:3] + HARMLESS[:3] + ["Hi", "A much longer prompt that forces a lot of left padding on the others."]


def _plain_block_outputs(model, text):
    """Independent reference: plain forward hooks on every block, one prompt, no padding."""
    outs = {}
    handles = [
        layer.register_forward_hook(
            lambda m, a, o, i=i: outs.__setitem__(i, (o[0] if isinstance(o, tuple) else o)[0].clone())
        )
        for i, layer in enumerate(model.layers)
    ]
    try:
        ids = model.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            hs = model.hf(**ids, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    return outs, hs


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_batched_capture_equals_one_at_a_time(arch):
    model = make_tiny(arch)
    got = capture(model, PROMPTS, batch_size=8)
    assert got.acts.shape == (len(PROMPTS), model.n_layers, model.hidden_size)
    texts = model.format(PROMPTS)
    for row, text in enumerate(texts):
        outs, hs = _plain_block_outputs(model, text)
        for layer in range(model.n_layers):
            torch.testing.assert_close(got.acts[row, layer], outs[layer][-1], atol=1e-4, rtol=1e-4)
            if layer < model.n_layers - 1:  # HF's last hidden state has the final norm applied
                torch.testing.assert_close(got.acts[row, layer], hs[layer + 1][0, -1], atol=1e-4, rtol=1e-4)


def test_mean_and_offset_positions(tiny_llama):
    model = tiny_llama
    mean = capture(model, PROMPTS, position="mean", batch_size=3)
    off = capture(model, PROMPTS, position=-2, batch_size=3)
    for row, text in enumerate(model.format(PROMPTS)):
        outs, _ = _plain_block_outputs(model, text)
        for layer in range(model.n_layers):
            # mean over prompt tokens, first token (attention sink / BOS) excluded
            torch.testing.assert_close(mean.acts[row, layer], outs[layer][1:].mean(0), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(off.acts[row, layer], outs[layer][-2], atol=1e-4, rtol=1e-4)


def test_layer_subset_and_resid_norm(tiny_llama):
    full = capture(tiny_llama, PROMPTS)
    part = capture(tiny_llama, PROMPTS, layers=[2, 0])
    torch.testing.assert_close(part.acts[:, 0], full.acts[:, 2])
    torch.testing.assert_close(part.acts[:, 1], full.acts[:, 0])
    # independent mean residual norm over non-first tokens of every prompt
    norms = {i: [] for i in range(tiny_llama.n_layers)}
    for text in tiny_llama.format(PROMPTS):
        outs, _ = _plain_block_outputs(tiny_llama, text)
        for i in norms:
            norms[i].append(outs[i][1:].norm(dim=-1))
    ref = torch.stack([torch.cat(norms[i]).mean() for i in range(tiny_llama.n_layers)])
    torch.testing.assert_close(full.resid_norm, ref, atol=1e-4, rtol=1e-4)


def test_position_errors(tiny_llama):
    with pytest.raises(CrystallizedSafetyError, match="unknown position"):
        parse_position("first")
    with pytest.raises(CrystallizedSafetyError, match="must be negative"):
        parse_position(3)
    assert parse_position("-3") == -3
    with pytest.raises(CrystallizedSafetyError, match="reaches into the user's text"):
        capture(tiny_llama, PROMPTS, position=-10)
    with pytest.raises(CrystallizedSafetyError, match="non-empty"):
        capture(tiny_llama, [])
