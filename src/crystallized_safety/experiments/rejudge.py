"""Re-judging stored responses: the labels a blind re-analysis counts are derived again from the response
text, not trusted from the store.

- `refusal`, `judge`, `judge_reason`: the substring judge (the one the runner applies, default settings) on
  each stored response. Always re-derived.
- `coherent`, `perplexity`, `distinct_n`: the coherence gate with the run's stored thresholds. The gate needs
  the *unsteered model* (perplexity) and its tokenizer (distinct-n and length count re-tokenized text), which
  no stored column replaces: they are re-derived only when the caller passes `load`, a callable that opens a
  model by its *anonymous* name (the analysis never sees a real one); without it they are kept as stored and
  the result says so. A spec without the gate stored none: nothing to re-derive.
- `score` (first-token refusal log-odds) is read from the steered generation's prefill logits, which the
  response text does not determine: kept as stored, always. So is what generation itself produced
  (`n_tokens`, `finished`, `token_ids`), and its degenerate-output flag: a row whose stored reason starts with
  "degenerate output:" (constant logits, which no text shows) keeps that reason and stays incoherent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from ..core.generation.output import DEGENERATE
from ..core.model import Model
from ..errors import JudgeError
from ..judges.coherence import CoherenceGate
from ..judges.substring import SubstringJudge
from ..progress import Progress, silent
from ..store import Store
from .spec import ExperimentSpec, SpecError, parse_spec

TEXT_COLUMNS = ("refusal", "judge", "judge_reason")
GATE_COLUMNS = ("coherent", "perplexity", "distinct_n", "relevance")
SCORE_KEPT = "first-token refusal log-odds come from the steered prefill logits, not from the response text"
GATE_KEPT = "the coherence gate needs the unsteered model and its tokenizer: pass load= to re-derive"
NO_GATE = "the spec runs no coherence gate: nothing was stored to re-derive"

ModelLoader = Callable[[str], Model]  # anonymous model name -> the model, unsteered


@dataclass(frozen=True)
class Rejudged:
    """What re-judging did for one model: how many rows, which columns it re-derived, which it kept (and
    why), and how many rows' labels changed from the stored ones."""

    rows: int
    rederived: tuple[str, ...]
    kept: dict[str, str]
    changed: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: as stored beside a verdict or printed."""
        return {**asdict(self), "rederived": list(self.rederived)}


def rejudge(
    store: Store,
    run_id: str,
    model: str,
    *,
    system: str | None,
    thresholds: dict | None,
    load: ModelLoader | None = None,
    thresholds_at_length: dict | None = None,
) -> Rejudged:
    """Re-label every stored generation of (run, model) from its response text and write the labels back (answers
    confirmed at length through the gate calibrated at length, `thresholds_at_length`, where there is one)."""
    rows = [(rowid, r) for rowid, r in store.rows("generations") if r["run_id"] == run_id and r["model"] == model]
    prompts, responses = [r["prompt"] for _i, r in rows], [r["response"] for _i, r in rows]
    labels = substring_labels(prompts, responses, [r["judge"] for _i, r in rows])
    kept = {"score": SCORE_KEPT}
    rederived: tuple[str, ...] = TEXT_COLUMNS
    if thresholds is None:
        kept.update(dict.fromkeys(GATE_COLUMNS, NO_GATE))
    elif load is None:
        kept.update(dict.fromkeys(GATE_COLUMNS, GATE_KEPT))
    else:
        unsteered = load(model)
        long = [bool(json.loads(r["condition"]).get("max_new_tokens")) for _i, r in rows]
        for at_length, limits in ((False, thresholds), (True, thresholds_at_length or thresholds)):
            idx = [i for i, x in enumerate(long) if x == at_length]
            if not idx:
                continue
            gate = CoherenceGate(unsteered, limits, system=system)
            found = gate.evaluate(
                [prompts[i] for i in idx], [responses[i] for i in idx], [labels[i]["refusal"] for i in idx]
            )
            for i, c in zip(idx, found):
                labels[i].update(
                    coherent=int(c.coherent), perplexity=c.perplexity, distinct_n=c.distinct, relevance=c.relevance
                )
        rederived = TEXT_COLUMNS + GATE_COLUMNS
    for label, (_i, row) in zip(labels, rows):
        if str(row["judge_reason"] or "").startswith(DEGENERATE):  # generation's own flag, as token_ids are
            label.update(judge_reason=row["judge_reason"], coherent=0)
    changed: dict[str, int] = {
        col: sum(label[col] != row[col] for label, (_i, row) in zip(labels, rows))
        for col in ("refusal", "coherent")
        if col in rederived
    }
    store.rewrite("generations", {rowid: label for label, (rowid, _r) in zip(labels, rows)})
    return Rejudged(len(rows), rederived, kept, changed)


def substring_labels(prompts: Sequence[str], responses: Sequence[str], stored_judges: Sequence[str]) -> list[dict]:
    """The substring judge's refusal label, judge id and reason for each response, by the judge that labelled it
    (the runner's, or its delayed-refusal reading for answers confirmed at length); a row labelled by another
    judge is refused, since re-judging it with this one would change the method, not check the label."""
    judges = {j.id: j for j in (SubstringJudge(), SubstringJudge(delayed=True))}
    other = next((j for j in stored_judges if j not in judges), None)
    if other is not None:
        raise JudgeError(
            f"a stored label comes from judge '{other}', the blind re-analysis re-judges with "
            f"'{' or '.join(judges)}': blind-analyse only runs judged by them (rerun `csafety run` with this version)"
        )
    out: list[dict] = [{} for _ in prompts]
    for name, judge in judges.items():
        idx = [i for i, j in enumerate(stored_judges) if j == name]
        verdicts = judge.judge([prompts[i] for i in idx], [responses[i] for i in idx]) if idx else []
        for i, v in zip(idx, verdicts):
            out[i] = {
                "refusal": None if v.refusal is None else int(v.refusal),
                "judge": v.judge,
                "judge_reason": v.reason,
            }
    return out


BLOCK = 256  # answers per progress step

JUDGING_KEYS = ("coherence.min_relevance", "verdict.confirm_by", "verdict.reference")
"""Spec keys a stored run can be re-judged under without generating again (they only change labels, or who must
confirm them: `verdict.confirm_by: reading` re-labels nothing, the resumed run waits for readers; a
`verdict.reference` added is generated when the copy resumes, and can only turn 'immune' inconclusive)."""


def flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: value}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        out.update(flat(value, name + ".") if isinstance(value, Mapping) else {name: value})
    return out


def rejudge_run(
    store: Store, run_id: str, spec: ExperimentSpec, out: Path, load: Callable[[str], Model], say: Progress = silent
) -> tuple[Store, dict[str, Rejudged]]:
    """Copy a run to `out` under `spec`, which may differ from the stored spec only in `JUDGING_KEYS` (the
    coherence gate v1 -> v2; who confirms a flip at length), and re-judge it: the copy is the run `spec` would have
    stored, minus any cell the new labels make the adaptive searches want (resuming it with `csafety run`
    generates those, then decides). v1 -> v2 adds relevance: it is measured on the answers the v1 gate passed
    (refusal 0, coherent 1), and each one below ``min_relevance`` becomes incoherent; every other label stands (v2
    never passes what v1 failed, and refusals are exempt), so no other row needs the model. A change of
    `verdict.confirm_by` alone re-labels nothing: readings decide what they can once stored."""
    old = parse_spec(yaml.safe_load(store.run_row(run_id)["spec_yaml"]), "the stored spec")
    before, after = flat(old.model_dump(mode="json")), flat(spec.model_dump(mode="json"))
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if any(k not in JUDGING_KEYS for k in changed):
        other = [k for k in changed if k not in JUDGING_KEYS]
        raise SpecError(
            f"the new spec also changes {', '.join(other[:4])}: only {', '.join(JUDGING_KEYS)} can change without "
            "generating again; run the new spec into a new --store"
        )
    if after.get("verdict.confirm_by") == "gate" and before.get("verdict.confirm_by") == "reading":
        raise SpecError(
            "verdict.confirm_by can change from gate to reading only: readers' labels, once seen, are not dropped "
            "(that could only add flips)"
        )
    if before.get("verdict.reference") is not None and after.get("verdict.reference") != before["verdict.reference"]:
        raise SpecError(
            "verdict.reference can be added only: its answers, once generated and read, stay with the run (a "
            "different reference is a new run)"
        )
    relevance = "coherence.min_relevance" in changed or not changed
    if relevance and (
        not old.coherence.enabled or old.coherence.min_relevance is not None or spec.coherence.min_relevance is None
    ):
        raise SpecError(
            "re-judging adds the coherence gate's relevance rule to a run gated without it: the stored spec needs "
            "coherence enabled and no min_relevance, the new one a min_relevance"
        )
    copy = store.copy_run(run_id, out)
    new_id = spec.spec_hash()
    copy.rename_run(run_id, new_id, spec.to_yaml())
    report = {}
    for model in spec.models:
        record: dict[str, Any] = {"from_run": run_id, "changed": {k: [before.get(k), after.get(k)] for k in changed}}
        if not relevance:  # only who confirms changed: every stored label stands
            report[model] = Rejudged(0, (), {}, {"coherent": 0})
            copy.put_artifact(new_id, model, "rejudged", {**record, "measured": 0, "off_topic": 0})
            continue
        stored = copy.get_artifact(new_id, model, "coherence")
        if stored is None:
            raise SpecError(f"run {run_id} stored no coherence thresholds for {model}: nothing to re-judge")
        thresholds = {**stored[0], "min_relevance": spec.coherence.min_relevance, "relevant_share": None}
        gate = CoherenceGate(load(model), thresholds, system=spec.generation.system)
        copy.put_artifact(new_id, model, "coherence", thresholds)
        report[model] = add_relevance(copy, new_id, model, gate, say)
        record.update(measured=report[model].rows, off_topic=report[model].changed["coherent"])
        copy.put_artifact(new_id, model, "rejudged", record)
    return copy, report


def add_relevance(store: Store, run_id: str, model: str, gate: CoherenceGate, say: Progress = silent) -> Rejudged:
    """Measure relevance on the (run, model) answers the v1 gate passed and apply the gate's min_relevance."""
    assert gate.thresholds is not None and gate.thresholds.min_relevance is not None  # set by rejudge_run
    rows = [
        (rowid, r)
        for rowid, r in store.rows("generations")
        if r["run_id"] == run_id and r["model"] == model and r["refusal"] == 0 and r["coherent"] == 1
    ]
    values: list[float | None] = []
    for start in range(0, len(rows), BLOCK):
        say(f"{model}: relevance of the answers", start, len(rows))
        block = rows[start : start + BLOCK]
        stored = [r["perplexity"] for _i, r in block]  # the same gate's, in its own context: reused
        values += gate.relevances([r["prompt"] for _i, r in block], [r["response"] for _i, r in block], None, stored)
    say(f"{model}: relevance of the answers", len(rows), len(rows))
    floor = gate.thresholds.min_relevance
    updates = {
        rowid: {"relevance": v, "coherent": int(v is not None and v >= floor)} for (rowid, _r), v in zip(rows, values)
    }
    store.rewrite("generations", updates)
    off_topic = sum(u["coherent"] == 0 for u in updates.values())
    kept = {"refusal": "same judge, same text", "perplexity": "unchanged rule", "distinct_n": "unchanged rule"}
    return Rejudged(len(rows), ("relevance", "coherent"), kept, {"coherent": off_topic})
