"""Confirmation at length: the cell a verdict rests on is re-generated to `verdict.confirm_tokens` new tokens and
re-judged (the substring judge reading delayed refusals, the same coherence gate), and only its flips that survive
count (`verdict.evidence_cells`).

Only the cell's short-answer flips are re-generated (a refusal or an incoherent answer cannot become a counted
flip at length), in rounds: a quarter of them, or as many as one generate holds (the run's `pack_rows`), whichever
is more. Each round takes every cell that passes now (single-layer cells; multi-layer ones only when no
single-layer cell passes) whose flips are not all confirmed, and generates the next part of each at length.
Larger rounds cost less per row, smaller ones stop sooner for a cell that fails. A flip not yet re-generated
keeps its short-answer outcome (an upper bound), so a cell whose survivors fall too low stops passing and is
confirmed no further: it could not pass whatever the rest showed. Rounds end when the cell that decides is fully
confirmed (a fully confirmed passing cell decides before an unconfirmed one: `decision.deciding_cell`), or no cell
passes. The rows are stored under the
confirmation's own condition key (study `confirmation`), so a resumed run confirms nothing twice.

Under `verdict.confirm_by: reading` a flip at length counts only once a blind reader labels it full compliance
(experiments/reading.py); rounds also take the cells whose upper bound keeps a layer (or the multi-layer grid)
from being excluded, since only their confirmed counts can exclude them, and end when what is left awaits reading."""

from __future__ import annotations

import math

import numpy as np

from ..experiments.conditions import HARMFUL, Condition, StudyPlan
from ..experiments.decision import Cell, blocking, deciding_cell, fully_confirmed, passing
from ..experiments.prompt_sets import PromptSets
from ..experiments.results import Cells
from ..experiments.spec import ExperimentSpec
from ..experiments.verdict import confirm_tokens, evidence_cells, rules_of
from ..progress import Progress
from .chunks import Chunk
from .generator import CellGenerator

STUDY = "confirmation"
ROUNDS = 4  # at most: a cell's prompts are confirmed a quarter at a time, or more at once (`round_rows`)


def next_round(
    model: str, cond: Condition, sets: PromptSets, flips: list[int], have: set[int], round_rows: int = 0
) -> Chunk | None:
    """The next round that confirms `cond` (already at length: `Condition.confirmed`): the first of its flips
    (eval-set indices, in order) that have no row at length yet, a quarter of them or `round_rows` if more; None
    when every flip has its row."""
    size = min(len(flips), max(1, math.ceil(len(flips) / ROUNDS), round_rows))
    part = tuple(i for i in flips if i not in have)[:size]
    if not part:
        return None
    prompts = sets.eval_harmful if cond.prompt_set == HARMFUL else sets.eval_harmless
    assert cond.max_new_tokens is not None  # a confirmation condition carries its own length
    return Chunk(model, STUDY, cond, part[0], tuple(prompts[i] for i in part), cond.max_new_tokens, part)


def short_flips(cell: Cell, cells: Cells, refused: list[int]) -> list[int]:
    """The eval-set indices of `cell`'s short-answer flips (prompts refused at baseline that it flipped)."""
    outcomes = cells.outcomes(cell.source, refused)
    return [i for i, o in zip(refused, outcomes) if o == 1]


def candidates(single: list[Cell], multi: list[Cell], rules, planned: tuple[int, int]) -> list[Cell]:
    """The cells that pass now and are not fully confirmed: single-layer ones, else multi-layer ones. Under
    `confirm_by: reading`, also every cell whose upper bound keeps a verdict from excluding it (`blocking`): read,
    its count can only fall, so an exclusion rests on readings; and since a reading round costs a reader's time,
    every cell the verdict may need is confirmed in the same round."""
    ok_single = passing(single, rules, planned[0])[0]
    reads = rules.confirm_by == "reading"
    if ok_single.any() and not reads:
        return [c for c, p in zip(single, ok_single) if p and not fully_confirmed(c)]
    ok_multi = passing(multi, rules, planned[1])[0] if not ok_single.any() else np.zeros(len(multi), dtype=bool)
    chosen = [c for c, p in zip(single, ok_single) if p and not fully_confirmed(c)]
    chosen += [c for c, p in zip(multi, ok_multi) if p and not fully_confirmed(c)]
    if reads:
        more = blocking(single, rules, in_band=True) + blocking(multi, rules)
        chosen += [c for c in more if all(c is not x for x in chosen)]
    return chosen


def confirm(
    spec: ExperimentSpec,
    plans: list[StudyPlan],
    generate: CellGenerator,
    sets: PromptSets,
    n_layers: int,
    say: Progress,
    round_rows: int = 0,
) -> list[str]:
    """Confirm in rounds until the deciding cell is fully confirmed or none passes; returns the cells touched.
    `round_rows`: prompts per round when more than a quarter (the runner passes its `pack_rows`)."""
    tokens = confirm_tokens(spec)
    if tokens is None:
        return []
    rules, name = rules_of(spec, n_layers), generate.ctx.model_name
    touched: list[str] = []
    rounds = 0
    while True:
        cells = generate.cells()
        single, multi, planned, _checked = evidence_cells(plans, cells, {}, tokens)
        deciding = deciding_cell(single, multi, rules, planned)
        # under reading every passing or blocking cell must be confirmed, not only the deciding one: rounds end when
        # none of them misses a row at length (`todo` below is empty)
        if rules.confirm_by != "reading" and (deciding is None or fully_confirmed(deciding)):
            return touched
        todo: list[Chunk] = []
        refused = cells.refused_at_baseline()
        for cell in candidates(single, multi, rules, planned):
            cond = cell.source.confirmed(tokens)
            nxt = next_round(
                name, cond, sets, short_flips(cell, cells, refused), cells.prompt_indices(cond), round_rows
            )
            if nxt is not None:
                todo.append(nxt)
                touched += [] if cell.label in touched else [cell.label]
        if not todo:  # every flip has its row at length; an undecided one (no judge reading) stays unconfirmed
            return touched
        rounds += 1
        keeping = ", or keeping a layer open" if rules.confirm_by == "reading" else ""
        say(
            f"{name}: confirming at {tokens} tokens (round {rounds})",
            rounds - 1,
            None,
            f"{len(todo)} cells to confirm (passing{keeping}); deciding: {deciding.label}"
            if deciding is not None
            else f"{len(todo)} cells keep a layer from being excluded",
        )
        generate.run_chunks(todo)
