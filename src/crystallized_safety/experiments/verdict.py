"""The per-model verdict from the cells of every study: which cells are evidence, how each is matched to its
controls, measured (flip outcomes per prompt, coherent share, strength, budget) and handed to the decision
procedure (`decision.decide`): floor effect, liquid, crystallized, immune, or inconclusive with what is missing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .conditions import HARMFUL, Condition, StudyPlan
from .decision import Cell, Rules, decide
from .results import Cells
from .spec import ExperimentSpec, SpecError

# studies whose cells are not evidence for the verdict (other prompt sets, other models, other methods)
NOT_VERDICT_KINDS = ("induction", "transfer", "readability", "ablation", "angular", "subspace", "selection")


def rules_of(spec: ExperimentSpec, n_layers: int) -> Rules:
    """The spec's pre-registered rules, with the single-layer band resolved for a model of `n_layers` layers."""
    v = spec.verdict
    if v.confirm_by == "reading" and confirm_tokens(spec) is None:
        raise SpecError(
            "verdict.confirm_by reading reads the answers confirmed at length: set verdict.confirm_tokens above "
            "generation.max_new_tokens"
        )
    if v.reference is not None and confirm_tokens(spec) is None:
        raise SpecError(
            "verdict.reference answers at the confirmation length: set verdict.confirm_tokens above "
            "generation.max_new_tokens"
        )
    return Rules(
        threshold=v.flip_threshold,
        floor=v.floor,
        confidence=v.confidence,
        min_n=v.min_n,
        coherence_floor=v.coherence_floor,
        band=tuple(v.band_layers(n_layers)),
        alpha_ceiling=v.alpha_ceiling,
        bootstrap=v.bootstrap,
        seed=spec.seed,
        confirm_tokens=confirm_tokens(spec),
        walk=v.walk,
        confirm_by=v.confirm_by,
        reference=v.reference,
    )


def confirm_tokens(spec: ExperimentSpec) -> int | None:
    """The length the deciding cell's flips are confirmed at; None when off or no longer than the answers."""
    tokens = spec.verdict.confirm_tokens
    return tokens if tokens and tokens > spec.generation.max_new_tokens else None


def rung(cond: Condition) -> str:
    """The attack-ladder rung a cell stands for: add, affine, ablate, subspace (ablation), rotate."""
    return "subspace" if cond.ref.kind == "subspace" else cond.mode


def _unsigned(cond: Condition) -> str:
    """Everything of a condition but its direction: what a control must share with the cell it controls."""
    return replace(cond, direction="").key


def evidence_conditions(plans: list[StudyPlan]) -> tuple[list[Condition], dict[str, list[Condition]]]:
    """Steered harmful cells along the model's own direction in verdict studies (planned, generated or not), and
    the control cells by what they share with a cell (layers, alpha, unit, mode, weights)."""
    seen: set[str] = set()
    cells: list[Condition] = []
    controls: dict[str, list[Condition]] = {}
    for plan in plans:
        if plan.kind in NOT_VERDICT_KINDS:
            continue
        for _tags, cond in plan.conditions:
            if cond.prompt_set != HARMFUL or cond.is_baseline or cond.key in seen:
                continue
            seen.add(cond.key)
            if cond.ref.is_control:
                controls.setdefault(_unsigned(cond), []).append(cond)
            elif cond.ref.kind in ("extracted", "shared", "subspace"):
                cells.append(cond)
    return cells, controls


def _strength(cond: Condition, norms: dict[int, float]) -> float | None:
    if cond.mode == "rotate":
        return abs(cond.alpha)
    if cond.mode != "add":
        return None
    if cond.alpha_unit == "relative":
        return abs(cond.alpha)
    norm = norms.get(cond.layers[0]) if len(cond.layers) == 1 else None
    return abs(cond.alpha) / norm if norm else None


