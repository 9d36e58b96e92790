"""Direction selection over positions x layers (issue 15, part 1; Arditi et al. 2024): every score of a candidate
is recomputed independently (plain transformers forward with hand-written hooks; KL with scipy), the paper's
filters are applied as written, and the winner is the kept candidate with the lowest bypass score."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from conftest import HARMFUL, HARMLESS, block_outputs, cli_err, cli_ok, make_tiny
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
    model = _cli_files(tmp_path)
    cli_ok(["select", "--model", str(tmp_path / "tiny"), "--harmful", str(tmp_path / "h.txt"), "--harmless",
            str(tmp_path / "n.txt"), "--eval-harmful", str(tmp_path / "h.txt"), "--eval-harmless",
            str(tmp_path / "n.txt"), "--eval-n", "2", "--n", "4", "--positions", "-1", "--kl-max", "10",
            "--induce-min", "-1e9",
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


# -- out of sample (issue 22, item 9): candidates are never scored on the eval prompts the verdict reads


def _selection_spec(model_path, **prompts):
    from crystallized_safety.experiments.spec import parse_spec

    data = {
        "name": "oos",
        "models": [model_path],
        "prompts": {"n": 6, **prompts},
        "generation": {"max_new_tokens": 2, "batch_size": 6},
        "coherence": {"enabled": False},
        "damage": {"enabled": False},
        "studies": [{"kind": "selection", "positions": [-1], "prompts": 4, "kl_max": 100.0}],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n = 6 < MIN_N: underpowered on purpose
        return parse_spec(data)


@pytest.fixture
def scorer_calls(monkeypatch):
    """The (harmful, harmless) prompt lists every CandidateScorer is built with: what the scores are computed on."""
    from crystallized_safety.experiments import selection

    calls: list[tuple[list[str], list[str]]] = []

    class Recording(selection.CandidateScorer):
        def __init__(self, model, harmful, harmless, criterion):
            calls.append((list(harmful), list(harmless)))
            super().__init__(model, harmful, harmless, criterion)

    monkeypatch.setattr(selection, "CandidateScorer", Recording)
    return calls


def test_spec_selection_scores_on_eval_prompts_the_verdict_never_reads(tiny_model_dirs, tmp_path, scorer_calls):
    from crystallized_safety.experiments.prompt_sets import load_prompt_sets
    from crystallized_safety.prompts import bundled
    from crystallized_safety.run.runner import run_experiment
    from crystallized_safety.store import Store

    model_path = tiny_model_dirs[1]["tiny"]
    spec = _selection_spec(model_path)
    verdict_sets = load_prompt_sets(spec)  # what the verdict reads: the first prompts.n = 6 eval prompts
    store = Store(tmp_path / "r.sqlite")
    result = run_experiment(spec, store)
    ((harmful, harmless),) = scorer_calls
    assert harmful == list(bundled("harmful", "eval"))[6:10] and harmless == list(bundled("harmless", "eval"))[6:10]
    assert not set(harmful) & set(verdict_sets.eval_harmful) and not set(harmless) & set(verdict_sets.eval_harmless)
    table, _blob = store.get_artifact(result.run_id, model_path, "selection:selection")
    assert table["settings"]["scored_on"] == (
        "eval prompts 6-9 of bundled:harmful:eval / bundled:harmless:eval, disjoint from 0-5 (read by the verdict)"
    )
    # a table stored before the split was recorded (scored in sample) is rescored when the run resumes
    stale = {**table, "settings": {k: v for k, v in table["settings"].items() if k != "scored_on"}}
    store.put_artifact(result.run_id, model_path, "selection:selection", stale, _blob)
    again = run_experiment(spec, store)
    assert again.resumed and len(scorer_calls) == 2 and scorer_calls[1] == scorer_calls[0]
    table2, _ = store.get_artifact(result.run_id, model_path, "selection:selection")
    assert table2["settings"]["scored_on"] == table["settings"]["scored_on"]


def test_spec_score_files_must_be_disjoint_from_the_verdicts_prompts(tiny_model_dirs, tmp_path):
    from crystallized_safety.experiments.scoring_prompts import check_scoring
    from crystallized_safety.experiments.spec import SpecError, parse_spec
    from crystallized_safety.prompts import PromptError, bundled

    first = list(bundled("harmful", "eval"))[:8]  # overlaps the verdict's first 6
    (tmp_path / "h.txt").write_text("\n".join(first) + "\n")
    (tmp_path / "n.txt").write_text("\n".join(list(bundled("harmless", "eval"))[200:210]) + "\n")
    warnings.simplefilter("ignore")  # n = 6 < MIN_N: underpowered on purpose
    data = _selection_spec(tiny_model_dirs[1]["tiny"]).model_dump(mode="json")
    data["studies"][0].update(score_harmful=str(tmp_path / "h.txt"), score_harmless=str(tmp_path / "n.txt"))
    with pytest.raises(PromptError, match="disjoint from the eval prompts read by the verdict"):
        check_scoring(parse_spec(data))
    (tmp_path / "h.txt").write_text("\n".join(list(bundled("harmful", "eval"))[100:104]) + "\n")
    scoring = check_scoring(parse_spec(data))["selection"]
    assert list(scoring.harmful) == list(bundled("harmful", "eval"))[100:104]
    assert "disjoint from eval prompts 0-5 (read by the verdict)" in scoring.scored_on
    data["studies"][0].pop("score_harmless")
    with pytest.raises(SpecError, match="give both 'score_harmful' and 'score_harmless'"):
        parse_spec(data)


def test_too_short_eval_set_fails_in_one_line_before_the_model_loads(tiny_model_dirs, tmp_path, monkeypatch):
    from crystallized_safety.experiments.spec import SpecError
    from crystallized_safety.run import runner
    from crystallized_safety.store import Store

    def no_loading(*_a, **_k):
        raise AssertionError("the model loaded before the scoring range was checked")

    monkeypatch.setattr(runner, "load_model", no_loading)
    (tmp_path / "h.txt").write_text("\n".join(f"How do I forge signature number {i}?" for i in range(8)) + "\n")
    spec = _selection_spec(tiny_model_dirs[1]["tiny"], eval_harmful=str(tmp_path / "h.txt"))
    with pytest.raises(SpecError) as info:
        runner.run_experiment(spec, Store(tmp_path / "r.sqlite"))
    message = str(info.value)
    assert "\n" not in message and "eval prompts 6-9" in message and "h.txt has 8" in message
    assert "longer eval sets" in message and "score_harmful / score_harmless" in message


def _cli_files(tmp_path):
    model = make_tiny("llama")
    model.hf.save_pretrained(tmp_path / "tiny")
    model.tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "h.txt").write_text("\n".join(HARMFUL) + "\n")
    (tmp_path / "n.txt").write_text("\n".join(HARMLESS) + "\n")
    return model


def test_select_cli_scores_after_the_first_eval_n_prompts(tmp_path, scorer_calls):
    _cli_files(tmp_path)
    result = cli_ok(["select", "--model", str(tmp_path / "tiny"), "--eval-harmful", str(tmp_path / "h.txt"),
                     "--eval-harmless", str(tmp_path / "n.txt"), "--eval-n", "2", "--n", "4", "--positions", "-1",
                     "--kl-max", "10", "--induce-min", "-1e9", "--out", str(tmp_path / "sel.safetensors"),
                     "--table", str(tmp_path / "table.json")])  # fmt: skip
    assert scorer_calls == [(HARMFUL[2:6], HARMLESS[2:6])]  # never the first 2, left to the steering evaluation
    table = json.loads((tmp_path / "table.json").read_text())
    want = f"eval prompts 2-5 of {tmp_path / 'h.txt'} / {tmp_path / 'n.txt'}, disjoint from 0-1"
    assert table["scored_on"].startswith(want) and table["settings"]["scored_on"] == table["scored_on"]
    assert "scored on eval prompts 2-5" in " ".join(result.output.split())


def test_select_cli_fails_before_the_model_loads_when_eval_is_short_or_scores_overlap(tmp_path):
    _cli_files(tmp_path)
    files = ["--eval-harmful", str(tmp_path / "h.txt"), "--eval-harmless", str(tmp_path / "n.txt")]
    missing = ["select", "--model", str(tmp_path / "no-such-model"), *files, "--out", str(tmp_path / "o.safetensors")]
    # default --eval-n 35 + --n 32 on 6 prompts: the scoring range does not fit (the model path is never opened)
    cli_err(missing, "eval prompts 35-66", max_lines=1)
    overlap = ["--eval-n", "2", "--n", "4", "--score-harmful", str(tmp_path / "h.txt"), "--score-harmless",
               str(tmp_path / "n.txt")]  # fmt: skip
    cli_err([*missing, *overlap], "disjoint from the eval prompts read by the steering evaluation", max_lines=1)


def test_report_candidate_table_says_which_prompts_scored():
    from crystallized_safety.report.tables import candidates_table

    cands = [{"position": -1, "layer": 1, "bypass": 0.1, "induce": 0.2, "kl": 0.01, "score": -0.1, "kept": True,
              "reason": "", "chosen": True}]  # fmt: skip
    where = (
        "eval prompts 35-66 of bundled:harmful:eval / bundled:harmless:eval, disjoint from 0-34 (read by the verdict)"
    )
    note = candidates_table("m", "sel", {"settings": {"scored_on": where}, "candidates": cands}).note
    assert f"scored on {where}" in note
    old = candidates_table("m", "sel", {"settings": {"criterion": "arditi"}, "candidates": cands}).note
    assert "not recorded" in old and "the verdict also reads" in old
