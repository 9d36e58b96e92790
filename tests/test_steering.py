"""Interventions: exact arithmetic, ablation, multi-layer, per-row alphas, positions, hook cleanup."""

from __future__ import annotations

import pytest
import torch

from conftest import HARMFUL, HARMLESS, make_tiny
from crystallized_safety.core.generation.api import generate
from crystallized_safety.core.steering import Intervention, layer_hooks, steer
from crystallized_safety.errors import InterventionError, LayerError

PROMPTS = HARMFUL[:2] + HARMLESS[:2]


def _block_outputs(model, batch, layers):
    """Plain forward hooks (independent of the package) recording block outputs."""
    outs = {}
    handles = [
        model.layers[i].register_forward_hook(
            lambda m, a, o, i=i: outs.__setitem__(i, (o[0] if isinstance(o, tuple) else o).clone())
        )
        for i in layers
    ]
    try:
        with torch.inference_mode():
            logits = model.hf(**batch).logits
    finally:
        for h in handles:
            h.remove()
    return outs, logits


def _unit(seed, d=64):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_add_is_exactly_original_plus_alpha_v(arch):
    model = make_tiny(arch)
    batch = model.encode(model.format(PROMPTS))
    v = _unit(1)
    ref, _ = _block_outputs(model, batch, [1])  # unsteered output of block 1
    # The hook is registered before the recorder, so the recorder sees the patched output.
    with steer(model, Intervention.single(1, v, 3.5)):
        got, _ = _block_outputs(model, batch, [1])
    assert torch.equal(got[1], ref[1] + 3.5 * v)


def test_ablation_leaves_zero_projection_and_target(tiny_llama):
    model = tiny_llama
    batch = model.encode(model.format(PROMPTS))
    v = _unit(2)
    with steer(model, Intervention.single(2, v, 0.0, mode="ablate")):
        got, _ = _block_outputs(model, batch, [2])
    assert (got[2] @ v).abs().max() < 1e-5
    with steer(model, Intervention(directions={2: v}, mode="ablate", ablate_to={2: 1.25})):
        got, _ = _block_outputs(model, batch, [2])
    torch.testing.assert_close(got[2] @ v, torch.full(got[2].shape[:2], 1.25), atol=1e-5, rtol=0)
    with steer(model, Intervention.single(2, v, 2.0, mode="ablate_add")):
        got, _ = _block_outputs(model, batch, [2])
    torch.testing.assert_close(got[2] @ v, torch.full(got[2].shape[:2], 2.0), atol=1e-5, rtol=0)


def test_multilayer_matches_manual_hooks(tiny_llama):
    model = tiny_llama
    batch = model.encode(model.format(PROMPTS))
    v0, v2 = _unit(3), _unit(4)
    handles = [
        model.layers[0].register_forward_hook(
            lambda m, a, o: o + 2.0 * v0 if not isinstance(o, tuple) else (o[0] + 2.0 * v0, *o[1:])
        ),
        model.layers[2].register_forward_hook(
            lambda m, a, o: o + 2.0 * 0.5 * v2 if not isinstance(o, tuple) else (o[0] + 1.0 * v2, *o[1:])
        ),
    ]
    try:
        with torch.inference_mode():
            ref = model.hf(**batch).logits
    finally:
        for h in handles:
            h.remove()
    iv = Intervention(directions={0: v0, 2: v2}, alpha=2.0, layer_weights={2: 0.5})
    with steer(model, iv), torch.inference_mode():
        got = model.hf(**batch).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_relative_alpha_scales_by_layer_norm(tiny_llama):
    model = tiny_llama
    batch = model.encode(model.format(PROMPTS))
    v = _unit(5)
    with steer(model, Intervention.single(1, v, 0.5, alpha_unit="relative", layer_norms={1: 8.0})):
        got, _ = _block_outputs(model, batch, [1])
    ref, _ = _block_outputs(model, batch, [1])
    torch.testing.assert_close(got[1], ref[1] + 4.0 * v)
    with pytest.raises(InterventionError, match="relative alpha needs"):
        Intervention.single(1, v, 0.5, alpha_unit="relative")


def test_per_row_alphas_equal_separate_runs(tiny_llama):
    model = tiny_llama
    v = _unit(6)
    alphas = [0.0, 4.0, -4.0, 8.0]
    batched = generate(model, PROMPTS, Intervention.single(1, v, alphas), max_new_tokens=8)
    for row, a in enumerate(alphas):
        alone = generate(model, PROMPTS, Intervention.single(1, v, a), max_new_tokens=8)
        assert batched[row].token_ids == alone[row].token_ids
    # per-row directions: row i steered along its own vector == that vector for everyone
    vs = torch.stack([_unit(10 + i) for i in range(4)])
    per_row = generate(model, PROMPTS, Intervention(directions={1: vs}, alpha=6.0), max_new_tokens=8)
    for row in range(4):
        shared = generate(model, PROMPTS, Intervention.single(1, vs[row], 6.0), max_new_tokens=8)
        assert per_row[row].token_ids == shared[row].token_ids
    # and micro-batching an intervention with per-row values gives the same tokens
    small = generate(model, PROMPTS, Intervention.single(1, v, alphas), max_new_tokens=8, batch_size=1)
    for a, b in zip(
        small,
        [generate(model, [p], Intervention.single(1, v, [al]), max_new_tokens=8)[0] for p, al in zip(PROMPTS, alphas)],
    ):
        assert a.token_ids == b.token_ids


