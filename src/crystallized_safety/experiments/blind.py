"""Blind re-analysis: the verdicts re-derived from a copy of the store in which every model carries a shuffled
anonymous name and no real name survives (`blind_store`: spec text, artifact metadata and kinds, conditions,
every cell and byte of the file, checked), so the analysis cannot know which model was trained how.

It is a re-derivation, not a re-read: the stored responses are re-judged (`rejudge`: the substring judge
always; the coherence gate when `load` is given, since it needs the unsteered model, which the analysis
opens only by its anonymous name), then the analyses, verdict and K* are recomputed by `analyse_model`. The
first-token `score` cannot be recomputed from text and is kept; each result's `rejudged` entry lists what
was re-derived, what was kept and why, and how many labels changed. Transfer studies are left out (their
conditions name the source model; the verdict does not read them): their rows and artifacts are deleted from
the copy.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from ..blind_store import BlindPlan, blind_copy
from ..core.model import Model
from ..judges.substring import SubstringJudge
from ..registry import registry
from ..store import Store
from . import reading
from .analysis import analyse_model
from .conditions import plan_studies
from .rejudge import ModelLoader, rejudge
from .results import DAMAGE_PREFIX, harmless_twin
from .spec import ExperimentSpec, Transfer, parse_spec
from .verdict import confirm_tokens


def blind_verdicts(
    store: Store,
    run_id: str,
    spec: ExperimentSpec,
    workdir: Path,
    seed: int = 0,
    load: Callable[[str], Model] | None = None,
) -> dict[str, dict]:
    """{real model: verdict re-derived under an anonymous name, with its `rejudged` report}. `load` opens a
    model by its real name (e.g. `registry.load_model`); the analysis only gets it wrapped behind the
    anonymous names. The blind copy stays at `workdir/blind-<seed>.sqlite`."""
    models = list(spec.models)
    shuffled = models[:]
    random.Random(seed).shuffle(shuffled)
    names = {real: f"model-{chr(ord('a') + i)}" for i, real in enumerate(shuffled)}
    blind = blind_spec(spec, names)
    copy = blind_copy(store, run_id, workdir / f"blind-{seed}.sqlite", blind_plan(store, run_id, spec, names, blind))
    real_of = {anon: real for real, anon in names.items()}
    anonymous = None if load is None else anonymised(load, real_of)
    try:
        return {real: reanalyse(blind, copy, run_id, names[real], anonymous) for real in models}
    finally:
        copy.close()


def anonymised(load: Callable[[str], Model], real_of: dict[str, str]) -> ModelLoader:
    """A loader taking anonymous names: the real name stays in this closure."""
    return lambda anon: load(real_of[anon])


REFERENCE_ALIAS = "model-reference"  # an anonymous name like the tested models' (model-a, model-b, ...)


def blind_spec(spec: ExperimentSpec, names: dict[str, str]) -> ExperimentSpec:
    """The spec with anonymous models, without transfer studies, and the reference model (whose answers the store
    holds) under a neutral name: it may be one of the models under test."""
    data = spec.model_dump(mode="json")
    data["models"] = [names[m] for m in spec.models]
    if spec.verdict.reference is not None:
        data["verdict"]["reference"] = names.get(spec.verdict.reference, REFERENCE_ALIAS)
    data["studies"] = [s.model_dump(mode="json") for s in spec.studies if not isinstance(s, Transfer)]
    return parse_spec(data, "blind spec")


def blind_plan(
    store: Store, run_id: str, spec: ExperimentSpec, names: dict[str, str], blind: ExperimentSpec
) -> BlindPlan:
    """What the copy leaves out: the transfer conditions (their generations, chunks and damage) and the
    transfer maps; and the source models' anonymous labels."""
    sources = [s.source_model for s in spec.studies if isinstance(s, Transfer) and s.source_model not in names]
    drop_conditions: set[str] = set()
    drop_kinds: set[tuple[str, str]] = set()
    for real in spec.models:
        kinds = store.artifact_kinds(run_id, real)
        drop_kinds |= {(real, k) for k in kinds if k.startswith("transfer:")}
        for plan in plan_studies(spec, stored_layers(store, run_id, real), real):
            for _tags, cond in plan.conditions:
                if cond.direction.startswith("transfer:"):
                    drop_conditions.add(cond.key)
                    drop_kinds.add((real, DAMAGE_PREFIX + harmless_twin(cond).key))
    ref = spec.verdict.reference
    reference = {ref: REFERENCE_ALIAS} if ref is not None and ref not in names else {}
    return BlindPlan(
        models=names,
        sources={src: f"source-{chr(ord('a') + i)}" for i, src in enumerate(dict.fromkeys(sources))} | reference,
        spec_yaml=blind.to_yaml(),
        aliases={name: registry_names(name) for name in [*names, *sources, *reference]},
        drop_conditions=frozenset(drop_conditions),
        drop_kinds=frozenset(drop_kinds),
    )


def registry_names(name: str) -> list[str]:
    """What a registry alias resolves to (hub id, packages, GGUF file); nothing for other names."""
    entry = registry().get(name)
    return [] if entry is None else entry.names()


def stored_layers(store: Store, run_id: str, model: str) -> int:
    """The model's depth, from its stored directions (0 when none were stored)."""
    art = store.get_artifact(run_id, model, "directions")
    return int((art[0] if art else {}).get("n_layers", 0))


def reanalyse(spec: ExperimentSpec, copy: Store, run_id: str, model: str, load: ModelLoader | None) -> dict:
    """Re-judge the stored responses of one (anonymous) model, then recompute its analyses and verdict."""
    coherence = copy.get_artifact(run_id, model, "coherence") if spec.coherence.enabled else None
    tokens = confirm_tokens(spec)
    at_length = copy.get_artifact(run_id, model, f"coherence@{tokens}") if coherence and tokens else None
    report = rejudge(
        copy,
        run_id,
        model,
        system=spec.generation.system,
        thresholds=coherence[0] if coherence else None,
        load=load,
        thresholds_at_length=at_length[0] if at_length else None,
    )
    rejudge_reference(copy, run_id, model)
    plans = plan_studies(spec, stored_layers(copy, run_id, model), model)
    return {**analyse_model(spec, copy, run_id, model, plans), "rejudged": report.to_dict()}


def rejudge_reference(copy: Store, run_id: str, model: str) -> int:
    """The reference model's stored answers re-judged from their text (at length by the substring judge reading
    delayed refusals, the short answer by the plain one), as the steered ones are; their gate readings stand.
    Returns how many labels changed."""
    found = copy.get_artifact(run_id, model, reading.REFERENCE)
    data = (found[0] or {}) if found is not None else {}
    rows = data.get("rows", [])
    at_length = [r for r in rows if "refusal" in r]  # each target holds its "response" and its "refusal"
    short = [r["short"] for r in rows if "short" in r]
    changed = 0
    for targets, delayed in ((at_length, True), (short, False)):
        texts = [t["response"] for t in targets]
        for target, v in zip(targets, SubstringJudge(delayed=delayed).judge(texts, texts)):  # prompt-independent
            refusal = None if v.refusal is None else int(v.refusal)
            changed += refusal != target["refusal"]
            target["refusal"] = refusal
    if changed:
        copy.put_artifact(run_id, model, reading.REFERENCE, data)
    return changed
