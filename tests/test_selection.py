"""Direction selection over positions x layers (issue 15, part 1; Arditi et al. 2024): every score of a candidate
is recomputed independently (plain transformers forward with hand-written hooks; KL with scipy), the paper's
filters are applied as written, and the winner is the kept candidate with the lowest bypass score."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from conftest import HARMFUL, HARMLESS, block_outputs, cli_ok, make_tiny
from crystallized_safety.core.directions import DirectionBank
from crystallized_safety.experiments.selection import filter_reason, select_direction
from crystallized_safety.judges.divergence import mean_kl
from crystallized_safety.judges.refusal_score import RefusalScoreJudge


def test_mean_kl_equals_scipy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 40, generator=g), torch.randn(5, 40, generator=g)
    want = np.mean([entropy(torch.softmax(a[i].double(), -1).numpy(), torch.softmax(b[i].double(), -1).numpy())
                    for i in range(5)])  # fmt: skip
    assert mean_kl(a, b) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"layer": 3, "kl": 0.01, "induce": 1.0}, ""),
        ({"layer": 8, "kl": 0.01, "induce": 1.0}, "in the last 20% of layers"),
        ({"layer": 3, "kl": 0.2, "induce": 1.0}, "KL 0.200 >= 0.1"),
        ({"layer": 3, "kl": float("nan"), "induce": 1.0}, "KL nan >= 0.1"),
        ({"layer": 3, "kl": 0.01, "induce": -0.5}, "induce -0.50 <= 0"),
    ],
)
def test_filters_as_in_the_paper(row, reason):
    assert filter_reason(row, n_layers=10, kl_max=0.1, drop_last=0.2) == reason


def _independent_bypass(model, judge, prompts, v):
    """Mean refusal log-odds with v ablated at every block output: transformers forward + hand-written hooks."""

    def hook(_m, _a, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h - (h @ v)[..., None] * v
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handles = [layer.register_forward_hook(hook) for layer in model.layers]
    try:
        scores = []
        for text in model.format(prompts):  # one prompt at a time: no padding involved
            ids = model.tokenizer(text, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                logits = model.hf(**ids).logits[0, -1].double()
            mask = torch.zeros_like(logits, dtype=torch.bool)
            mask[judge.token_ids] = True
            scores.append(float(torch.logsumexp(logits[mask], 0) - torch.logsumexp(logits[~mask], 0)))
        return float(np.mean(scores))
    finally:
        for handle in handles:
            handle.remove()


def test_selection_scores_and_choice_on_a_tiny_model():
    model = make_tiny("llama")
    sel = select_direction(model, (HARMFUL, HARMLESS), (HARMFUL[:4], HARMLESS[:4]), positions=(-1, -2),
                           kl_max=10.0, drop_last=0.25, induce_min=-1e9)  # fmt: skip
    assert len(sel.candidates) == 2 * model.n_layers
    judge = RefusalScoreJudge(model)
    for c in sel.candidates[::3]:
        from crystallized_safety.core.directions import extract_directions

        v = extract_directions(model, HARMFUL, HARMLESS, layers=[c.layer], position=c.position).direction(c.layer)
        assert c.bypass == pytest.approx(_independent_bypass(model, judge, HARMFUL[:4], v), abs=2e-4)
    kept = [c for c in sel.candidates if c.kept]
    assert all(c.layer < 3 for c in kept) and sel.chosen == min(kept, key=lambda c: c.bypass)
    assert sel.bank.metadata["selected_layer"] == str(sel.chosen.layer)


def test_select_cli_writes_table_and_direction(tmp_path):
    model = make_tiny("llama")
    model.hf.save_pretrained(tmp_path / "tiny")
    model.tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "h.txt").write_text("\n".join(HARMFUL) + "\n")
    (tmp_path / "n.txt").write_text("\n".join(HARMLESS) + "\n")
    cli_ok(["select", "--model", str(tmp_path / "tiny"), "--harmful", str(tmp_path / "h.txt"), "--harmless",
            str(tmp_path / "n.txt"), "--eval-harmful", str(tmp_path / "h.txt"), "--eval-harmless",
            str(tmp_path / "n.txt"), "--positions", "-1", "--kl-max", "10", "--induce-min", "-1e9",
            "--out", str(tmp_path / "sel.safetensors"),
            "--table", str(tmp_path / "table.json")])  # fmt: skip
    table = json.loads((tmp_path / "table.json").read_text())
    bank = DirectionBank.load(tmp_path / "sel.safetensors")
    chosen = [row for row in table["candidates"] if row["chosen"]]
    assert len(table["candidates"]) == model.n_layers and len(chosen) == 1
    assert bank.metadata["selected_layer"] == str(chosen[0]["layer"])


def test_no_choice_and_affine_ablation():
    from crystallized_safety.experiments.selection import no_choice_message

    model = make_tiny("llama")
    data = ((HARMFUL, HARMLESS), (HARMFUL[:3], HARMLESS[:3]))
    none = select_direction(model, *data, positions=(-1,), kl_max=-1.0, induce_min=-1e9)
    assert none.chosen is None and none.bank is None and len(none.candidates) == model.n_layers
    assert "lowest KL" in no_choice_message(none) and "--ablate-to harmless-mean" in no_choice_message(none)
    affine = select_direction(model, *data, positions=(-1,), kl_max=10.0, induce_min=-1e9, ablate_to="harmless-mean")
    zero = select_direction(model, *data, positions=(-1,), kl_max=10.0, induce_min=-1e9)
    assert [c.bypass for c in affine.candidates] != [c.bypass for c in zero.candidates]
    assert [c.induce for c in affine.candidates] == [c.induce for c in zero.candidates]  # induction is unchanged


def _independent_cosmic(model, harmful, harmless, layers, v, alpha, source):
    """COSMIC's two cosines by hand: one prompt at a time, plain transformers hidden states, hand-written hooks."""

    def last_states(prompts, hooks):
        handles = [model.layers[i].register_forward_hook(h) for i, h in hooks]
        try:
            rows = []
            for text in model.format(prompts):
                ids = model.tokenizer(text, return_tensors="pt", add_special_tokens=False)
                hs = block_outputs(model, **ids)  # after the hand-written hooks
                rows.append(torch.stack([hs[k][0, -1].double() for k in layers]))
            mean = torch.stack(rows).mean(dim=(0, 1))
            return mean / mean.norm()
        finally:
            for handle in handles:
                handle.remove()

    def ablate(_m, _a, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h - (h @ v)[..., None] * v
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def add(_m, _a, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h + alpha * v
        return (h, *out[1:]) if isinstance(out, tuple) else h

    base_h, base_n = last_states(harmful, []), last_states(harmless, [])
    ablated = last_states(harmful, [(i, ablate) for i in range(model.n_layers)])
    induced = last_states(harmless, [(source, add)])
    return float(ablated @ base_n), float(induced @ base_h)


def test_cosmic_scores_equal_a_hand_computation_and_pick_the_largest_sum():
    from crystallized_safety.core.directions import extract_directions
    from crystallized_safety.experiments.selection import cosmic_layers

    model = make_tiny("llama")
    ev_h, ev_n = HARMFUL[:4], HARMLESS[:4]
    sel = select_direction(model, (HARMFUL, HARMLESS), (ev_h, ev_n), positions=(-1,), kl_max=10.0, drop_last=0.25,
                           criterion="cosmic")  # fmt: skip
    layers = sel.settings["cosmic_layers"]
    assert layers == cosmic_layers(model, ev_h, ev_n) and len(layers) == 1
    # independent: the layer whose harmful and harmless mean activations have the lowest cosine, by numpy
    h = np.stack([_last(model, p) for p in ev_h]).mean(0)
    n = np.stack([_last(model, p) for p in ev_n]).mean(0)
    cos = [float(h[k] @ n[k] / np.linalg.norm(h[k]) / np.linalg.norm(n[k])) for k in range(model.n_layers)]
    assert layers == [int(np.argmin(cos))]
    for c in sel.candidates:
        bank = extract_directions(model, HARMFUL, HARMLESS, position=c.position)
        v, alpha = bank.direction(c.layer), float(bank.raw_norms[c.layer])
        want = _independent_cosmic(model, ev_h, ev_n, layers, v, alpha, c.layer)
        assert (c.bypass, c.induce) == pytest.approx(want, abs=1e-5)
        assert c.score == pytest.approx(c.bypass + c.induce)
    kept = [c for c in sel.candidates if c.kept]
    assert sel.chosen == max(kept, key=lambda c: c.bypass + c.induce)
    assert "COSMIC" in sel.bank.metadata["selection"]


def _last(model, prompt):
    text = model.format([prompt])[0]
    ids = model.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        hs = model.hf(**ids, output_hidden_states=True).hidden_states
    return np.stack([hs[k + 1][0, -1].double().numpy() for k in range(model.n_layers)])
