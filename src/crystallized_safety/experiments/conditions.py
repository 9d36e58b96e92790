"""Studies expand into conditions (one intervention on one prompt set); conditions split into chunks.

A condition's key depends only on what is generated (prompt set, layers, alpha, unit, mode, direction,
weights), not on which study asked for it, so two studies that need the same generations share them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from ..core import modes
from ..core.directions import DirectionBank
from ..core.steering import Intervention
from ..errors import LayerError
from .direction_ref import DirectionRef
from .spec import (
    Ablation,
    Angular,
    Controls,
    DirectionSelection,
    ExperimentSpec,
    Frontier,
    Induction,
    LayerSweep,
    MinLayers,
    Multilayer,
    Readability,
    Sign,
    Subspace,
    Threshold,
    Transfer,
)

HARMFUL, HARMLESS = "harmful", "harmless"


@dataclass(frozen=True)
class Condition:
    prompt_set: str
    layers: tuple[int, ...] = ()
    alpha: float = 0.0
    alpha_unit: str = "relative"
    mode: str = "add"  # a registered mode's name (core/modes.py): add, ablate, ablate_add, affine, rotate
    direction: str = "extracted"  # extracted | inverted | orthogonal:S | random:S | shared:L | transfer:MODEL
    weights: tuple[float, ...] = ()  # per-layer multipliers (total alpha split); empty = all 1
    source_layers: tuple[int, ...] = ()  # transfer only: source-model layer per target layer
    max_new_tokens: int = 0  # 0: the spec's; else a confirmation at that length (`confirmed`)

    @property
    def is_baseline(self) -> bool:
        return not self.layers

    def _fields(self) -> dict:
        out = asdict(self)
        if not self.max_new_tokens:  # added later: left out at its default, so older keys stay what they were
            del out["max_new_tokens"]
        return out

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self._fields(), sort_keys=True).encode()).hexdigest()[:16]

    def confirmed(self, tokens: int) -> Condition:
        """The same intervention generated to `tokens` new tokens: the confirmation of this cell's flips."""
        return replace(self, max_new_tokens=tokens)

    def describe(self) -> str:
        if self.is_baseline:
            return f"baseline ({self.prompt_set})"
        contiguous = len(self.layers) >= 8 and self.layers == tuple(range(self.layers[0], self.layers[-1] + 1))
        layers = f"{self.layers[0]}-{self.layers[-1]}" if contiguous else ",".join(map(str, self.layers))
        unit = " rel" if self.alpha_unit == "relative" else ""
        size = f"θ={self.alpha:g}°" if modes.mode(self.mode).angle else f"a={self.alpha:g}{unit}"
        length = f" @{self.max_new_tokens} tokens" if self.max_new_tokens else ""
        return f"L{layers} {size} {self.mode} {self.direction}{length} ({self.prompt_set})"

    def to_json(self) -> str:
        return json.dumps(self._fields(), sort_keys=True)

    @property
    def ref(self) -> DirectionRef:
        return DirectionRef.parse(self.direction)


def baseline(prompt_set: str) -> Condition:
    return Condition(prompt_set=prompt_set, alpha_unit="absolute", direction="none")


@dataclass
class StudyPlan:
    """The conditions one study needs, tagged with what the study's analysis will call them."""

    label: str
    kind: str
    conditions: list[tuple[dict, Condition]] = field(default_factory=list)  # (tags, condition)

    def add(self, cond: Condition, **tags) -> None:
        self.conditions.append((tags, cond))


def _windows(study: Multilayer) -> list[list[int]]:
    sets = [list(s) for s in study.layer_sets]
    if study.windows:
        lo, hi = study.window_range  # type: ignore[misc]
        for k in study.windows:
            for start in range(lo, hi - k + 2, study.window_stride):
                sets.append(list(range(start, start + k)))
    return sets


def _sweep(study: LayerSweep | Induction, plan: StudyPlan, common: dict) -> None:
    prompt_set = HARMLESS if isinstance(study, Induction) else HARMFUL
    for layer in study.layers:
        for alpha in study.alphas:
            plan.add(Condition(prompt_set, (layer,), alpha, **common), layer=layer, alpha=alpha)
            if isinstance(study, Induction) or study.controls:
                plan.add(
                    Condition(prompt_set, (layer,), alpha, direction="random:0", **common),
                    layer=layer,
                    alpha=alpha,
                    control="random",
                )


def _threshold(study: Threshold, plan: StudyPlan, common: dict) -> None:
    for alpha in study.alphas:
        plan.add(Condition(HARMFUL, (study.layer,), alpha, **common), alpha=alpha)


