"""llama.cpp (llama-cpp-python 0.3.36, built from its sdist by `make interop`) runs what this tool exports:

- the liquid organism, converted to an f32 GGUF by llama.cpp's own converter, tokenizes our chat-formatted prompts
  as we do and, unsteered, gives our greedy tokens and first-token logits;
- `csafety vectors export`'s control vector, read by llama.cpp's own GGUF parser and applied through its control
  vector API, steers it as this tool's own steering does: the same tokens, first-token logits within tolerance,
  and the sign and scale carried end to end (the vector exported at -0.3 relative makes llama.cpp refuse less);
- `csafety export-model`'s weight-edited model, converted the same way, gives the tokens of the hook ablation.
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
    ORGANISM,
    common_prefix,
    convert_to_gguf,
    needs,
    our_run,
    refusals,
    run_side,
    same_share,
)

pytestmark = [pytest.mark.slow, needs("llama-cpp")]

# Measured (docs/interop.md): identical tokens on 24/24 prompts plain, steered and weight-edited, first-token logits
# within 7.2e-5 of ours. The margins leave room for near-ties on another CPU (GGML_NATIVE changes summation order).
MIN_SAME = 0.9  # share of prompts whose greedy tokens are identical to ours
LOGIT_ATOL = 1e-3  # first-token logits, absolute (they spread over ~30)


@pytest.fixture(scope="module")
def organism_gguf(saved_organism, tmp_path_factory):
    return convert_to_gguf(saved_organism, tmp_path_factory.mktemp("gguf") / "organism-f32.gguf")


def _llama(model, texts, runs, organism, workdir):
    # one thread: ggml's threads wait on each other by spinning, which on a busy 2-core machine costs ~70x
    # (measured: 2.6 s a token with 2 threads beside another job, 37 ms with 1)
    request = {"model": str(model), "texts": texts, "runs": {k: (str(v) if v else None) for k, v in runs.items()},
               "max_new_tokens": MAX_NEW, "eos": organism.eos_ids(), "threads": 1}  # fmt: skip
    return run_side("llama-cpp", "side_llama.py", request, workdir)


def _decode(organism, tokens):
    return [organism.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def test_control_vector_steers_llama_cpp_as_the_tool_does(
    organism, organism_gguf, eval_texts, control_vector, bank, plain_run, steered_run, tmp_path
):
    side = _llama(organism_gguf, eval_texts, {"plain": None, "steered": control_vector}, organism, tmp_path)
    ours_ids = organism.tokenizer(eval_texts, add_special_tokens=False)["input_ids"]
    assert side["prompt_ids"] == ours_ids  # llama.cpp's tokenizer reads our chat-formatted text as we do
    assert side["n_layer"] == organism.n_layers and side["n_embd"] == organism.hidden_size
    # llama.cpp's parser found the one layer we exported, at the norm the relative alpha gives
    assert list(side["cvec"]["steered"]) == [str(LAYER)]
    assert side["cvec"]["steered"][str(LAYER)] == pytest.approx(abs(ALPHA) * bank.resid_norm(LAYER), rel=1e-5)

    figures = {}
    for run, ours in (("plain", plain_run), ("steered", steered_run)):
        theirs = side["tokens"][run]
        figures[run] = {
            "same_tokens": same_share(theirs, ours.tokens),
            "common_prefix": common_prefix(theirs, ours.tokens),
            "max_abs_logit_diff": float(np.abs(side[f"first_{run}"] - ours.first).max()),
            "first_token_same": float(np.mean(side[f"first_{run}"].argmax(-1) == ours.first.argmax(-1))),
        }
        assert figures[run]["same_tokens"] >= MIN_SAME, (run, figures)
        np.testing.assert_allclose(side[f"first_{run}"], ours.first, atol=LOGIT_ATOL, rtol=0)
    # the steering is not a no-op: llama.cpp's own steered logits moved as far as ours did
    np.testing.assert_allclose(side["first_steered"] - side["first_plain"], steered_run.first - plain_run.first,
                               atol=2 * LOGIT_ATOL, rtol=0)  # fmt: skip
    shift_diff = (side["first_steered"] - side["first_plain"]) - (steered_run.first - plain_run.first)
    figures["max_abs_shift_diff"] = float(np.abs(shift_diff).max())
    figures["max_abs_shift"] = float(np.abs(steered_run.first - plain_run.first).max())
    assert float(np.abs(steered_run.first - plain_run.first).max()) > 50 * LOGIT_ATOL

    # sign and scale end to end: the vector exported at -0.3 relative makes llama.cpp refuse less, as it does us
    plain_refusals = refusals(_decode(organism, side["tokens"]["plain"])[:N_HARMFUL])
    steered_refusals = refusals(_decode(organism, side["tokens"]["steered"])[:N_HARMFUL])
    assert steered_refusals < plain_refusals
    for run, ours, count in (("plain", plain_run, plain_refusals), ("steered", steered_run, steered_refusals)):
        differing = N_HARMFUL * (1 - same_share(side["tokens"][run][:N_HARMFUL], ours.tokens[:N_HARMFUL]))
        assert abs(count - refusals(ours.responses[:N_HARMFUL])) <= round(differing)  # same tokens, same verdicts
    figures["refusals_of_harmful"] = {"plain": plain_refusals, "steered": steered_refusals, "of": N_HARMFUL}
    record("test_control_vector_steers_llama_cpp_as_the_tool_does", {"version": side["version"], **figures})


def test_weight_edited_model_in_llama_cpp_gives_the_hook_ablation_tokens(
    organism, organism_gguf, eval_prompts, eval_texts, bank, bank_file, plain_run, tmp_path
):
    from conftest import cli_ok
    from crystallized_safety.core.orthogonalization import ablation_hooks

    edited = tmp_path / "edited"
    cli_ok(["export-model", "--model", ORGANISM, "--directions", str(bank_file), "-l", str(LAYER),
            "--out", str(edited)])  # fmt: skip
    assert json.loads((edited / "csafety-edit.json").read_text())["direction_layer"] == LAYER
    gguf = convert_to_gguf(edited, tmp_path / "edited-f32.gguf")
    side = _llama(gguf, eval_texts, {"edited": None}, organism, tmp_path / "side")

    handles = [module.register_forward_hook(hook) for module, hook in ablation_hooks(organism, bank.direction(LAYER))]
    try:
        ablated = our_run(organism, eval_prompts)
    finally:
        for handle in handles:
            handle.remove()
    theirs = side["tokens"]["edited"]
    figures = {
        "same_tokens": same_share(theirs, ablated.tokens),
        "common_prefix": common_prefix(theirs, ablated.tokens),
        "max_abs_logit_diff": float(np.abs(side["first_edited"] - ablated.first).max()),
        "differs_from_plain": 1 - same_share(theirs, plain_run.tokens),
    }
    assert figures["same_tokens"] >= MIN_SAME, figures
    np.testing.assert_allclose(side["first_edited"], ablated.first, atol=LOGIT_ATOL, rtol=0)
    assert figures["differs_from_plain"] > 0  # the edit changed what the model says (not a vacuous comparison)
    # (the layer-12 direction folded out alone does not remove this organism's refusals: reported, not asserted)
    figures["refusals_of_harmful"] = {"edited": refusals(_decode(organism, theirs)[:N_HARMFUL]), "of": N_HARMFUL}
    figures["version"] = side["version"]
    record("test_weight_edited_model_in_llama_cpp_gives_the_hook_ablation_tokens", figures)
