"""Confirmation at length: the cell a verdict rests on is re-generated to `verdict.confirm_tokens` new tokens and
re-judged (the substring judge reading delayed refusals, the same coherence gate), and only its flips that survive
count (`verdict.evidence_cells`).

It goes in rounds over parts of the prompts: a quarter of them, or as many as one generate holds (the run's
`pack_rows`), whichever is more. Each round takes every cell that passes now (single-layer cells; multi-layer ones
only when no single-layer cell passes) whose flips are not all confirmed, and generates the next part of each at
length, in one packed batch. Larger rounds cost less per row, smaller ones stop sooner for a cell that fails
(Qwen2.5-Coder-0.5B, 2 cores of an AMD EPYC, 128 tokens: ~2.9 s a row in rounds of 14, ~2.1 s in rounds of 56);
on the shipped Qwen study the two came out about even (results/qwen-run.log).
A flip not yet re-generated keeps its short-answer outcome (an
upper bound), so a cell whose survivors fall too low stops passing and is confirmed no further: it could not pass
whatever the rest showed. Rounds end when the cell that decides is fully confirmed, or no cell passes. The rows are
stored under the confirmation's own condition key (study `confirmation`), so a resumed run confirms nothing twice."""

from __future__ import annotations

import math

from ..errors import StoreError
from ..experiments.conditions import Condition, StudyPlan
from ..experiments.decision import Cell, deciding_cell, fully_confirmed, passing
from ..experiments.spec import ExperimentSpec, PromptSets
from ..experiments.verdict import confirm_tokens, evidence_cells, rules_of
from ..progress import Progress
from .chunks import Chunk, chunks_of
from .generator import CellGenerator

STUDY = "confirmation"
ROUNDS = 4  # at most: a cell's prompts are confirmed a quarter at a time, or more at once (`round_rows`)


def confirmation_chunks(
    spec: ExperimentSpec, model: str, cond: Condition, sets: PromptSets, round_rows: int = 0
) -> list[Chunk]:
    """The chunks that confirm `cond` at length: its prompts in quarters, or `round_rows` at a time if more."""
    n = len(sets.eval_harmful)
    size = min(n, max(1, math.ceil(n / ROUNDS), round_rows))
    return chunks_of(spec, model, STUDY, cond, sets, batch_size=size)


def candidates(single: list[Cell], multi: list[Cell], rules, planned: tuple[int, int]) -> list[Cell]:
    """The cells that pass now and are not fully confirmed: single-layer ones, else multi-layer ones."""
    for cells, size in ((single, planned[0]), (multi, planned[1])):
        ok = passing(cells, rules, size)[0]
        if ok.any():
            return [c for c, p in zip(cells, ok) if p and not fully_confirmed(c)]
    return []


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
        single, multi, planned, _checked = evidence_cells(plans, generate.cells(), {}, tokens)
        deciding = deciding_cell(single, multi, rules, planned)
        if deciding is None or fully_confirmed(deciding):
            return touched
        todo: list[Chunk] = []
        for cell in candidates(single, multi, rules, planned):
            chunks = confirmation_chunks(spec, name, cell.source.confirmed(tokens), sets, round_rows)
            done = generate.done()
            nxt = next((c for c in chunks if c.key not in done), None)
            if nxt is None:
                raise StoreError(
                    f"{name}: the store marks {cell.label} confirmed at {tokens} tokens but holds no rows for some of "
                    "its prompts: run `csafety store check` on it, or rerun into a fresh store"
                )
            todo.append(nxt)
            touched += [] if cell.label in touched else [cell.label]
        rounds += 1
        say(
            f"{name}: confirming at {tokens} tokens (round {rounds})",
            rounds - 1,
            None,
            f"{len(todo)} cells pass unconfirmed; deciding: {deciding.label}",
        )
        generate.run_chunks(todo)
