"""Screening: baselines first, then the first-token refusal score of every screened cell from forward passes
only; the chunks of cells below the band that are not among the best are dropped. The decisions are kept
in the store, so a resumed run drops the same chunks."""

from __future__ import annotations

from collections.abc import Callable

from ..core import modes
from ..core.model import Model
from ..experiments.conditions import HARMFUL, HARMLESS, Condition, StudyPlan, baseline
from ..experiments.spec import ExperimentSpec
from ..judges.refusal_score import RefusalScoreJudge
from ..progress import Progress
from ..store import Store
from .chunks import Chunk, pack_intervention
from .executors.base import Executor
from .generator import CellGenerator
from .threshold_search import search_thresholds
from .worker import ModelContext


def screen(
    spec: ExperimentSpec,
    store: Store,
    run_id: str,
    executor: Executor,
    load: Callable[[], Model],
    ctx: ModelContext,
    plans: list[StudyPlan],
    chunks: list[Chunk],
    say: Progress,
    rows: int = 0,
) -> list[Chunk]:
    """The chunks that survive screening (all baselines are generated first, through `executor`; the adaptive
    search also generates the cells it confirms). A cell that a study outside the screened kinds also needs is
    never dropped."""
    model_name = ctx.model_name
    generate = CellGenerator(store, run_id, executor, load, ctx, chunks, rows)

    def flip_rate(cond: Condition) -> float | None:
        return generate.cells().stats(cond)["flip"]["rate"]

    def compute() -> tuple[dict, None]:
        generate([baseline(HARMFUL), baseline(HARMLESS)], 0)
        screener = Screener(store, run_id, load(), ctx)
        cells = screened_conditions(spec, plans)
        if spec.screening.mode == "adaptive":
            prefix: Progress = lambda phase, *a, **k: say(f"{model_name}: {phase}", *a, **k)  # noqa: E731
            return search_thresholds(spec, screener, cells, plans, generate, flip_rate, prefix), None
        say(f"{model_name}: screening the grid with the first-token refusal score", 0, 1)
        return screen_cells(spec, screener, cells), None

    found, _ = store.cached(run_id, model_name, "screening", compute)
    needed = {c.key for plan in plans if plan.kind not in spec.screening.kinds for _t, c in plan.conditions}
    dropped = set(found["dropped"]) - needed
    return [c for c in chunks if c.condition.key not in dropped]


def screened_conditions(spec: ExperimentSpec, plans: list[StudyPlan]) -> dict[str, Condition]:
    """Steered harmful cells along the extracted direction, in the kinds the spec screens."""
    cells: dict[str, Condition] = {}
    for plan in plans:
        if plan.kind not in spec.screening.kinds:
            continue
        for _tags, cond in plan.conditions:
            if cond.prompt_set == HARMFUL and cond.direction == "extracted" and cond.key not in cells:
                cells[cond.key] = cond
    return cells


class Screener:
    """Screened flip rates of cells: baseline-refused prompts whose steered first-token score falls at or below the
    threshold calibrated against the substring judge on the unsteered outputs (forward passes only)."""

    def __init__(self, store: Store, run_id: str, model: Model, ctx: ModelContext) -> None:
        base = {r["prompt_index"]: r for r in store.generations(run_id, ctx.model_name, baseline(HARMFUL).key, HARMFUL)}
        harmless = store.generations(run_id, ctx.model_name, baseline(HARMLESS).key, HARMLESS)
        both = base | {-1 - r["prompt_index"]: r for r in harmless}
        self.scorer = RefusalScoreJudge(model, system=ctx.system)
        self.cal = self.scorer.calibrate(
            [r["prompt"] for r in both.values()], [bool(r["refusal"]) for r in both.values()]
        )
        order = sorted(base)
        self.prompts = [base[i]["prompt"] for i in order]
        self.refused = [k for k, i in enumerate(order) if base[i]["refusal"] == 1]
        self.bank, self.transfer, self.seed = ctx.bank(), ctx.transfer(), ctx.seed
        self.scored = 0  # cells scored so far (each: one forward pass over the prompts)

    def rates(self, conds: list[Condition]) -> dict[str, float | None]:
        """Screened flip rate per condition key ('add' cells share forward passes, ablations run alone)."""
        per = max(1, 256 // max(len(self.prompts), 1))
        rates: dict[str, float | None] = {}
        for i in range(0, len(conds), per):
            group = conds[i : i + per]
            parts = [group] if all(modes.mode(c.mode).packs for c in group) else [[c] for c in group]
            for part in parts:
                iv = pack_intervention(part, len(self.prompts), self.bank, self.transfer, self.seed)
                scores = self.scorer.scores(self.prompts * len(part), iv).view(len(part), len(self.prompts))
                for j, cond in enumerate(part):
                    flips = sum(1 for k in self.refused if float(scores[j, k]) <= self.cal.threshold)
                    rates[cond.key] = flips / len(self.refused) if self.refused else None
        self.scored += len(conds)
        return rates

    def calibration(self) -> dict:
        return {
            "threshold": self.cal.threshold,
            "calibration_accuracy": self.cal.accuracy,
            "calibration_kappa": self.cal.kappa,
        }


def screen_cells(spec: ExperimentSpec, screener: Screener, cells: dict[str, Condition]) -> dict:
    """Band mode: every screened cell's rate; those below the band and not among the best are dropped (cells
    above it are kept: dropping them could delete the very cell that decides 'liquid')."""
    rates = screener.rates(list(cells.values()))
    lo = spec.screening.band[0]
    ranked = sorted((k for k in rates if rates[k] is not None), key=lambda k: -(rates[k] or 0.0))
    # above the band is kept too: a cell screened as certain to flip is the one that could decide 'liquid'
    keep = {k for k in ranked if (rates[k] or 0.0) >= lo} | set(ranked[: spec.screening.best])
    return {
        **screener.calibration(),
        "mode": "band",
        "cells": [
            {"condition_key": k, "condition": cells[k].describe(), "screened_flip": rates[k], "kept": k in keep}
            for k in cells
        ],
        "dropped": sorted(set(cells) - keep),
    }
