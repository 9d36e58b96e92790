"""Batched generation: left padding, EOS stopping, seeded sampling, OOM back-off."""

from __future__ import annotations

import pytest
import torch

from conftest import HARMFUL, HARMLESS, make_tiny
from crystallized_safety.core.generation import FastEngine
from crystallized_safety.core.generation import api as generation_api
from crystallized_safety.core.generation.api import generate

PROMPTS = HARMFUL[:3] + HARMLESS[:3] + ["Hi"]


@pytest.mark.parametrize("engine", ["fast", "hf"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_equals_one_at_a_time(arch, engine):
    model = make_tiny(arch)
    batched = generate(model, PROMPTS, max_new_tokens=10, batch_size=8, engine=engine)
    for g in batched:
        alone = generate(model, [g.prompt], max_new_tokens=10, engine="hf")[0]
        assert g.token_ids == alone.token_ids
    # independent reference: plain HF greedy generate on the unpadded prompt
    text = model.format([PROMPTS[0]])[0]
    ids = model.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        ref = model.hf.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert list(batched[0].token_ids) == ref[0, ids["input_ids"].shape[1] :].tolist()[: len(batched[0].token_ids)]


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_stops_at_eos(tiny_llama, engine):
    model = tiny_llama
    base = generate(model, PROMPTS, max_new_tokens=12, engine=engine)
    stop = base[0].token_ids[2]  # declare the third greedy token of row 0 an end-of-sequence token
    saved = model.hf.generation_config.eos_token_id
    model.hf.generation_config.eos_token_id = [stop]
    try:
        out = generate(model, PROMPTS, max_new_tokens=12, engine=engine)
    finally:
        model.hf.generation_config.eos_token_id = saved
    for g, b in zip(out, base):
        cut = b.token_ids.index(stop) if stop in b.token_ids else None
        assert g.finished == (cut is not None or b.finished)
        assert g.token_ids == (b.token_ids[:cut] if cut is not None else b.token_ids)
    assert out[0].token_ids == base[0].token_ids[:2] and out[0].finished


def test_seeded_sampling_is_reproducible(tiny_llama):
    a = generate(tiny_llama, PROMPTS, max_new_tokens=8, do_sample=True, seed=3)
    b = generate(tiny_llama, PROMPTS, max_new_tokens=8, do_sample=True, seed=3)
    c = generate(tiny_llama, PROMPTS, max_new_tokens=8, do_sample=True, seed=4)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    state = torch.random.get_rng_state()
    generate(tiny_llama, PROMPTS[:1], max_new_tokens=2, do_sample=True, seed=9)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_batch_size_halves_on_oom(tiny_llama, monkeypatch, engine):
    owner, name = (FastEngine, "generate") if engine == "fast" else (generation_api, "reference_batch")
    real = getattr(owner, name)
    sizes = []

    def fake(*args, **kwargs):
        prompts = args[2] if engine == "fast" else args[1]  # (self, model, prompts, ...) or (model, prompts, ...)
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, fake)
    out = generate(tiny_llama, PROMPTS, max_new_tokens=4, batch_size=8, engine=engine)
    assert sizes[:3] == [7, 3, 2] or sizes[:2] == [7, 4]
    assert [g.prompt for g in out] == PROMPTS
    monkeypatch.setattr(owner, name, real)
    ref = generate(tiny_llama, PROMPTS, max_new_tokens=4, engine=engine)
    assert [g.token_ids for g in out] == [g.token_ids for g in ref]
