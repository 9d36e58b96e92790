"""steering-vectors (0.12, in its own environment: it pins transformers < 5, so it runs on transformers 4.57) on a
model directory this tool saves:

- transformers 4 loads the directory (AutoTokenizer, AutoModelForCausalLM) and computes our logits. That needs
  the saved configs to carry what transformers 4 reads: `rope_theta` beside transformers 5's `rope_parameters`
  (without it transformers 4 silently uses 10,000 where SmolLM2 needs 100,000: pinned below by a copy without
  it, whose logits are far off) and a tokenizer class both majors know (`core.loading.portable_config`);
- its extraction on the same contrast pairs equals ours (cosine >= 0.9999 at every layer, same norms);
- its steering with its own vector, at the norm of our relative alpha, gives our steered tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from .record import record
from .sides import ALPHA, LAYER, MAX_NEW, common_prefix, needs, run_side, same_share

pytestmark = [pytest.mark.slow, needs("steering-vectors")]

MIN_COSINE = 0.9999
MIN_SAME = 0.9  # share of prompts whose greedy tokens are identical (measured in docs/interop.md)
LOGIT_ATOL = 1e-3


def _transformers5_only_copy(saved, target):
    """`saved` as transformers 5 alone would write it: config.json without the transformers-4 rope keys; the
    weights and tokenizer linked, not copied."""
    target.mkdir()
    for file in saved.iterdir():
        if file.name != "config.json":
            (target / file.name).symlink_to(file)
    cfg = json.loads((saved / "config.json").read_text())
    cfg.pop("rope_theta")
    (target / "config.json").write_text(json.dumps(cfg))


def test_steering_vectors_extracts_and_steers_as_the_tool_does(
    organism, saved_organism, pair_texts, eval_texts, bank, plain_run, steered_run, tmp_path
):
    saved = saved_organism
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert json.loads((saved / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    _transformers5_only_copy(saved, tmp_path / "tf5-only")
    request = {"model": str(saved), "pairs": pair_texts, "layer": LAYER, "norm": ALPHA * bank.resid_norm(LAYER),
               "texts": eval_texts, "max_new_tokens": MAX_NEW, "eos": organism.eos_ids(),
               "control": str(tmp_path / "tf5-only")}  # fmt: skip
    side = run_side("steering-vectors", "side_steering_vectors.py", request, tmp_path / "side")

    # transformers 4 reads our saved directory as transformers 5 does
    assert side["transformers"].startswith("4.57") and side["rope_theta"] == 100000.0
    assert side["tokenizer"] == "PreTrainedTokenizerFast"
    assert side["prompt_ids"] == organism.tokenizer(eval_texts, add_special_tokens=False)["input_ids"]
    np.testing.assert_allclose(side["first_plain"], plain_run.first, atol=LOGIT_ATOL, rtol=0)
    # ... which it would not without the rope keys: 10,000 instead of 100,000, logits far off
    assert side["control_rope_theta"] == 10000.0
    control_diff = float(np.abs(side["first_control"] - plain_run.first).max())
    assert control_diff > 100 * LOGIT_ATOL

    # extraction: the same directions at every layer, the same raw norms
    assert side["layers"] == bank.layers == list(range(organism.n_layers))
    theirs = side["vectors"].astype(np.float64)
    cosines = (theirs / np.linalg.norm(theirs, axis=1, keepdims=True)) @ bank.directions.double().numpy().T
    cosines = np.diag(cosines)
    assert cosines.min() >= MIN_COSINE, cosines
    np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), bank.raw_norms.double().numpy(), rtol=1e-3)

    # steering: its vector, its hook, our tokens
    figures = {
        "versions": {"transformers": side["transformers"], "steering_vectors": side["steering_vectors"]},
        "min_cosine": float(cosines.min()),
        "max_abs_logit_diff_plain": float(np.abs(side["first_plain"] - plain_run.first).max()),
        "max_abs_logit_diff_without_rope_keys": control_diff,
        "plain_same_tokens": same_share(side["tokens_plain"], plain_run.tokens),
        "steered_same_tokens": same_share(side["tokens_steered"], steered_run.tokens),
        "steered_common_prefix": common_prefix(side["tokens_steered"], steered_run.tokens),
    }
    assert figures["plain_same_tokens"] >= MIN_SAME, figures
    assert figures["steered_same_tokens"] >= MIN_SAME, figures
    assert 1 - same_share(steered_run.tokens, plain_run.tokens) > 0.5  # the steering changed most answers
    record("test_steering_vectors_extracts_and_steers_as_the_tool_does", figures)