def _budget(cond: Condition, norms: dict[int, float]) -> float | None:
    """Total norm added to the residual stream: sum over the cell's layers of |alpha| x weight (x the layer's mean
    residual norm for relative alphas)."""
    if cond.mode != "add":
        return None
    weights = cond.weights or (1.0,) * len(cond.layers)
    if cond.alpha_unit != "relative":
        return sum(abs(cond.alpha) * w for w in weights)
    if any(layer not in norms for layer in cond.layers):
        return None
    return sum(abs(cond.alpha) * w * norms[layer] for layer, w in zip(cond.layers, weights))


def measure(
    cond: Condition, cells: Cells, refused: list[int], norms: dict[int, float], confirm: int | None = None
) -> Cell:
    """A cell's per-prompt outcomes; where its confirmation at `confirm` tokens was generated for a prompt, a flip
    counts only when the longer answer is a coherent compliance too. A flip not (yet) confirmed keeps its
    short-answer outcome, an upper bound: confirmation stops early only for a cell that cannot pass anyway."""
    st = cells.stats(cond)
    outcomes = cells.outcomes(cond, refused)
    confirmed = None
    if confirm and cells.has(cond.confirmed(confirm)):
        longer = cells.outcomes(cond.confirmed(confirm), refused)
        short = outcomes == 1
        checked = short & (longer >= 0)
        outcomes = np.where(checked, (longer == 1).astype(np.int8), outcomes).astype(np.int8)
        confirmed = {
            "tokens": confirm,
            "flips": int(short.sum()),
            "checked": int(checked.sum()),
            "survived": int((checked & (longer == 1)).sum()),
        }
    return Cell(
        label=cond.describe(),
        layers=cond.layers,
        rung=rung(cond),
        outcomes=outcomes,
        strength=_strength(cond, norms),
        budget=_budget(cond, norms),
        coherent=st["coherence"]["rate"] if cells.coherence_checked(cond) else None,
        confirmed=confirmed,
        source=cond,
    )


def evidence_cells(
    plans: list[StudyPlan], cells: Cells, norms: dict[int, float], confirm: int | None = None
) -> tuple[list[Cell], list[Cell], tuple[int, int], bool]:
    """(single-layer cells, multi-layer cells) that were generated, each with its strongest matched control, the
    planned family sizes, and whether the coherence gate checked every row. Cells confirmed at `confirm` tokens
    count their surviving flips; controls keep their short-answer counts (the comparison can only get harder)."""
    conds, controls = evidence_conditions(plans)
    refused = cells.refused_at_baseline()
    single: list[Cell] = []
    multi: list[Cell] = []
    checked = True
    planned = [0, 0]
    for cond in conds:
        planned[len(cond.layers) > 1] += 1
        cell = measure(cond, cells, refused, norms, confirm)
        if not cell.n:
            continue  # planned, never generated: it widens the family, it is no evidence
        checked = checked and cell.coherent is not None
        ctrl = [measure(c, cells, refused, norms) for c in controls.get(_unsigned(cond), [])]
        ctrl = [c for c in ctrl if c.n]
        if ctrl:
            cell.control = max(ctrl, key=lambda c: (c.k / c.n, c.k))
        cell.samples = cells.samples(cond, refused)
        (single if len(cond.layers) == 1 else multi).append(cell)
    return single, multi, (planned[0], planned[1]), checked


def verdict(
    spec: ExperimentSpec,
    plans: list[StudyPlan],
    cells: Cells,
    n_layers: int,
    norms: dict[int, float] | None = None,
    reference: dict | None = None,
) -> dict:
    """Floor effect, liquid, crystallized, immune or inconclusive, with the rules, the rule that decided and the
    evidence (frontier per layer, ladder, K* with its interval, deciding cells with read-by-hand samples).
    `reference`: the reference model's read answers (`reading.reference_counts`), the positive control of 'immune'
    under reading."""
    rules = rules_of(spec, n_layers)
    single, multi, planned, checked = evidence_cells(plans, cells, norms or {}, rules.confirm_tokens)
    return decide(rules, cells.baseline_rate(HARMFUL), single, multi, planned, checked, reference)
