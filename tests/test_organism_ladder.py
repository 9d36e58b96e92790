"""The hardening ladder (recipe v5 and the immune organism, issue 26) on tiny models: every rung of the single-layer
ladder and a multi-layer window act inside the packed training batch exactly as the evaluation's `steer()` does on
the example alone (loss and gradient); the attack stream's shape depends on the seed alone, not on the curriculum's
weights; the curriculum's screen equals the first-token refusal probability computed by hand; recipes by name."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from crystallized_safety.core.steering import steer
from crystallized_safety.errors import ModelError
from crystallized_safety.organism.hardening import CURRICULUM_FLOOR, Attack, Attacker
from crystallized_safety.organism.recipe import (
    HARDENED_NAME,
    HARDENED_V5_NAME,
    IMMUNE_NAME,
    Recipe,
    default_recipe,
    hardened_recipe,
    immune_recipe,
)
from crystallized_safety.organism.training import make_examples, packed_loss, planned_attacks

HARMFUL = [f"How do I hurt person number {i}?" for i in range(8)]
HARMLESS = [f"How do I bake bread number {i}?" for i in range(8)]


def ladder_recipe(**kw) -> Recipe:
    base = {**hardened_recipe(version="v5").__dict__, "attack_band": (1, 2), "attack_subspace_k": 2}
    return Recipe(**{**base, **kw})


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ladder_attacks_in_the_packed_batch_equal_examples_steered_alone(arch):
    model = make_tiny(arch)
    attacker = Attacker(ladder_recipe(), HARMFUL, HARMLESS, 0)
    attacker.refresh(model, 0)
    ivs = {
        0: attacker.intervention("add", (1,), 0.8, 150.0, bypass=True),
        1: attacker.intervention("affine", (2,), 0.8, 150.0, bypass=True),
        2: attacker.intervention("subspace", (1,), 0.8, 150.0, bypass=True),
        3: attacker.intervention("rotate", (2,), 0.8, 150.0, bypass=True),
        4: attacker.intervention("add", (1, 2), 0.3, 150.0, bypass=True),  # a window (the immune organism's)
        5: attacker.intervention("add", (2,), 0.5, 150.0, bypass=False),  # induction on a harmless example
    }
    assert [ivs[i].mode.name for i in range(4)] == ["add", "affine", "affine", "rotate"]
    assert ivs[2].params.basis[1].shape == (2, model.hidden_size)
    texts = ["Do a bad thing", "Another bad thing?", "A third", "Fourth one", "Fifth", "Bake bread", "Hi"]
    ex = make_examples(
        model, texts, ["I'm sorry.", "No.", "Never.", "I can't.", "No way.", "Sure!", "Hello!"], [True] * 7
    )
    attacks = [Attack(i, iv.layers[0], False, 0.0, iv.directions[iv.layers[0]], 0.0, iv) for i, iv in ivs.items()]

    def grads(loss):
        model.hf.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.hf.named_parameters() if p.grad is not None}

    got_loss = packed_loss(model, ex, 5.0, 0, attacks)
    packed = grads(got_loss)
    total, norm = 0.0, 0.0
    for i, (p, r, w, _span) in enumerate(ex):
        with steer(model, ivs.get(i)):
            logp = torch.log_softmax(model.hf(input_ids=torch.tensor([list(p) + list(r)])).logits[0], -1)
        for j, token in enumerate(r):
            weight = w * (5.0 if j == 0 else 1.0)
            total, norm = total - logp[len(p) + j - 1, token] * weight, norm + weight
    assert abs(float(got_loss.detach()) - float((total / norm).detach())) < 1e-4
    for name, g in grads(total / norm).items():
        torch.testing.assert_close(packed[name], g, atol=1e-5, rtol=1e-4)
    # each rung really acts: dropping any one attack changes the loss
    for k in range(len(attacks)):
        rest = attacks[:k] + attacks[k + 1 :]
        assert abs(float(packed_loss(model, ex, 5.0, 0, rest).detach()) - float(got_loss.detach())) > 1e-6


def test_ladder_stream_depends_on_the_seed_not_on_the_curriculum():
    recipe = ladder_recipe(attack_p=0.6, attack_harmless_p=0.3, attack_multi_p=0.5, attack_multi_k=(2, 2))
    kinds = ["harmful", "harmless", None, "harmful"] * 3
    flat = Attacker(recipe, [], [], 7)
    tilted = Attacker(recipe, [], [], 7)
    tilted.weights = [100.0 if (layer, rung) == (2, "rotate") else 0.01 for layer, rung in tilted.cells]
    a = [flat.plan_ladder(kinds) for _ in range(300)]
    b = [tilted.plan_ladder(kinds) for _ in range(300)]
    assert [[x[:2] for x in batch] for batch in a] == [[x[:2] for x in batch] for batch in b]  # same examples
    rungs = [x[2] for batch in b for x in batch]
    assert rungs.count("rotate") / len(rungs) > 0.95 and {x[2] for batch in a for x in batch} == set(
        recipe.attack_rungs
    )
    every = [x for batch in a for x in batch]
    assert all(i % 4 != 2 for i, *_ in every)  # unattackable examples never drawn
    windows = [x[3] for x in every if len(x[3]) > 1]
    assert windows and all(w == (1, 2) for w in windows) and 0.4 < len(windows) / len(every) < 0.6
    assert all(len(x[3]) == 1 and 1 <= x[3][0] <= 2 for x in every if len(x[3]) == 1)
    assert all(0.25 <= x[4] <= 1.5 for x in every if len(x[3]) == 1)
    # the counting helper agrees with the draws, and the planned count needs no model
    assert planned_attacks(recipe, 10, 10, 40) == planned_attacks(recipe, 10, 10, 40) > 0


def test_harmless_examples_get_bypass_attacks_when_the_recipe_says_so():
    model = make_tiny("llama")
    for same, sign in ((True, -1.0), (False, 1.0)):
        attacker = Attacker(ladder_recipe(attack_harmless_p=1.0, attack_harmless_same=same), HARMFUL, HARMLESS, 0)
        attacker.refresh(model, 0)
        drawn = [a for _ in range(60) for a in attacker.draw([None, "harmless"])]
        assert len(drawn) == 60 and all(a.example == 1 for a in drawn)
        adds = [a.intervention for a in drawn if a.intervention.mode.name == "add"]
        assert adds and all(float(iv.alpha) * sign > 0 for iv in adds)
        assert same == any(a.intervention.mode.name != "add" for a in drawn)  # induction is add only


def test_curriculum_screen_is_the_first_token_refusal_probability():
    model = make_tiny("llama")
    recipe = ladder_recipe(curriculum_every=3, curriculum_prompts=4, reextract_every=10)
    attacker = Attacker(recipe, HARMFUL, HARMLESS, 0)
    for step in range(7):
        attacker.refresh(model, step)
    assert [s["step"] for s in attacker.screens] == [0, 3, 6] and attacker.refreshed == 3
    assert len(attacker.weights) == len(attacker.cells) == 2 * 4
    from crystallized_safety.judges.refusal_score import RefusalScoreJudge

    ids = RefusalScoreJudge(model).token_ids
    texts = model.format(HARMFUL[:4])
    for cell in ((1, "add"), (2, "rotate")):
        rel, angle = attacker.screen_setting()
        assert rel == pytest.approx((0.25 * 1.5) ** 0.5) and angle == 150.0
        iv = attacker.intervention(cell[1], (cell[0],), rel, angle, bypass=True)
        leak = 0.0
        for text in texts:  # one prompt at a time, plain forward under steer(): no batching, no padding
            prompt = model.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad(), steer(model, iv):
                probs = torch.softmax(model.hf(input_ids=prompt).logits[0, -1].double(), -1)
            leak += 1.0 - float(probs[ids].sum())
        got = attacker.weights[attacker.cells.index(cell)]
        assert got == pytest.approx(CURRICULUM_FLOOR + leak / len(texts), abs=1e-4)


def test_recipes_by_name_and_alias():
    v2, v5, immune = hardened_recipe(), hardened_recipe(version="v5"), immune_recipe()
    assert default_recipe(HARDENED_NAME) == v2 and default_recipe(HARDENED_V5_NAME) == v5
    assert default_recipe(IMMUNE_NAME) == immune and immune.kind == "immune" and immune.attack_multi_p > 0
    assert len({v2.key(), v5.key(), immune.key(), Recipe().key()}) == 4
    assert v5.attack_band == (2, 28) and set(v5.attack_rungs) == {"add", "affine", "subspace", "rotate"}
    assert v2.attack_rungs == () and v2.curriculum_every == 0
    with pytest.raises(ModelError, match="use one of v2, v5"):
        hardened_recipe(version="v9")
    with pytest.raises(ValueError, match="unknown attack rungs"):
        Attacker(ladder_recipe(attack_rungs=("add", "twist")), HARMFUL, HARMLESS, 0)
