"""Recipe v14 (issue 26): v13 with its comply windows trained on the base model's answers at 128 tokens, the length
the verdict confirms and blind readers read at (v13's windows learned 32 tokens of an answer and drifted after)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from crystallized_safety.core.generation.api import generate
from crystallized_safety.organism.recipe import HARDENED_NAMES, hardened_recipe
from crystallized_safety.organism.training import comply_targets, planned_attacks, shipped_answers
from crystallized_safety.prompts import bundled
from crystallized_safety.registry import load_model

ROOT = Path(__file__).resolve().parents[1]


def test_v14_is_v13_with_its_comply_targets_at_128_tokens():
    v13, v14 = hardened_recipe(version="v13"), hardened_recipe(version="v14")
    assert HARDENED_NAMES["v14"] == "smollm2-135m-hardened-v14"
    assert replace(v14, comply_tokens=0) == v13 and v14.comply_tokens == 128
    # comply_tokens is a later field: at its default it stays out of the key, so v13's cached build keeps its name
    assert v13.key() == "ba897de3340c" != v14.key()
    assert planned_attacks(v14, 184, 261, 1074 + 184) == 679  # the same attack stream: only the targets change


def test_v14_trains_its_windows_on_the_shipped_128_token_answers():
    base = load_model("smollm2-135m")
    harmful = bundled("harmful", "train")
    entry = shipped_answers()["bundled:harmful:train:128"]
    assert entry["base_model_hash"] == base.model_hash and entry["prompts_sha256"] == harmful.sha256
    got = comply_targets(base, hardened_recipe(version="v14"))
    assert [g.prompt for g in got] == list(harmful)
    assert [g.token_ids for g in got] == [tuple(a["token_ids"]) for a in entry["answers"]]
    assert max(len(g.token_ids) for g in got) == 128  # answers the 32-token targets cut short run to 128
    fresh = generate(base, list(harmful)[:8], max_new_tokens=128, batch_size=64)  # what the base model says
    same = sum(f.token_ids == g.token_ids for f, g in zip(fresh, got))
    assert same >= 6, f"only {same}/8 shipped 128-token answers match the base model's own"
    short = comply_targets(base, hardened_recipe(version="v13"))
    # the 32-token targets are the first 32 tokens of the same greedy answers
    same = sum(s.token_ids == g.token_ids[: len(s.token_ids)] for s, g in zip(short, got))
    assert same >= len(got) - 2, f"only {same} of {len(got)} 32-token targets begin the 128-token ones"


def test_the_v14_spec_is_v13s_search_decided_on_readings():
    spec13, spec14 = ((ROOT / "configs" / f"hardened-{v}.yaml").read_text() for v in ("v13", "v14"))
    body13 = spec13.split("name: hardened-v13")[1].replace("-v13]", "-v14]")
    walk = "  walk: until_liquid"
    line = next(x for x in body13.splitlines() if x.startswith(walk))
    reading = "  confirm_by: reading     # a flip at length counts only when a blind reader labels it full compliance"
    assert spec14.split("name: hardened-v14")[1] == body13.replace(line, f"{line}\n{reading}")
