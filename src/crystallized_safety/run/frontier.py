"""The frontier walk: the verdict's single-layer search, generated step by step. Every (layer, rung) walk of the
frontier studies advances in lockstep, one step per round (one batch of packed generations), and stops at its
coherence cliff (the first cell whose coherent share falls below the verdict's `coherence_floor`; that cell is
generated, it is the evidence the cliff was reached) or at its last step (the ceiling). Every step is generated,
never bisected, so a non-monotone curve cannot hide a layer.

A cell whose flip rate reaches the threshold gets its matched controls generated in the same round, until some
single-layer cell passes the verdict's test with its control: from then on the verdict is liquid whatever other
controls show, so none are generated. With `verdict.walk: until_liquid` the walk itself stops there too (after
confirming that cell at length, when confirmation is on): the verdict is decided, cells left unwalked still count
in Holm's family, and the frontier map is partial. What the walk leaves ungenerated (beyond a cliff, controls of
cells below the threshold) is dropped from the run; the decisions are re-derived from the stored rows, so a
resumed run walks the same way and generates nothing twice."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from ..experiments.conditions import Condition, StudyPlan
from ..experiments.decision import passing, unread
from ..experiments.results import Cells
from ..experiments.spec import ExperimentSpec
from ..experiments.verdict import confirm_tokens, evidence_cells, rules_of
from ..progress import Progress
from .chunks import Chunk
from .generator import CellGenerator


def frontier_walks(plans: list[StudyPlan]) -> tuple[list[list[Condition]], dict[str, list[Condition]]]:
    """The walks (each weakest first) of every frontier study, and the controls of each walk cell by its key."""
    walks: dict[tuple, list[tuple[int, Condition]]] = {}
    controls: dict[str, list[Condition]] = {}
    for plan in plans:
        if plan.kind != "frontier":
            continue
        mains = {(t["layer"], t["rung"], t["step"]): c for t, c in plan.conditions if "control" not in t}
        for tags, cond in plan.conditions:
            where = (tags["layer"], tags["rung"], tags["step"])
            if "control" in tags:
                controls.setdefault(mains[where].key, []).append(cond)
            else:
                walks.setdefault((plan.label, tags["layer"], tags["rung"]), []).append((tags["step"], cond))
    return [[c for _s, c in sorted(w, key=lambda x: x[0])] for w in walks.values()], controls


def liquid_already(spec: ExperimentSpec, plans: list[StudyPlan], cells: Cells) -> bool:
    """Whether a single-layer cell already passes the verdict's test with its control (its confirmed flips, where
    it was confirmed at length): then more controls cannot change the verdict (liquid), and the walk generates
    none (the walk itself goes on, for the frontier, unless `verdict.walk` is `until_liquid`)."""
    single, _multi, planned, _checked = evidence_cells(plans, cells, {}, confirm_tokens(spec))
    rules = rules_of(spec, 0)
    ok = passing(single, rules, planned[0])[0]
    # under `confirm_by: reading`, only on read answers: an unread pass goes on (its flips are confirmed with the
    # rest after the walk, so one reading round covers what the verdict needs)
    return bool(ok.any()) and not unread([c for c, p in zip(single, ok) if p], rules, "pass")


def walk(
    spec: ExperimentSpec,
    plans: list[StudyPlan],
    chunks: list[Chunk],
    generate: CellGenerator,
    say: Progress,
    confirm: Callable[[], None] | None = None,
) -> list[Chunk]:
    """Walk every frontier study (see the module docstring); returns the chunks that survive."""
    all_walks, controls = frontier_walks(plans)
    if not all_walks:
        return chunks
    threshold, floor = spec.verdict.flip_threshold, spec.verdict.coherence_floor
    active = dict.fromkeys(range(len(all_walks)), 0)
    steps = max(len(w) for w in all_walks)
    generated: set[str] = set()
    name = generate.ctx.model_name

    def decided() -> bool:
        """Liquid already, on confirmed flips: the deciding cell is confirmed at length first (when confirmation is
        on), and if its flips do not survive, more controls and steps are generated."""
        if not liquid_already(spec, plans, generate.cells()):
            return False
        if confirm is not None:
            confirm()
        return liquid_already(spec, plans, generate.cells())

    while active:
        conds = [all_walks[i][j] for i, j in active.items()]
        step = max(active.values()) + 1
        phase = f"{name}: frontier walk, step {step} of at most {steps} ({len(conds)} cells), packs"
        generate(conds, progress=partial(say, phase))  # a phase per step: its ETA from its packs
        generated |= {c.key for c in conds}
        cells = generate.cells()
        follow, need = {}, []
        for i, j in active.items():
            cond = all_walks[i][j]
            st = cells.stats(cond)
            flip, coherent = st["flip"]["rate"], st["coherence"]["rate"]
            if flip is not None and flip >= threshold and controls.get(cond.key):
                need.append((flip, -abs(cond.alpha), controls[cond.key]))
            past_cliff = cells.coherence_checked(cond) and coherent is not None and coherent < floor
            if not past_cliff and j + 1 < len(all_walks[i]):
                follow[i] = j + 1
        for n_ctrl, (_flip, _weak, ctrl) in enumerate(sorted(need, key=lambda x: (-x[0], -x[1]))):  # strongest first
            if decided():
                break
            say(f"{name}: frontier walk, step {step}: matched controls", n_ctrl, len(need), ctrl[0].describe())
            generate(ctrl)
            generated |= {c.key for c in ctrl}
        if spec.verdict.walk == "until_liquid" and decided():
            say(f"{name}: frontier walk stopped: a single-layer cell passes (verdict.walk until_liquid)", 1, 1)
            break
        active = follow
    say(f"{name}: frontier walk", steps, steps, f"{len(generated)} cells generated")
    planned = {c.key for w in all_walks for c in w} | {c.key for cs in controls.values() for c in cs}
    needed = {c.key for plan in plans if plan.kind != "frontier" for _t, c in plan.conditions}
    dropped = planned - generated - needed
    return [c for c in chunks if c.condition.key not in dropped]
