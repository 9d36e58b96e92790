"""Confirmation at length: the cell a verdict rests on is re-generated to `verdict.confirm_tokens` new tokens and
re-judged (the substring judge reading delayed refusals, the same coherence gate), and only its flips that survive
count (`verdict.evidence_cells`). Confirming a cell can only lower its count, so another cell may decide next: it
is confirmed in turn, until the deciding cell is a confirmed one or no cell passes. The rows are stored under the
confirmation's own condition key (study `confirmation`), so a resumed run confirms nothing twice."""

from __future__ import annotations

from ..experiments.conditions import StudyPlan
from ..experiments.decision import deciding_cell
from ..experiments.spec import ExperimentSpec, PromptSets
from ..experiments.verdict import confirm_tokens, evidence_cells, rules_of
from ..progress import Progress
from .chunks import chunks_of
from .generator import CellGenerator

STUDY = "confirmation"


def confirm(
    spec: ExperimentSpec,
    plans: list[StudyPlan],
    generate: CellGenerator,
    sets: PromptSets,
    n_layers: int,
    say: Progress,
) -> list[str]:
    """Confirm deciding cells until the one that decides is confirmed; returns the labels confirmed now."""
    tokens = confirm_tokens(spec)
    if tokens is None:
        return []
    rules, name = rules_of(spec, n_layers), generate.ctx.model_name
    done: list[str] = []
    while True:
        single, multi, planned, _checked = evidence_cells(plans, generate.cells(), {}, tokens)
        cell = deciding_cell(single, multi, rules, planned)
        if cell is None or cell.confirmed is not None:
            return done
        cond = cell.source.confirmed(tokens)
        if cell.label in done:  # generated, yet no row came back: nothing more to confirm with
            raise RuntimeError(f"{name}: confirming {cell.label} at {tokens} tokens stored no rows")
        say(f"{name}: confirming the deciding cell at {tokens} tokens", len(done), len(done) + 1, cell.label)
        generate.add(chunks_of(spec, name, STUDY, cond, sets))
        generate([cond])
        done.append(cell.label)
