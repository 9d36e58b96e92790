"""Damage per cell: the KL divergence of each steered condition to the unsteered model on the first harmless
eval prompts, teacher-forced on the unsteered model's own (stored) answers. One artifact per intervention
(`damage:<key of its harmless twin>`), written as it is measured, so an interrupted run resumes where it
stopped; a condition on harmful prompts and the same intervention on harmless ones share one measurement. Only
interventions that were generated (on either prompt set) are measured: a cell a frontier walk planned but never
reached has no rates for its KL to stand beside."""

from __future__ import annotations

import json
from collections.abc import Callable

from ..core.model import Model
from ..experiments.conditions import HARMLESS, Condition, StudyPlan, baseline, build_intervention
from ..experiments.results import DAMAGE_PREFIX, harmless_twin
from ..experiments.spec import ExperimentSpec
from ..judges.divergence import DivergenceMeter
from ..progress import Progress
from ..store import Store
from .worker import ModelContext

GROUP = 8  # interventions measured between two writes (and progress lines)


def measure_damage(
    spec: ExperimentSpec,
    store: Store,
    run_id: str,
    load: Callable[[], Model],
    ctx: ModelContext,
    plans: list[StudyPlan],
    say: Progress,
) -> None:
    """Measure (or resume measuring) the damage of every steered condition of `plans` into the store."""
    if not spec.damage.enabled:
        return
    model_name = ctx.model_name
    wanted: dict[str, Condition] = {}
    generated = store.generated_conditions(run_id, model_name)
    for plan in plans:
        for _tags, cond in plan.conditions:
            if not cond.is_baseline and (cond.key in generated or harmless_twin(cond).key in generated):
                wanted.setdefault(harmless_twin(cond).key, harmless_twin(cond))
    kinds = store.artifact_kinds(run_id, model_name)
    have = {k.removeprefix(DAMAGE_PREFIX) for k in kinds if k.startswith(DAMAGE_PREFIX)}
    todo = [c for k, c in wanted.items() if k not in have]
    if not todo:
        return
    rows = store.generations(run_id, model_name, baseline(HARMLESS).key, HARMLESS)
    rows = sorted(rows, key=lambda r: r["prompt_index"])[: spec.damage.prompts]
    if not rows:
        return  # no unsteered harmless answers (nothing was generated): nothing to measure against
    model = load()
    meter = DivergenceMeter(
        model, [r["prompt"] for r in rows], [json.loads(r["token_ids"]) for r in rows], system=ctx.system
    )
    bank, transfer = ctx.bank(), ctx.transfer()
    done = len(wanted) - len(todo)
    for i in range(0, len(todo), GROUP):
        group = todo[i : i + GROUP]
        found = meter.measure([build_intervention(c, bank, transfer, ctx.seed) for c in group])
        for cond, d in zip(group, found):
            store.put_artifact(run_id, model_name, DAMAGE_PREFIX + cond.key, d.to_dict())
        done += len(group)
        say(f"{model_name}: KL damage on harmless prompts", done, len(wanted), group[-1].describe())