def _controls(study: Controls, plan: StudyPlan, common: dict) -> None:
    plan.add(Condition(HARMFUL, (study.layer,), study.alpha, **common), control="extracted", seed=None)
    for control in study.controls:
        for seed in range(study.seeds):
            plan.add(
                Condition(HARMFUL, (study.layer,), study.alpha, direction=f"{control}:{seed}", **common),
                control=control,
                seed=seed,
            )


def _sign(study: Sign, plan: StudyPlan, common: dict) -> None:
    a = abs(study.alpha)
    for prompt_set in (HARMFUL, HARMLESS):
        plan.add(Condition(prompt_set, (study.layer,), +a, **common), variant="+alpha", prompt_set=prompt_set)
        plan.add(Condition(prompt_set, (study.layer,), -a, **common), variant="-alpha", prompt_set=prompt_set)
        plan.add(
            Condition(prompt_set, (study.layer,), +a, direction="inverted", **common),
            variant="inverted +alpha",
            prompt_set=prompt_set,
        )


def _multilayer(study: Multilayer, plan: StudyPlan, common: dict) -> None:
    for layers in _windows(study):
        k = len(layers)
        weights = tuple([1.0 / k] * k) if study.alpha_split == "total" else ()
        direction = f"shared:{study.shared_layer}" if study.directions == "shared" else "extracted"
        for alpha in study.alphas:
            cond = Condition(HARMFUL, tuple(layers), alpha, direction=direction, weights=weights, **common)
            plan.add(cond, layers=layers, alpha=alpha)
            if study.controls:
                ctrl = Condition(HARMFUL, tuple(layers), alpha, direction="random:0", weights=weights, **common)
                plan.add(ctrl, layers=layers, alpha=alpha, control="random")


