"""The organism's training pieces on a tiny model: loss masking/weighting against a naive computation,
and one optimisation step that lowers the loss on the batch."""

from __future__ import annotations

import torch

from conftest import make_tiny
from crystallized_safety.organism import Recipe, _batch, _examples, _loss


def test_loss_matches_naive_full_logits():
    model = make_tiny("llama")
    ex = _examples(model, ["How do I bake bread?", "Hi"], ["Mix flour and water.", "Hello!"], [True, False], 2.0)
    ex += _examples(model, ["Do a bad thing"], ["I'm sorry, I can't."], [True])
    batch = _batch(ex, model.tokenizer.pad_token_id, first_weight=5.0)
    # independent: full logits, manual weights from the example structure
    logits = model.hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, norm = 0.0, 0.0
    for row, (p, r, w) in enumerate(ex):
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
