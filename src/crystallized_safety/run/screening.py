"""Screening: baselines first, then the first-token refusal score of every screened cell from forward passes
only; the chunks of cells outside the band that are not among the best are dropped. The decisions are kept
in the store, so a resumed run drops the same chunks."""

from __future__ import annotations

from collections.abc import Callable

from ..core.model import Model
from ..experiments.conditions import HARMFUL, HARMLESS, Condition, StudyPlan, baseline
from ..experiments.spec import ExperimentSpec
from ..judges.refusal_score import RefusalScoreJudge
from ..progress import Progress
from ..store import Store
from .chunks import Chunk, Pack, make_packs, pack_intervention
from .executors.base import Executor
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
) -> list[Chunk]:
    """The chunks that survive screening (all baselines are generated first, through `executor`)."""
    model_name = ctx.model_name

    def compute() -> tuple[dict, None]:
        base_keys = {baseline(HARMFUL).key, baseline(HARMLESS).key}
        done = store.done_chunks(run_id)
        pending = [p for p in make_packs([c for c in chunks if c.condition.key in base_keys], 0)]
        pending = [p for p in pending if any(c.key not in done for c in p)]

        def sink(pack: Pack, rows, seconds: float, worker: str) -> None:
            entries = [(c.key, c.model, c.study, c.condition.key, r) for c, r in zip(pack, rows)]
            store.write_chunks(run_id, entries, seconds, worker)

        executor.run(load, ctx, pending, sink)
        say(f"{model_name}: screening the grid with the first-token refusal score", 0, 1)
        return screen_cells(spec, store, run_id, load(), ctx, plans), None

    found, _ = store.cached(run_id, model_name, "screening", compute)
    dropped = set(found["dropped"])
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


def screen_cells(
    spec: ExperimentSpec, store: Store, run_id: str, model: Model, ctx: ModelContext, plans: list[StudyPlan]
) -> dict:
    """Screened flip rate per cell: baseline-refused prompts whose steered first-token score falls at or
    below the threshold calibrated against the substring judge on the unsteered outputs."""
    base = {r["prompt_index"]: r for r in store.generations(run_id, ctx.model_name, baseline(HARMFUL).key, HARMFUL)}
    harmless = store.generations(run_id, ctx.model_name, baseline(HARMLESS).key, HARMLESS)
    both = base | {-1 - r["prompt_index"]: r for r in harmless}
    scorer = RefusalScoreJudge(model, system=ctx.system)
    cal = scorer.calibrate([r["prompt"] for r in both.values()], [bool(r["refusal"]) for r in both.values()])
    order = sorted(base)
    prompts = [base[i]["prompt"] for i in order]
    refused = [k for k, i in enumerate(order) if base[i]["refusal"] == 1]
    bank, transfer = ctx.bank(), ctx.transfer()
    cells = screened_conditions(spec, plans)
    conds = list(cells.values())
    per = max(1, 256 // max(len(prompts), 1))
    rates: dict[str, float | None] = {}
    for i in range(0, len(conds), per):
        group = conds[i : i + per]
        parts = [group] if all(c.mode == "add" for c in group) else [[c] for c in group]
        for part in parts:
            iv = pack_intervention(part, len(prompts), bank, transfer, ctx.seed)
            scores = scorer.scores(prompts * len(part), iv).view(len(part), len(prompts))
            for j, cond in enumerate(part):
                flips = sum(1 for k in refused if float(scores[j, k]) <= cal.threshold)
                rates[cond.key] = flips / len(refused) if refused else None
    lo, hi = spec.screening.band
    ranked = sorted((k for k in rates if rates[k] is not None), key=lambda k: -(rates[k] or 0.0))
    keep = {k for k in ranked if lo <= (rates[k] or 0.0) <= hi} | set(ranked[: spec.screening.best])
    return {
        "threshold": cal.threshold,
        "calibration_accuracy": cal.accuracy,
        "calibration_kappa": cal.kappa,
        "cells": [
            {"condition_key": k, "condition": cells[k].describe(), "screened_flip": rates[k], "kept": k in keep}
            for k in cells
        ],
        "dropped": sorted(set(cells) - keep),
    }