def min_layer_sets(study: MinLayers) -> list[tuple[int, list[int], bool]]:
    """(K, layers, is_control_window) for every window the study runs; the control window of each K is the
    middle contiguous one."""
    lo, hi = study.window_range
    out = []
    for k in study.ks:
        starts = list(range(lo, hi - k + 2, study.stride or k))
        windows = [list(range(s, s + k)) for s in starts]
        if study.spread and k > 1:
            spread = sorted({round(lo + i * (hi - lo) / (k - 1)) for i in range(k)})
            if len(spread) == k and spread not in windows:
                windows.append(spread)
        middle = windows[len(starts) // 2]
        out += [(k, w, w == middle) for w in windows]
    return out


def _min_layers(study: MinLayers, plan: StudyPlan, common: dict) -> None:
    for k, layers, control_here in min_layer_sets(study):
        for alpha in study.alphas:
            plan.add(Condition(HARMFUL, tuple(layers), alpha, **common), k=k, layers=layers, alpha=alpha)
            if study.controls and control_here:
                ctrl = Condition(HARMFUL, tuple(layers), alpha, direction="random:0", **common)
                plan.add(ctrl, k=k, layers=layers, alpha=alpha, control="random")


def _transfer(study: Transfer, plan: StudyPlan, common: dict) -> None:
    for i, layer in enumerate(study.layers):
        src = (study.source_layers[i],) if study.source_layers else ()
        direction = f"transfer:{study.source_model}"
        for alpha in study.alphas:
            cond = Condition(HARMFUL, (layer,), alpha, direction=direction, source_layers=src, **common)
            plan.add(cond, layer=layer, alpha=alpha, source="transfer")
            plan.add(Condition(HARMFUL, (layer,), alpha, **common), layer=layer, alpha=alpha, source="own")


def _ablation(study: Ablation, plan: StudyPlan, common: dict, n_layers: int) -> None:
    at = tuple(range(n_layers)) if study.at == "all" else tuple(study.at)
    for source in study.source_layers:
        for mode in study.modes:
            for prompt_set in (HARMFUL, HARMLESS):
                tags = {"source_layer": source, "mode": mode, "prompt_set": prompt_set, "layers": list(at)}
                plan.add(Condition(prompt_set, at, 0.0, "absolute", mode, f"shared:{source}"), **tags)
                if study.controls:
                    ctrl = Condition(prompt_set, at, 0.0, "absolute", mode, "random:0")
                    plan.add(ctrl, **tags, control="random")


def _subspace(study: Subspace, plan: StudyPlan, common: dict, n_layers: int) -> None:
    at = tuple(range(n_layers)) if study.at == "all" else tuple(study.at)
    for source in study.source_layers:
        for k in study.ks:
            for mode in study.modes:
                for prompt_set in (HARMFUL, HARMLESS):
                    cond = Condition(prompt_set, at, 0.0, "absolute", mode, f"subspace:{k}@{source}")
                    plan.add(cond, source_layer=source, k=k, mode=mode, prompt_set=prompt_set, layers=list(at))


def _angular(study: Angular, plan: StudyPlan, common: dict, n_layers: int) -> None:
    groups = [tuple(study.layers)] if study.together else [(layer,) for layer in study.layers]
    for layers in groups:
        for angle in study.angles:
            for prompt_set in (HARMFUL, HARMLESS):
                cond = Condition(prompt_set, layers, angle, "absolute", "rotate")
                plan.add(cond, layers=list(layers), alpha=angle, angle=angle, prompt_set=prompt_set)


def frontier_layers(spec: ExperimentSpec, study: Frontier, n_layers: int) -> list[int]:
    return spec.verdict.band_layers(n_layers) if study.layers == "band" else list(study.layers)


def _frontier(study: Frontier, plan: StudyPlan, layers: list[int]) -> None:
    """Per layer and rung, the walk's cells weakest first (tag `step`), each with its random control (generated
    only when the cell reaches the threshold, see `run.frontier`)."""
    for layer in layers:
        walks: dict[str, list[Condition]] = {}
        if "add" in study.rungs:
            walks["add"] = [Condition(HARMFUL, (layer,), a, study.alpha_unit, "add") for a in study.alphas]
        if "affine" in study.rungs:
            walks["affine"] = [Condition(HARMFUL, (layer,), 0.0, "absolute", "affine")]
        if "subspace" in study.rungs:
            sub = f"subspace:{study.subspace_k}@{layer}"
            walks["subspace"] = [Condition(HARMFUL, (layer,), 0.0, "absolute", "affine", sub)]
        if "rotate" in study.rungs:
            walks["rotate"] = [Condition(HARMFUL, (layer,), a, "absolute", "rotate") for a in study.angles]
        for rung, walk in walks.items():
            for step, cond in enumerate(walk):
                tags = {"layer": layer, "rung": rung, "step": step, "alpha": cond.alpha}
                plan.add(cond, **tags)
                if study.controls:
                    plan.add(replace(cond, direction="random:0"), **tags, control="random")


PLANNERS: dict[type, Callable[..., None]] = {
    LayerSweep: _sweep,
    Induction: _sweep,
    Threshold: _threshold,
    Controls: _controls,
    Sign: _sign,
    Multilayer: _multilayer,
    MinLayers: _min_layers,
    Transfer: _transfer,
    Readability: lambda study, plan, common: None,  # no generations: it reads activations
    DirectionSelection: lambda study, plan, common: None,  # no generations: forward passes, in the runner
}
LAYERED_PLANNERS: dict[type, Callable[..., None]] = {
    Ablation: _ablation,
    Angular: _angular,
    Subspace: _subspace,
}  # need the depth


def plan_studies(spec: ExperimentSpec, n_layers: int, model: str) -> list[StudyPlan]:
    """Expand every study of the spec for one model (layers checked against its depth)."""
    plans: list[StudyPlan] = []
    for study in spec.studies:
        plan = StudyPlan(study.label, study.kind)
        common = {"alpha_unit": study.alpha_unit, "mode": study.mode}
        if isinstance(study, Frontier):
            _frontier(study, plan, frontier_layers(spec, study, n_layers))
        elif type(study) in LAYERED_PLANNERS:
            LAYERED_PLANNERS[type(study)](study, plan, common, n_layers)
        else:
            PLANNERS[type(study)](study, plan, common)
        layers = [layer for _tags, cond in plan.conditions for layer in cond.layers]
        if isinstance(study, (Readability, DirectionSelection)) and study.layers != "all":
            layers = list(study.layers)
        for layer in layers:
            if not 0 <= layer < n_layers:
                raise LayerError(
                    f"studies.{study.label}: layer {layer} is out of range for {model} (0..{n_layers - 1})"
                )
        plans.append(plan)
    return plans


def build_intervention(
    cond: Condition, bank: DirectionBank, transfer: dict[str, DirectionBank] | None = None, seed: int = 0
) -> Intervention | None:
    """The Intervention a condition stands for; relative alphas scale by the layer's mean residual norm;
    `seed` is the spec's seed (control directions)."""
    if cond.is_baseline:
        return None
    ref = cond.ref
    directions = {layer: ref.vector(bank, layer, transfer, seed) for layer in cond.layers}
    norms = {layer: bank.resid_norm(layer) for layer in cond.layers} if cond.alpha_unit == "relative" else None
    weights = dict(zip(cond.layers, cond.weights)) if cond.weights else {}
    basis = None
    if ref.kind == "subspace":  # a k-dimensional subspace of the source layer, ablated at every layer
        dims, source = ref.subspace
        basis = dict.fromkeys(cond.layers, bank.basis(source, dims))
    mode = modes.mode(cond.mode)
    return Intervention(
        directions=directions,
        alpha=cond.alpha,
        mode=mode,
        alpha_unit=cond.alpha_unit,
        layer_norms=norms,
        layer_weights=weights,
        params=mode.bind(bank, directions, basis),
    )
