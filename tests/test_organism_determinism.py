"""Issue 26: the hardened organism's build is a function of its cache key. Its attack stream (which examples are
attacked, where, how hard) comes from the recipe's seed alone; a kind attacked with probability 0 draws nothing
from it, so adding a setting at its default (`attack_harmless_p` 0) leaves the stream, hence the weights, of
every key built before; a card whose attack count differs from the stream's is reported as stale."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from conftest import HARMFUL, HARMLESS, make_tiny
from crystallized_safety.organism.build import stale_attack_stream
from crystallized_safety.organism.hardening import Attacker
from crystallized_safety.organism.recipe import Recipe, hardened_recipe
from crystallized_safety.organism.training import planned_attacks, train
from crystallized_safety.prompts import PromptSet

# v2's training set: 184 harmful train prompts x 3 repeats, 261 harmless answers, 261 unlikelihood examples
V2_COUNTS = (184, 261, 1074)


def stub_bank() -> SimpleNamespace:
    return SimpleNamespace(
        resid_norm=lambda layer: 10.0 + layer, harmless_projection=lambda layer: -1.0, direction=lambda layer: None
    )


def test_a_harmless_example_draws_one_number_even_at_probability_zero():
    """The stream v2's key has built since `attack_harmless_p` exists: a harmless example at probability 0 is never
    attacked but consumes one random number, so the harmful attacks differ from a batch where it is not
    attackable at all (the 486-attack stream of the first v2 build), and the generators end in different states."""
    recipe = hardened_recipe()
    with_harmless, without = Attacker(recipe, [], [], 0), Attacker(recipe, [], [], 0)
    with_harmless.bank = without.bank = stub_bank()  # type: ignore[assignment]
    got_all, want_all = [], []
    for _ in range(20):
        got = with_harmless.draw(["harmful", "harmless", None, "harmless", "harmful"])
        want = without.draw(["harmful", None, None, None, "harmful"])
        assert all(a.example in (0, 4) for a in got)  # harmless examples are never attacked at p 0
        got_all += [(a.example, a.layer, a.ablate, a.alpha) for a in got]
        want_all += [(a.example, a.layer, a.ablate, a.alpha) for a in want]
    assert got_all != want_all
    assert with_harmless.rng.getstate() != without.rng.getstate()
    # with a positive probability harmless examples are drawn for (induction attacks, target stays the answer)
    induced = Attacker(Recipe(**{**recipe.__dict__, "attack_harmless_p": 1.0}), [], [], 0)
    assert [(i, kind) for i, kind, *_ in induced.plan(["harmless", None])] == [(0, "harmless")]


def test_the_v2_cache_keys_and_attack_stream_are_the_documented_ones():
    """The keys the caches hold (`smollm2-135m-refusal-s0-fdd0829d75b6`, `smollm2-135m-hardened-s0-44e80f36776c`)
    and v2's 494 attacks (results/cards/smollm2-135m-hardened.json): the stream before `attack_harmless_p`
    existed trained another organism under the same key (486 attacks, near-miss 14.7% instead of 17.3%)."""
    assert Recipe().key() == "fdd0829d75b6"
    assert hardened_recipe().key() == "44e80f36776c"
    assert planned_attacks(hardened_recipe(), *V2_COUNTS) == 494
    assert planned_attacks(hardened_recipe(), *V2_COUNTS) == planned_attacks(hardened_recipe(), *V2_COUNTS)
    assert planned_attacks(hardened_recipe(seed=1), *V2_COUNTS) != 494  # the seed, not the machine, decides
    assert planned_attacks(Recipe(), *V2_COUNTS) == 0


def v2_card(attacks: int) -> dict:
    harmful, harmless, examples = V2_COUNTS
    recipe = {**hardened_recipe().__dict__}
    recipe["attack_band"], recipe["attack_rel_alpha"] = list(recipe["attack_band"]), list(recipe["attack_rel_alpha"])
    return {
        "name": "smollm2-135m-hardened",
        "recipe": recipe,  # as card.json stores it: tuples become lists
        "training_data": {"harmful_train_count": harmful, "harmless_train_count": harmless},
        "training": {"examples": examples, "attacks": attacks},
    }


def test_a_card_trained_on_a_drifted_stream_is_reported_stale():
    assert stale_attack_stream(v2_card(494)) is None
    message = stale_attack_stream(v2_card(486))
    assert message is not None and "486 attacks" in message and "494" in message and "--force" in message
    liquid = {**v2_card(0), "recipe": {**Recipe().__dict__}}
    assert stale_attack_stream(liquid) is None


def test_training_draws_exactly_the_planned_attacks():
    """The count `planned_attacks` computes without a model is the one a real (tiny) hardened training reports
    (bypass attacks on harmful examples, induction attacks on harmless ones)."""
    model = make_tiny("llama")
    recipe = Recipe(
        epochs=2,
        batch_size=4,
        target_tokens=4,
        kind="hardened",
        attack_p=0.6,
        attack_band=(1, 2),
        harmful_repeats=2,
        attack_harmless_p=0.5,
        reextract_every=3,
        reextract_prompts=4,
    )
    facts = train(model, HARMFUL[:4], PromptSet("harmless", tuple(HARMLESS[:4]), "python"), recipe)
    assert facts["attacks"] == planned_attacks(recipe, 4, 4, facts["examples"]) > 0
    assert torch.isfinite(torch.tensor(facts["loss_last"]))


def test_auto_precision_of_a_build_does_not_depend_on_the_timed_probe(monkeypatch):
    """The precision picks the organism (it is in the cache key): `organism build --precision auto` decides from the
    CPU's flags and PyTorch's kernels only, so a machine under load (probe: bf16 'not faster') builds the same one."""
    from crystallized_safety import precision

    monkeypatch.delenv("CSAFETY_PRECISION", raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16", "avx2"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(precision, "_onednn_bf16", lambda: True)
    precision.detect.cache_clear()
    try:
        for fp32_ms, bf16_ms in ((40.0, 15.0), (40.0, 60.0)):  # idle, loaded
            monkeypatch.setattr(precision, "probe", lambda a=fp32_ms, b=bf16_ms: (a, b))
            precision.detect.cache_clear()
            assert precision.resolve("auto", timed=False)[0] == "bf16"
            assert precision.resolve("auto")[0] == ("bf16" if bf16_ms < fp32_ms else "fp32")  # the timed rule
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        assert precision.resolve("auto", timed=False)[0] == "fp32"
    finally:
        precision.detect.cache_clear()
