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

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..core.generation.output import DEGENERATE
from ..core.model import Model
from ..errors import JudgeError
from ..judges.coherence import CoherenceGate
from ..judges.substring import SubstringJudge
from ..store import Store

TEXT_COLUMNS = ("refusal", "judge", "judge_reason")
GATE_COLUMNS = ("coherent", "perplexity", "distinct_n")
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
) -> Rejudged:
    """Re-label every stored generation of (run, model) from its response text and write the labels back."""
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
        gate = CoherenceGate(load(model), thresholds, system=system)
        for label, c in zip(labels, gate.evaluate(prompts, responses, [label["refusal"] for label in labels])):
            label.update(coherent=int(c.coherent), perplexity=c.perplexity, distinct_n=c.distinct)
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
    """The substring judge's refusal label, judge id and reason for each response; a row labelled by another
    judge is refused, since re-judging it with this one would change the method, not check the label."""
    judge = SubstringJudge()
    other = next((j for j in stored_judges if j != judge.id), None)
    if other is not None:
        raise JudgeError(
            f"a stored label comes from judge '{other}', the blind re-analysis re-judges with '{judge.id}': "
            "blind-analyse only runs judged by it (rerun `csafety run` with this version)"
        )
    return [
        {"refusal": None if v.refusal is None else int(v.refusal), "judge": v.judge, "judge_reason": v.reason}
        for v in judge.judge(list(prompts), list(responses))
    ]
