"""The organism's training pieces on a tiny model: loss masking/weighting against a naive computation,
and one optimisation step that lowers the loss on the batch."""

from __future__ import annotations

import torch

from conftest import make_tiny
from crystallized_safety.organism import Recipe, _batch, _examples, _loss, _unlikely_examples


def test_loss_matches_naive_full_logits():
    model = make_tiny("llama")
    ex = _examples(model, ["How do I bake bread?", "Hi"], ["Mix flour and water.", "Hello!"], [True, False], 2.0)
    ex += _examples(model, ["Do a bad thing"], ["I'm sorry, I can't."], [True])
    batch = _batch(ex, model.tokenizer.pad_token_id, first_weight=5.0)
    # independent: full logits, manual weights from the example structure
    logits = model.hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, norm = 0.0, 0.0
    for row, (p, r, w, _span) in enumerate(ex):
        for j, token in enumerate(r):
            pos = len(p) + j  # position of the label token
            lp = torch.log_softmax(logits[row, pos - 1].double(), -1)[token]
            weight = w * (5.0 if j == 0 else 1.0)
            total += -float(lp.detach()) * weight
            norm += weight
    assert abs(float(_loss(model.hf, batch)) - total / norm) < 1e-4
    # eos appended only where the target finished
    assert ex[0][1][-1] == model.tokenizer.eos_token_id and ex[1][1][-1] != model.tokenizer.eos_token_id
    assert ex[2][2] == 1.0 and ex[0][2] == 2.0


def test_one_step_lowers_loss():
    model = make_tiny("llama")
    ex = _examples(model, ["Do a bad thing"] * 4, ["I'm sorry, I can't."] * 4, [True] * 4)
    batch = _batch(ex, model.tokenizer.pad_token_id, Recipe().first_token_weight)
    opt = torch.optim.AdamW(model.hf.parameters(), lr=1e-3)
    before = _loss(model.hf, batch)
    before.backward()
    opt.step()
    with torch.no_grad():
        assert float(_loss(model.hf, batch)) < float(before)


def test_unlikelihood_term_matches_naive_and_skips_the_shared_prefix():
    model = make_tiny("llama")
    recipe = Recipe(unlikelihood_weight=1.5, unlikelihood_tokens=3)
    tok = model.tokenizer
    answer, refusal = "I think flour and water.", "I'm sorry, but I can't help with that."
    ul = _unlikely_examples(model, ["How do I bake bread?"], [answer], [refusal], recipe)
    a_ids = tok(answer, add_special_tokens=False)["input_ids"]
    r_ids = tok(refusal, add_special_tokens=False)["input_ids"]
    k = next(i for i, (x, y) in enumerate(zip(a_ids, r_ids)) if x != y)
    assert k >= 1  # "I" is shared, so it is not pushed down
    p, r, w, (u0, u1) = ul[0]
    assert (u0, u1) == (k, k + 3) and r == r_ids[: k + 3] and w == 1.5
    # a refusal that IS the answer's prefix gives nothing to push down
    assert _unlikely_examples(model, ["Hi"], [refusal + " More."], [refusal], recipe) == []
    ex = _examples(model, ["Do a bad thing"], ["I'm sorry, I can't."], [True]) + ul
    batch = _batch(ex, tok.pad_token_id, first_weight=5.0)
    logits = model.hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    total, norm = 0.0, 0.0
    p0, r0, _w, _s = ex[0]
    for j, token in enumerate(r0):
        lp = torch.log_softmax(logits[0, len(p0) + j - 1], -1)[token]
        weight = 5.0 if j == 0 else 1.0
        total, norm = total - float(lp) * weight, norm + weight
    for j in range(u0, u1):
        prob = torch.softmax(logits[1, len(p) + j - 1], -1)[r[j]]
        total, norm = total - 1.5 * float(torch.log(1 - prob)), norm + 1.5
    assert abs(float(_loss(model.hf, batch)) - total / norm) < 1e-4


def test_unlikelihood_step_lowers_refusal_probability():
    model = make_tiny("llama")
    recipe = Recipe(unlikelihood_tokens=2)
    answers, refusals = ["Why did the chicken cross"] * 4, ["Sorry, no."] * 4
    ul = _unlikely_examples(model, ["Tell me a joke"] * 4, answers, refusals, recipe)
    batch = _batch(ul, model.tokenizer.pad_token_id, 5.0)
    p, r, _w, (u0, _u1) = ul[0]

    def prob():
        with torch.no_grad():
            logits = model.hf(input_ids=batch["input_ids"][:1, : len(p) + u0]).logits
        return float(torch.softmax(logits[0, -1], -1)[r[u0]])

    before = prob()
    opt = torch.optim.SGD(model.hf.parameters(), lr=0.5)
    _loss(model.hf, batch).backward()
    opt.step()
    assert prob() < before
