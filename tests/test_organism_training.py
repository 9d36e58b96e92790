"""The organism's training pieces on a tiny model: loss masking/weighting against a naive computation
(each example run alone, full logits), the shared-prefix and length-grouped loss equal to it in value and
gradient, and optimisation steps that move the loss the right way."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, assert_packed_equals_steered_alone, make_tiny
from crystallized_safety.organism.recipe import Recipe
from crystallized_safety.organism.training import make_examples as _examples
from crystallized_safety.organism.training import make_unlikely_examples as _unlikely_examples
from crystallized_safety.organism.training import packed_loss as _loss
from crystallized_safety.organism.training import shared_prefix


def _logits_alone(model, p, r):
    """Full logits of one example run alone: no padding, no batching, no shared prefix."""
    return model.hf(input_ids=torch.tensor([list(p) + list(r)])).logits[0].double()


def _prefix(examples):
    return shared_prefix([ex[0] for ex in examples])


@pytest.mark.parametrize("share", [False, True])
def test_loss_matches_naive_full_logits(share):
    model = make_tiny("llama")
    ex = _examples(model, ["How do I bake bread?", "Hi"], ["Mix flour and water.", "Hello!"], [True, False], 2.0)
    ex += _examples(model, ["Do a bad thing"], ["I'm sorry, I can't."], [True])
    total, norm = 0.0, 0.0
    for p, r, w, _span in ex:
        logits = _logits_alone(model, p, r)
        for j, token in enumerate(r):
            pos = len(p) + j  # position of the label token
            lp = torch.log_softmax(logits[pos - 1], -1)[token]
            weight = w * (5.0 if j == 0 else 1.0)
            total += -float(lp.detach()) * weight
            norm += weight
    prefix = _prefix(ex) if share else 0
    assert prefix == (2 if share else 0)  # "<s><|user|>": the prompts' own first letters differ
    assert abs(float(_loss(model, ex, 5.0, prefix)) - total / norm) < 1e-4
    # eos appended only where the target finished
    assert ex[0][1][-1] == model.tokenizer.eos_token_id and ex[1][1][-1] != model.tokenizer.eos_token_id
    assert ex[2][2] == 1.0 and ex[0][2] == 2.0


def _naive_loss(model, examples, first_weight):
    """The same objective computed example by example (each run alone, full logits): the reference."""
    total, norm = 0.0, 0.0
    for p, r, w, (u0, u1) in examples:
        logp = torch.log_softmax(model.hf(input_ids=torch.tensor([list(p) + list(r)])).logits[0], -1)
        for j, token in enumerate(r):
            lp = logp[len(p) + j - 1, token]
            if u1 > u0:
                if u0 <= j < u1:
                    total, norm = total - w * torch.log1p(-lp.exp()), norm + w
            else:
                weight = w * (first_weight if j == 0 else 1.0)
                total, norm = total - lp * weight, norm + weight
    return total / norm


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_loss_and_gradient_equal_examples_run_alone(arch):
    """Packing the batch into one sequence (shared prefix once, block mask, restarted positions) changes the
    work, not the maths: the same loss and the same gradient on every parameter as running each example
    alone, with and without a shared prefix."""
    model = make_tiny(arch)
    prompts = ["How do I bake bread?", "Hi", "Do a bad thing", "Tell me a long story about a cat"]
    ex = _examples(model, prompts, ["Mix flour.", "Hello there, friend!", "I'm sorry.", "Once"], [True] * 4, 2.0)
    ex += [(p, r[:3], 1.5, (1, 3)) for p, r, _w, _s in _examples(model, prompts[:2], ["No way."] * 2, [True] * 2)]
    prefix = _prefix(ex)
    assert prefix > 0

    def grads(loss):
        model.hf.zero_grad(set_to_none=True)
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.hf.named_parameters() if p.grad is not None}

    ref_loss, ref = grads(_naive_loss(model, ex, 5.0))
    for k in (0, prefix):
        loss, got = grads(_loss(model, ex, 5.0, k))
        assert abs(loss - ref_loss) < 1e-5
        assert got.keys() == ref.keys() and len(ref) > 0
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], atol=2e-5, rtol=1e-4, msg=name)


def test_one_step_lowers_loss():
    model = make_tiny("llama")
    ex = _examples(model, ["Do a bad thing"] * 4, ["I'm sorry, I can't."] * 4, [True] * 4)
    first = Recipe().first_token_weight
    opt = torch.optim.AdamW(model.hf.parameters(), lr=1e-3)
    before = _loss(model, ex, first, _prefix(ex))
    before.backward()
    opt.step()
    with torch.no_grad():
        assert float(_loss(model, ex, first, _prefix(ex))) < float(before)


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
    total, norm = 0.0, 0.0
    p0, r0, _w, _s = ex[0]
    logits = _logits_alone(model, p0, r0).detach()
    for j, token in enumerate(r0):
        lp = torch.log_softmax(logits[len(p0) + j - 1], -1)[token]
        weight = 5.0 if j == 0 else 1.0
        total, norm = total - float(lp) * weight, norm + weight
    logits = _logits_alone(model, p, r).detach()
    for j in range(u0, u1):
        prob = torch.softmax(logits[len(p) + j - 1], -1)[r[j]]
        total, norm = total - 1.5 * float(torch.log(1 - prob)), norm + 1.5
    for prefix in (0, _prefix(ex)):
        assert abs(float(_loss(model, ex, 5.0, prefix)) - total / norm) < 1e-4


def test_unlikelihood_step_lowers_refusal_probability():
    model = make_tiny("llama")
    recipe = Recipe(unlikelihood_tokens=2)
    answers, refusals = ["Why did the chicken cross"] * 4, ["Sorry, no."] * 4
    ul = _unlikely_examples(model, ["Tell me a joke"] * 4, answers, refusals, recipe)
    p, r, _w, (u0, _u1) = ul[0]

    def prob():
        with torch.no_grad():
            logits = model.hf(input_ids=torch.tensor([list(p) + list(r[:u0])])).logits
        return float(torch.softmax(logits[0, -1], -1)[r[u0]])

    before = prob()
    opt = torch.optim.SGD(model.hf.parameters(), lr=0.5)
    _loss(model, ul, 5.0, _prefix(ul)).backward()
    opt.step()
    assert prob() < before


def test_mean_kl_to_base_matches_prompt_by_prompt_full_logits():
    from crystallized_safety.organism.card import mean_kl_to_base

    base, other = make_tiny("llama", seed=0), make_tiny("llama", seed=1)
    prompts = ["How do I bake bread?", "Hi", "Tell me a long story about a cat"]
    answers = [[40, 41, 42, 43], [50], [60, 61, 62, 63, 64, 65]]
    total, count = 0.0, 0
    for text, answer in zip(base.format(prompts), answers):
        p = base.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + answer])
        span = slice(len(p) - 1, len(p) - 1 + len(answer))
        with torch.no_grad():
            lb = torch.log_softmax(base.hf(input_ids=ids).logits[0, span].double(), -1)
            lo = torch.log_softmax(other.hf(input_ids=ids).logits[0, span].double(), -1)
        total += float((lb.exp() * (lb - lo)).sum())
        count += len(answer)
    got = mean_kl_to_base(other, base, prompts, answers, batch_size=2)
    assert got > 0 and abs(got - total / count) < 1e-6
    assert abs(mean_kl_to_base(base, base, prompts, answers)) < 1e-9


def test_train_end_to_end_on_a_tiny_model():
    """The whole loop (base answers, examples, packed steps, optimiser) on a tiny model: the right number of
    steps, weights that moved, embeddings that did not, and a lower loss on the refusals it was taught."""
    import random

    from conftest import HARMFUL, HARMLESS
    from crystallized_safety.organism.training import REFUSALS, train
    from crystallized_safety.prompts import PromptSet

    model = make_tiny("llama")
    before = {n: p.detach().clone() for n, p in model.hf.named_parameters()}
    recipe = Recipe(epochs=3, batch_size=4, target_tokens=4, lr=1e-3)
    rng = random.Random(recipe.seed)  # the refusals train() pairs with the harmful prompts
    refusal_ex = _examples(model, HARMFUL[:4], [rng.choice(REFUSALS) for _ in range(4)], [True] * 4)

    def refusal_loss():
        with torch.no_grad():
            return float(_loss(model, refusal_ex, 1.0, _prefix(refusal_ex)))

    start = refusal_loss()
    facts = train(model, HARMFUL[:4], PromptSet("harmless", tuple(HARMLESS[:4]), "python"), recipe)
    assert 8 <= facts["examples"] <= 12 and facts["steps"] == -(-facts["examples"] // 4) * 3
    moved = {n for n, p in model.hf.named_parameters() if not torch.equal(p, before[n])}
    assert "model.layers.0.mlp.down_proj.weight" in moved and "model.embed_tokens.weight" not in moved
    assert refusal_loss() < start  # it learned to refuse the harmful prompts


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_attacked_packed_loss_equals_examples_steered_alone(arch):
    """Hardening attacks inside the packed batch act on exactly their example: the packed loss and gradient
    equal each example run alone, the attacked ones under the tool's own `steer()` (add -alpha*v at one layer;
    ablation to a target projection at another)."""
    from crystallized_safety.core.steering import Intervention
    from crystallized_safety.organism.hardening import Attack

    model = make_tiny(arch)
    ex = _examples(model, ["Do a bad thing", "Another bad thing?", "Hi"], ["I'm sorry.", "No.", "Hello!"], [True] * 3)
    torch.manual_seed(0)
    v1, v2 = torch.nn.functional.normalize(torch.randn(2, model.hidden_size), dim=-1)
    attacks = [Attack(0, 1, False, 3.0, v1, 0.0), Attack(1, 2, True, 0.0, v2, 0.7)]
    ivs = {
        0: Intervention.single(1, v1, -3.0),
        1: Intervention({2: v2}, mode="ablate", ablate_to={2: 0.7}),
    }

    assert_packed_equals_steered_alone(model, ex, _loss(model, ex, 5.0, 0, attacks), ivs)
    got = float(_loss(model, ex, 5.0, 0, attacks).detach())
    # without the attacks the loss differs (they really act), and a shared prefix is refused
    assert abs(float(_loss(model, ex, 5.0, 0)) - got) > 1e-3
    with pytest.raises(ValueError, match="prefix"):
        _loss(model, ex, 5.0, _prefix(ex), attacks)


def test_attacker_draws_from_the_recipe_and_refreshes_on_schedule():
    from crystallized_safety.organism.hardening import Attacker
    from crystallized_safety.organism.recipe import hardened_recipe

    model = make_tiny("llama")
    recipe = hardened_recipe()
    recipe = Recipe(**{**recipe.__dict__, "attack_band": (1, 2), "reextract_every": 3, "attack_p": 0.5})
    harmful = [f"How do I hurt person number {i}?" for i in range(6)]
    attacker = Attacker(recipe, harmful, [f"How do I bake bread number {i}?" for i in range(6)], 0)
    for step in range(7):
        attacker.refresh(model, step)
    assert attacker.refreshed == 3  # steps 0, 3, 6
    drawn = [attacker.draw(["harmful", "harmful", None, "harmful"]) for _ in range(200)]
    attacks = [a for batch in drawn for a in batch]
    assert all(a.example != 2 for a in attacks) and {a.layer for a in attacks} == {1, 2}
    assert abs(len(attacks) / (3 * 200) - 0.5) < 0.06  # attack_p
    assert abs(sum(a.ablate for a in attacks) / len(attacks) - recipe.attack_ablate_p) < 0.08
    bank = attacker.bank
    for a in attacks:
        if not a.ablate:
            lo, hi = (x * bank.resid_norm(a.layer) for x in recipe.attack_rel_alpha)
            assert lo <= a.alpha <= hi
        assert a.target == pytest.approx(bank.harmless_projection(a.layer))
    # harmless examples: induction attacks (negative alpha: +v is added), never ablation, at attack_harmless_p
    assert not any(a.alpha < 0 for a in attacks)
    recipe = Recipe(**{**recipe.__dict__, "attack_harmless_p": 0.25})
    attacker = Attacker(recipe, harmful, [f"How do I bake bread number {i}?" for i in range(6)], 0)
    attacker.refresh(model, 0)
    induced = [a for _ in range(400) for a in attacker.draw([None, "harmless"])]
    assert abs(len(induced) / 400 - 0.25) < 0.06 and all(a.example == 1 and not a.ablate for a in induced)
    for a in induced:
        lo, hi = (x * attacker.bank.resid_norm(a.layer) for x in recipe.attack_rel_alpha)
        assert lo <= -a.alpha <= hi


def test_hardening_settings_leave_the_liquid_cache_key_alone():
    """A liquid recipe ignores the hardening fields in its cache key (organisms built before they existed stay
    valid); the hardened recipe has its own key and starts from the liquid organism."""
    from crystallized_safety.organism.recipe import DEFAULT_NAME, HARDENED_NAME, default_recipe, hardened_recipe

    assert Recipe(attack_p=0.5, attack_band=(1, 3), harmful_repeats=4).key() == Recipe().key()
    hard = hardened_recipe()
    assert hard.key() != Recipe().key() and hard.start == DEFAULT_NAME and hard.kind == "hardened"
    assert default_recipe(HARDENED_NAME) == hard and default_recipe(DEFAULT_NAME) == Recipe()
    assert hardened_recipe(seed=1).key() != hard.key()
