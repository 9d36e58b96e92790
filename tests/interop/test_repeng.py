"""repeng (0.4.0, in its own environment: it pins numpy < 2) and this tool read each other's control vectors:

- a vector repeng trains on the organism and writes with its own `export_gguf` is read by `csafety vectors import`
  (same layers, same vectors) and steers this tool's generation as it steers repeng's `ControlModel`;
- the file `csafety vectors export` writes loads in repeng's `import_gguf` with the same layer and vector, and
  steers repeng's `ControlModel` as it steers this tool.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from .record import record
from .sides import (
    ALPHA,
    LAYER,
    MAX_NEW,
    N_HARMFUL,
    common_prefix,
    needs,
    our_run,
    refusals,
    run_side,
    same_share,
)

pytestmark = [pytest.mark.slow, needs("repeng")]

REPENG_LAYERS = [10, 11, 12, 13, 14]  # repeng's PCA vectors are unit: ALPHA's push spread over five layers
MIN_SAME = 0.9  # share of prompts whose greedy tokens are identical (measured in docs/interop.md)


def test_repeng_vectors_cross_both_ways_and_steer_the_same(
    organism, saved_organism, pair_texts, eval_prompts, eval_texts, bank, control_vector, plain_run, steered_run,
    tmp_path,
):  # fmt: skip
    from conftest import cli_ok
    from crystallized_safety.core.directions import DirectionBank
    from crystallized_safety.core.steering import Intervention

    coeff = ALPHA * bank.resid_norm(LAYER) / len(REPENG_LAYERS)
    request = {"model": str(saved_organism), "pairs": pair_texts, "layers": REPENG_LAYERS, "coeff": coeff,
               "texts": eval_texts, "max_new_tokens": MAX_NEW, "eos": organism.eos_ids(),
               "export": str(tmp_path / "repeng.gguf"), "ours": str(control_vector)}  # fmt: skip
    side = run_side("repeng", "side_repeng.py", request, tmp_path / "side")
    assert side["numpy"].startswith("1.")  # repeng ran with the numpy it pins

    # repeng -> this tool: `csafety vectors import` keeps its layers and vectors (unit: repeng's PCA components)
    cli_ok(["vectors", "import", "--in", str(tmp_path / "repeng.gguf"), "--out", str(tmp_path / "repeng.safetensors")])
    imported = DirectionBank.load(tmp_path / "repeng.safetensors")
    norms = json.loads(imported.metadata["gguf_norms"])
    assert imported.layers == side["repeng_layers"] == REPENG_LAYERS
    vectors = np.stack([imported.direction(k).numpy() * norms[str(k)] for k in REPENG_LAYERS])
    np.testing.assert_allclose(vectors, side["repeng"], atol=1e-6)
    # reported, not asserted: repeng's PCA centres the paired differences, so its vector is the direction they
    # vary along, not their mean (ours); the two need not be close
    cosines = {k: round(float(imported.direction(k) @ bank.direction(k)), 4) for k in REPENG_LAYERS}
    steer = Intervention({k: imported.direction(k) * norms[str(k)] for k in REPENG_LAYERS}, alpha=coeff)
    ours = our_run(organism, eval_prompts, steer)
    figures = {
        "cosine_with_ours": cosines,
        "repeng_vector_same_tokens": same_share(side["tokens_repeng"], ours.tokens),
        "repeng_vector_common_prefix": common_prefix(side["tokens_repeng"], ours.tokens),
        "steered_differs_from_plain": 1 - same_share(ours.tokens, plain_run.tokens),
    }
    assert figures["repeng_vector_same_tokens"] >= MIN_SAME, figures
    assert figures["steered_differs_from_plain"] > 0.5  # the steering changed most answers: not a vacuous match

    # this tool -> repeng: our export loads with the same layer and vector, and steers repeng as it steers us
    assert side["ours_layers"] == [LAYER] and side["ours_hint"] == "llama"
    want = bank.direction(LAYER).double().numpy() * ALPHA * bank.resid_norm(LAYER)
    np.testing.assert_allclose(side["ours"][0], want, rtol=1e-6, atol=1e-6)
    figures["our_vector_same_tokens"] = same_share(side["tokens_ours"], steered_run.tokens)
    figures["our_vector_common_prefix"] = common_prefix(side["tokens_ours"], steered_run.tokens)
    assert figures["our_vector_same_tokens"] >= MIN_SAME, figures
    figures["refusals_of_harmful"] = {
        "plain": refusals(plain_run.responses[:N_HARMFUL]),
        "repeng_vector": refusals(ours.responses[:N_HARMFUL]),
        "of": N_HARMFUL,
    }
    record("test_repeng_vectors_cross_both_ways_and_steer_the_same", {"numpy": side["numpy"], **figures})
