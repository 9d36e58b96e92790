"""The bundled over-refusal set (data/over_refusal.tsv): 150 safe requests that only sound unsafe, 50 per
category, loaded by `bundled("over_refusal")` (and per category), and disjoint from every other bundled prompt:
no exact match and word-set Jaccard below 0.5, so over-refusal is never measured on a prompt the training or
near-miss sets already hold."""

from __future__ import annotations

import itertools
import re

import pytest

from conftest import cli_err
from crystallized_safety.errors import PromptError
from crystallized_safety.prompts import (
    OVER_REFUSAL_CATEGORIES,
    bundled,
    load_prompts,
    near_miss_pairs,
    over_refusal_rows,
)


def words(text: str) -> frozenset[str]:
    return frozenset(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b)


def test_the_set_has_fifty_prompts_per_category_in_file_order():
    rows = over_refusal_rows()
    assert len(rows) == 150
    assert [c for c, _ in rows] == [c for c in OVER_REFUSAL_CATEGORIES for _ in range(50)]
    assert all(5 <= len(p.split()) <= 20 and "\t" not in p for _, p in rows)
    assert bundled("over_refusal").prompts == tuple(p for _, p in rows)
    for category in OVER_REFUSAL_CATEGORIES:
        got = load_prompts(f"bundled:over_refusal:{category}")
        assert got.prompts == tuple(p for c, p in rows if c == category) and got.name == f"over_refusal:{category}"


def test_the_set_is_disjoint_from_every_other_bundled_prompt():
    others = [*bundled("harmful").prompts, *bundled("harmless").prompts]
    others += [p for pair in near_miss_pairs() for p in pair]
    other_words = [words(o) for o in others]
    exact = {" ".join(sorted(w)) for w in other_words}
    mine = [words(p) for _, p in over_refusal_rows()]
    assert not [p for p in mine if " ".join(sorted(p)) in exact]
    worst = max(jaccard(m, o) for m in mine for o in other_words)
    assert worst < 0.5, worst
    assert max(jaccard(a, b) for a, b in itertools.combinations(mine, 2)) < 0.5


def test_it_has_no_splits_only_categories():
    with pytest.raises(PromptError, match="bundled over_refusal has no split 'eval': it is for evaluation only"):
        bundled("over_refusal", "eval")
    cli_err(["generate", "--model", "tiny", "--prompts", "bundled:over_refusal:train"], "has no split 'train'")


def test_the_measured_over_refusal_is_what_the_stored_responses_give_and_what_the_docs_state():
    """results/over-refusal.json: each rate is the count of its stored verdicts, the verdicts are what the substring
    judge says of the stored responses now, and docs/organisms.md states every rate with its Wilson interval."""
    import json
    from pathlib import Path

    from crystallized_safety.judges.substring import SubstringJudge
    from crystallized_safety.stats import wilson_interval

    root = Path(__file__).resolve().parents[1]
    got = json.loads((root / "results" / "over-refusal.json").read_text())
    docs = (root / "docs" / "organisms.md").read_text()
    judge = SubstringJudge()
    prompts = {c: bundled("over_refusal", c).prompts for c in OVER_REFUSAL_CATEGORIES}
    for model, entry in got["models"].items():
        cells = []
        for label in (*OVER_REFUSAL_CATEGORIES, "over_refusal", "harmful_eval"):
            rate = entry["rates"][label]
            if label in prompts:
                rows = entry["rows"][label]
                assert tuple(r["prompt"] for r in rows) == prompts[label]
                again = judge.judge([r["prompt"] for r in rows], [r["response"] for r in rows])
                assert [bool(v.refusal) for v in again] == [r["refusal"] for r in rows]
                assert rate["k"] == sum(r["refusal"] for r in rows) and rate["n"] == len(rows)
            lo, hi = wilson_interval(rate["k"], rate["n"])
            cells.append(
                f"{100 * rate['k'] / rate['n']:.1f}% ({rate['k']}/{rate['n']}, {100 * lo:.1f}-{100 * hi:.1f}%)"
            )
        every = sum(entry["rates"][c]["k"] for c in OVER_REFUSAL_CATEGORIES)
        assert entry["rates"]["over_refusal"]["k"] == every and entry["rates"]["over_refusal"]["n"] == 150
        assert f"| {model} | {' | '.join(cells)} |" in docs


def test_the_docs_state_the_range_of_the_recipes_without_the_induction_lever():
    import json
    from pathlib import Path

    from crystallized_safety.organism.recipe import hardened_recipe, immune_recipe

    root = Path(__file__).resolve().parents[1]
    rates = json.loads((root / "results" / "over-refusal.json").read_text())["models"]
    versions = ("v11", "v12", "v13")
    no_lever = ("v7", "v8", "v9", *versions)
    assert all(hardened_recipe(version=v).attack_harmless_p == 0 for v in no_lever)  # no induction attacks
    shares = [rates[f"smollm2-135m-hardened-{v}"]["rates"]["over_refusal"] for v in versions]
    low, high = (100 * f(r["k"] / r["n"] for r in shares) for f in (min, max))
    docs = " ".join((root / "docs" / "organisms.md").read_text().split())
    assert f"refuse {low:.1f}-{high:.1f}% of these requests" in docs and low > 20
    assert all(hardened_recipe(version=v).attack_harmless_p > 0 for v in ("v5", "v6"))
    assert immune_recipe().attack_harmless_p > 0 and hardened_recipe(version="v2").attack_harmless_p == 0
