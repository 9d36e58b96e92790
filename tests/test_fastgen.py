"""The sweep engine's decoder (`fastgen`) against the reference path (plain left-padded `model.generate`):
same tokens for packed interventions on every architecture, with each technique switched on and off,
and the prefill dedup really running fewer rows."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, HARMFUL, HARMLESS, make_tiny
from crystallized_safety.core.generation import FastEngine, generate
from crystallized_safety.core.generation.fast import greedy_batch
from crystallized_safety.core.steering import Intervention

PROMPTS = HARMFUL[:3] + HARMLESS[:2] + ["Hi"]


def _pack(model, positions="all", mode="add", layers=(1,)):
    """Three cells x the prompts: baseline (alpha 0), +alpha, -alpha; per-row alphas."""
    torch.manual_seed(1)
    d = model.hidden_size
    directions = {layer: torch.nn.functional.normalize(torch.randn(d), dim=0) for layer in layers}
    n = len(PROMPTS)
    alpha = torch.tensor([0.0] * n + [6.0] * n + [-6.0] * n)
    return PROMPTS * 3, Intervention(directions, alpha=alpha, positions=positions, mode=mode)


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_equals_reference_on_packed_cells(arch):
    model = make_tiny(arch)
    prompts, iv = _pack(model)
    fast = generate(model, prompts, iv, max_new_tokens=12, batch_size=64, engine="fast")
    ref = generate(model, prompts, iv, max_new_tokens=12, batch_size=64, engine="hf")
    assert [g.token_ids for g in fast] == [g.token_ids for g in ref]
    assert [g.finished for g in fast] == [g.finished for g in ref]
    # the cells really differ, so the comparison is not trivially baseline == baseline
    n = len(PROMPTS)
    assert [g.token_ids for g in fast[:n]] != [g.token_ids for g in fast[n : 2 * n]]


@pytest.mark.parametrize("positions", ["prompt", "generated"])
@pytest.mark.parametrize("mode", ["add", "ablate_add"])
def test_fast_equals_reference_for_positions_and_modes(positions, mode):
    model = make_tiny("llama")
    prompts, iv = _pack(model, positions=positions, mode=mode, layers=(0, 2))
    fast = generate(model, prompts, iv, max_new_tokens=10, batch_size=64, engine="fast")
    ref = generate(model, prompts, iv, max_new_tokens=10, batch_size=64, engine="hf")
    assert [g.token_ids for g in fast] == [g.token_ids for g in ref]


@pytest.mark.parametrize(("share_prefix", "compact"), [(False, False), (True, False), (False, True), (True, True)])
def test_each_technique_alone_gives_the_same_tokens(share_prefix, compact):
    model = make_tiny("llama")
    prompts, iv = _pack(model)
    ids = model.tokenizer(model.format(prompts), add_special_tokens=False)["input_ids"]
    eos = model.eos_ids()
    ref = generate(model, prompts, iv, max_new_tokens=10, batch_size=64, engine="hf")
    tokens, ended = greedy_batch(model, ids, iv, 10, eos, share_prefix=share_prefix, compact=compact)
    assert [tuple(t) for t in tokens] == [g.token_ids for g in ref]
    assert ended == [g.finished for g in ref]


def _prefill_rows(model, fn):
    """Rows in each forward call with more than one token (prefill calls)."""
    seen = []
    handle = model.hf.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(tuple(kw["input_ids"].shape)) if kw["input_ids"].shape[1] > 1 else None,
        with_kwargs=True,
    )
    try:
        fn()
    finally:
        handle.remove()
    return seen


def test_prefill_dedup_runs_each_distinct_row_once():
    model = make_tiny("llama")
    n = len(PROMPTS)
    # steering on generated tokens only: the prompt prefill is shared by the three cells
    prompts, iv = _pack(model, positions="generated")
    calls = _prefill_rows(model, lambda: generate(model, prompts, iv, max_new_tokens=4, batch_size=64))
    assert [rows for rows, _len in calls] == [1, n]  # shared template prefix once, then each prompt once
    # steering on every position: one prefix per cell, one suffix per (cell, prompt)
    prompts, iv = _pack(model, positions="all")
    calls = _prefill_rows(model, lambda: generate(model, prompts, iv, max_new_tokens=4, batch_size=64))
    assert [rows for rows, _len in calls] == [3, 3 * n]
    # the shared prefix is the chat-template head, and every suffix keeps at least one token
    texts = model.format(PROMPTS)
    ids = model.tokenizer(texts, add_special_tokens=False)["input_ids"]
    common = next(i for i in range(len(ids[0])) if len({tuple(t[: i + 1]) for t in ids}) > 1)
    assert calls[0][1] == common


def test_compaction_drops_finished_rows():
    model = make_tiny("llama")
    base = generate(model, PROMPTS, max_new_tokens=12)
    stop = base[0].token_ids[1]
    saved = model.hf.generation_config.eos_token_id
    model.hf.generation_config.eos_token_id = [stop]
    decode_rows = []
    handle = model.hf.register_forward_pre_hook(
        lambda _m, _a, kw: decode_rows.append(kw["input_ids"].shape[0]) if kw["input_ids"].shape[1] == 1 else None,
        with_kwargs=True,
    )
    try:
        out = generate(model, PROMPTS, max_new_tokens=12)
    finally:
        handle.remove()
        model.hf.generation_config.eos_token_id = saved
    assert out[0].finished and out[0].token_ids == base[0].token_ids[:1]
    assert decode_rows[0] == len(PROMPTS) and min(decode_rows) < len(PROMPTS)
    assert decode_rows == sorted(decode_rows, reverse=True)


def test_autotune_doubles_until_limit_and_picks_the_cheapest_row():
    from crystallized_safety.core.generation.fast import autotune_rows

    model = make_tiny("llama")
    ids = model.tokenizer(model.format(PROMPTS), add_special_tokens=False)["input_ids"]
    rows, table = autotune_rows(model, ids, 16, start=3, limit=24, tolerance=10.0)
    assert [t["rows"] for t in table] == [3, 6, 12, 24]  # a huge tolerance never stops early
    best = min(table, key=lambda t: t["est_s_per_row"])
    assert rows == best["rows"]
    for t in table:  # the estimate is the probe's arithmetic, not a made-up number
        assert t["est_s_per_row"] == pytest.approx(t["prefill_s_per_row"] + 15 * t["step_s"] / t["rows"])


def test_autotune_stops_at_out_of_memory(monkeypatch):
    from crystallized_safety.core.generation import fast as fastgen

    model = make_tiny("llama")
    ids = model.tokenizer(model.format(PROMPTS), add_special_tokens=False)["input_ids"]
    real = fastgen._step

    def fake(model, ids, *args, **kwargs):
        if ids.shape[0] > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4 GiB")
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(fastgen, "_step", fake)
    rows, table = fastgen.autotune_rows(model, ids, 8, start=2, limit=64, tolerance=10.0)
    assert [t["rows"] for t in table] == [2, 4, 8, 16] and table[-1]["oom"] and rows in (2, 4, 8)


def test_first_logits_from_the_generation_prefill_equal_a_plain_forward():
    """The logits handed to `first_logits` (what run_pack turns into first-token refusal scores) equal a plain,
    unbatched forward of each prompt under its own row's steering."""
    from crystallized_safety.core.steering import steer
    from crystallized_safety.errors import CrystallizedSafetyError

    model = make_tiny("qwen2")
    prompts, iv = _pack(model)
    got: dict[int, torch.Tensor] = {}
    gens = generate(
        model,
        prompts,
        iv,
        max_new_tokens=3,
        batch_size=7,
        engine=FastEngine(on_first_logits=lambda rows, logits: got.__setitem__(rows.start, logits.clone())),
    )
    assert sorted(got) == list(range(0, len(prompts), 7))
    logits = torch.cat([got[k] for k in sorted(got)])
    texts = model.format(prompts)
    for row, text in enumerate(texts):
        ids = model.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode(), steer(model, iv.select(slice(row, row + 1)), batch_rows=1):
            ref = model.hf(**ids).logits[0, -1]
        torch.testing.assert_close(logits[row], ref, atol=1e-4, rtol=1e-4)
        assert gens[row].token_ids[:1] == (int(ref.argmax()),) or gens[row].finished
    with pytest.raises(CrystallizedSafetyError, match="greedily"):
        generate(model, prompts[:2], max_new_tokens=2, do_sample=True, engine=FastEngine(on_first_logits=print))