def test_positions_prompt_and_generated(tiny_llama):
    model = tiny_llama
    v = _unit(7)
    base = generate(model, PROMPTS, None, max_new_tokens=6)
    big = 30.0
    gen_only = generate(model, PROMPTS, Intervention.single(1, v, big, positions="generated"), max_new_tokens=6)
    prompt_only = generate(model, PROMPTS, Intervention.single(1, v, big, positions="prompt"), max_new_tokens=6)
    everywhere = generate(model, PROMPTS, Intervention.single(1, v, big), max_new_tokens=6)
    # the first generated token depends only on prompt positions
    assert [g.token_ids[0] for g in gen_only] == [g.token_ids[0] for g in base]
    assert [g.token_ids[0] for g in prompt_only] == [g.token_ids[0] for g in everywhere]
    assert [g.token_ids for g in everywhere] != [g.token_ids for g in base]


def test_hooks_removed_even_on_exception(tiny_llama):
    model = tiny_llama
    before = [len(layer._forward_hooks) for layer in model.layers]
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, Intervention(directions={0: _unit(1), 3: _unit(2)}, alpha=1.0)):
            assert len(model.layers[0]._forward_hooks) == before[0] + 1
            raise RuntimeError("boom")
    with pytest.raises(LayerError):
        with layer_hooks(model, {0: lambda h: None, 9: lambda h: None}):
            pass
    assert [len(layer._forward_hooks) for layer in model.layers] == before


def test_intervention_validation(tiny_llama):
    with pytest.raises(InterventionError, match="hidden size 64"):
        with steer(tiny_llama, Intervention.single(1, torch.ones(32), 1.0)):
            pass
    with pytest.raises(InterventionError, match="unknown mode"):
        Intervention.single(1, _unit(1), 1.0, mode="subtract")
    with pytest.raises(InterventionError, match="NaN"):
        Intervention.single(1, torch.full((64,), float("nan")), 1.0)
    with pytest.raises(InterventionError, match="3 per-row values but the batch has 4"):
        generate(tiny_llama, PROMPTS, Intervention.single(1, _unit(1), [1.0, 2.0, 3.0]), max_new_tokens=2)
    with pytest.raises(LayerError, match="out of range"):
        generate(tiny_llama, PROMPTS, Intervention.single(7, _unit(1), 1.0), max_new_tokens=2)


def _plain_generate(hf, tok, batch, max_new_tokens: int) -> list[tuple[list[int], bool]]:
    """Plain greedy `hf.generate` on a left-padded batch: each row's new tokens cut before its first EOS, and
    whether it hit one (what the package's `Generation` holds)."""
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    rows = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        cut = next((i for i, t in enumerate(row) if t == tok.eos_token_id), None)
        rows.append((row if cut is None else row[:cut], cut is not None))
    return rows


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_steer_a_plain_hugging_face_model_equals_the_model_path(arch):
    """`steer(hf_model, iv)` on a plain `PreTrainedModel` (blocks found structurally: `model.layers` for Llama,
    `transformer.h` for GPT-2) around plain `hf.generate` gives token for token what the package's `generate`
    gives on the project's `Model` under the same intervention: alpha x direction added at a layer, directional
    ablation (to zero and to a target), and nothing at all once the block is left."""
    model = make_tiny(arch)
    hf, tok = model.hf, model.tokenizer
    assert type(hf).__module__.startswith("transformers.")  # a plain Hugging Face model, not the package's
    batch = model.encode(model.format(PROMPTS))
    v = _unit(8)
    unsteered = _plain_generate(hf, tok, batch, 8)
    interventions = [
        Intervention.single(1, v, 8.0),
        Intervention.single(2, v, 0.0, mode="ablate"),
        Intervention(directions={2: v}, mode="ablate", ablate_to={2: 1.5}),
    ]
    for iv in interventions:
        with steer(hf, iv):
            plain = _plain_generate(hf, tok, batch, 8)
        assert plain == [(list(g.token_ids), g.finished) for g in generate(model, PROMPTS, iv, max_new_tokens=8)]
        assert [len(block._forward_hooks) for block in model.layers] == [0] * model.n_layers
    with steer(hf, interventions[0]):
        assert _plain_generate(hf, tok, batch, 8) != unsteered  # the steering does something
    assert _plain_generate(hf, tok, batch, 8) == unsteered
    with pytest.raises(LayerError, match="out of range"), steer(hf, Intervention.single(9, v, 1.0)):
        pass
    with pytest.raises(InterventionError, match="cannot steer a str"), steer("gpt2", interventions[0]):
        pass
