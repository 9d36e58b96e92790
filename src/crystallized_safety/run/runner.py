"""Runs an experiment spec into a store: prepares each model once (directions, coherence thresholds,
transfer maps, batch size, readability: each an artifact computed once through `Store.cached`), runs only the
packs the store lacks (through an executor), then analyses from the store."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..core.activations import Captured
from ..core.directions import DirectionBank, extract_directions
from ..core.generation.api import generate as generate_answers
from ..core.generation.fast import autotune_rows
from ..core.model import Model
from ..environment import environment
from ..errors import first_line
from ..evaluation import calibrated_gate
from ..experiments import reading
from ..experiments.analysis import analyse_model
from ..experiments.prompt_sets import PromptSets, load_prompt_sets
from ..experiments.readability import readability
from ..experiments.scoring_prompts import ScoringPrompts, check_scoring
from ..experiments.selection import no_choice_message, select_direction
from ..experiments.spec import (
    DirectionSelection,
    ExperimentSpec,
    Frontier,
    Readability,
    SpecError,
    Subspace,
    Transfer,
)
from ..experiments.transfer import transfer_bank
from ..experiments.verdict import confirm_tokens, rules_of
from ..progress import Progress, silent
from ..registry import check_model_name, load_model
from ..store import Store
from . import confirmation, frontier
from .chunks import Chunk, Pack, expand, make_packs
from .damage import measure_damage
from .executors.base import Executor
from .executors.local import LocalExecutor
from .generator import CellGenerator
from .screening import screen
from .worker import ChunkWorker, ModelContext, bank_from_bytes, bank_to_bytes


@dataclass
class RunResult:
    run_id: str
    resumed: bool
    chunks_run: int
    chunks_skipped: int
    seconds: float
    verdicts: list[dict]


class Loader:
    """Opens models by name once (or hands out ones the caller already loaded), with the spec's device/dtype."""

    def __init__(self, spec: ExperimentSpec, default: str, given: dict[str, Model] | None) -> None:
        self.spec, self.default, self.given = spec, default, given or {}
        self.cache: dict[str, Model] = {}

    def __call__(self, name: str | None = None) -> Model:
        name = name or self.default
        if name in self.given:
            return self.given[name]
        if name not in self.cache:
            spec = self.spec
            self.cache[name] = load_model(name, device=spec.device, dtype=spec.dtype, device_map=spec.device_map)
        return self.cache[name]


def run_experiment(
    spec: ExperimentSpec,
    store: Store,
    executor: Executor | None = None,
    progress: Progress | None = None,
    models: dict[str, Model] | None = None,
) -> RunResult:
    """Run (or resume) `spec` into `store`. `models` lets tests pass already-loaded models by name."""
    executor = executor or LocalExecutor()
    say = progress or silent
    t0 = time.perf_counter()
    run_id = spec.spec_hash()
    check_models(spec, models or {})
    rules_of(spec, 0)  # the verdict's rules hold together (e.g. reading needs confirmation at length) before any work
    sets = load_prompt_sets(spec)
    scoring = check_scoring(spec)  # a selection study's scoring prompts, out of sample, before any model loads
    with store.lock_run(run_id):  # a second process on the same run stops here instead of redoing the work
        resumed = store.open_run(run_id, spec.name, spec.to_yaml(), spec.spec_hash(), environment())
        ran = skipped = 0
        try:
            for model_name in spec.models:
                loader = Loader(spec, model_name, models)
                r, k = _run_model(spec, store, run_id, loader, executor, sets, scoring, say)
                ran, skipped = ran + r, skipped + k
        except KeyboardInterrupt:
            store.fail_run(run_id, "interrupted")
            raise
        except Exception as exc:
            store.fail_run(run_id, first_line(exc))
            raise
        store.finish_run(run_id)
    return RunResult(run_id, resumed, ran, skipped, time.perf_counter() - t0, store.verdicts(run_id))


def check_models(spec: ExperimentSpec, given: dict[str, Model]) -> None:
    """Every model and transfer source resolvable, before anything loads (an organism is not built here)."""
    names = list(spec.models) + [s.source_model for s in spec.studies if isinstance(s, Transfer)]
    names += [spec.verdict.reference] if spec.verdict.reference else []
    for name in dict.fromkeys(names):
        if name not in given:
            check_model_name(name)


def check_layers(spec: ExperimentSpec, model: Model) -> None:
    """Every layer a study steers or reads exists in `model`: checked right after it loads, before any
    extraction (a transfer's `source_layers` belong to the source model and are checked when it loads)."""
    for study in spec.studies:
        named = {
            "layers": getattr(study, "layers", None),
            "window_range": getattr(study, "window_range", None),
            "layer_sets": [x for group in getattr(study, "layer_sets", None) or [] for x in group],
        }
        for field_name, value in named.items():
            if not isinstance(value, (list, tuple)):
                continue
            bad = [layer for layer in value if not 0 <= layer < model.n_layers]
            if bad:
                raise SpecError(
                    f"study '{study.label}': {field_name} {bad} outside {model.model_id}'s layers "
                    f"0..{model.n_layers - 1}: fix the spec"
                )


def _run_model(
    spec: ExperimentSpec,
    store: Store,
    run_id: str,
    load: Loader,
    executor: Executor,
    sets: PromptSets,
    scoring: dict[str, ScoringPrompts],
    say: Progress,
) -> tuple[int, int]:
    model_name = load.default
    check_layers(spec, load())
    ctx, n_layers = _model_context(spec, store, run_id, load, sets, say)
    plans, chunks = expand(spec, model_name, n_layers, sets)
    # the pack size is fixed (and stored) before any generation, so a resumed run forms the same packs
    rows = _pack_rows(spec, store, run_id, load, chunks, say)
    if spec.screening.enabled:
        chunks = screen(spec, store, run_id, executor, load, ctx, plans, chunks, say, rows)
    generate = CellGenerator(store, run_id, executor, load, ctx, chunks, rows, read=reading.reads(spec))

    def confirm() -> None:
        confirmation.confirm(spec, plans, generate, sets, n_layers, say, round_rows=rows)

    if any(plan.kind == "frontier" for plan in plans):
        base = [c for c in chunks if c.condition.is_baseline]
        generate([c.condition for c in base], 0)  # the flip denominator comes first
        chunks = frontier.walk(spec, plans, chunks, generate, say, confirm)
    done = store.done_chunks(run_id)
    packs = make_packs(chunks, rows)
    todo = [p for p in packs if any(c.key not in done for c in p)]
    state = {"done": sum(c.key in done for c in chunks)}

    def sink(pack: Pack, rows, seconds: float, worker: str) -> None:
        entries = [(c.key, c.model, c.study, c.condition.key, r) for c, r in zip(pack, rows)]
        state["done"] += store.write_chunks(run_id, entries, seconds, worker)
        say(f"{model_name}: chunks", state["done"], len(chunks), f"{pack[0].study} {pack[0].condition.describe()}")

    todo_chunks = sum(len(p) for p in todo)
    say(f"{model_name}: chunks", state["done"], len(chunks), f"{todo_chunks} of {len(chunks)} to run")
    executor.run(load, ctx, todo, sink)
    measure_damage(spec, store, run_id, load, ctx, plans, say)
    confirm()  # the cell the verdict rests on, re-generated at length (verdict.confirm_tokens)
    _reference(spec, store, run_id, load, ctx, generate, sets, say)
    for plan in plans:
        study = next(s for s in spec.studies if s.label == plan.label)
        if plan.kind == "readability":

            def scores(study=study) -> tuple[dict, None]:
                return readability(spec, study, load(), sets), None

            store.cached(run_id, model_name, f"readability:{plan.label}", scores)
        elif plan.kind == "selection":

            def choose(study=study) -> tuple[dict, bytes | None]:
                say(f"{model_name}: direction selection ({study.label})", 0, 1)
                return selection_table(study, load(), sets, scoring[study.label])

            key = f"selection:{plan.label}"
            old = store.get_artifact(run_id, model_name, key)
            if old is not None and "scored_on" not in ((old[0] or {}).get("settings") or {}):
                store.put_artifact(run_id, model_name, key, *choose())  # a table scored in sample, before issue 22
            store.cached(run_id, model_name, key, choose)
    analyse_model(spec, store, run_id, model_name, plans)
    return todo_chunks, len(chunks) - todo_chunks


def _reference(
    spec: ExperimentSpec,
    store: Store,
    run_id: str,
    load: Loader,
    ctx: ModelContext,
    generate: CellGenerator,
    sets: PromptSets,
    say: Progress,
) -> None:
    """With `verdict.reference`: that model's own greedy answers at the confirmation length to the prompts the
    tested model refused at baseline, generated once and stored, then judged as a steered flip is: its answer at
    `generation.max_new_tokens` by the tested model's judges and gate, and its answer at length as confirmations
    are; under reading, read blind with the steered answers. The positive control of 'immune'."""
    name, tokens = spec.verdict.reference, confirm_tokens(spec)
    if name is None or tokens is None:
        return

    def reference_answers(prompts: list[str], max_new_tokens: int) -> list:
        g = spec.generation
        return generate_answers(
            load(name), prompts, max_new_tokens=max_new_tokens, batch_size=g.batch_size, system=g.system, seed=spec.seed
        )

    def answers() -> tuple[dict, None]:
        refused = generate.cells().refused_at_baseline()
        say(f"{load.default}: the reference model {name}'s answers at {tokens} tokens", 0, 1)
        prompts = [sets.eval_harmful[i] for i in refused]
        gens = reference_answers(prompts, tokens)
        rows = [{"index": i, "prompt": p, "response": g.response, "degenerate": g.degenerate is not None}
                for i, p, g in zip(refused, prompts, gens)]  # fmt: skip
        return {"tokens": tokens, "rows": rows}, None

    data = store.cached(run_id, load.default, reading.REFERENCE, answers)[0]
    rows = data["rows"]
    if all("refusal" in r and "short" in r for r in rows):
        return
    short = spec.generation.max_new_tokens
    say(f"{load.default}: judging the reference model {name}'s answers at {short} and {tokens} tokens", 0, 1)
    prompts = [r["prompt"] for r in rows]
    shorts = reference_answers(prompts, short)
    worker = ChunkWorker(load(), ctx)
    at_length = worker.judge_answers(prompts, [r["response"] for r in rows], at_length=True)
    first = worker.judge_answers(prompts, [g.response for g in shorts], at_length=False)
    for r, g, (refusal, coherent), (s_refusal, s_coherent) in zip(rows, shorts, at_length, first):
        r.setdefault("refusal", refusal)  # a degenerate output is never a flip
        r.setdefault("coherent", 0 if r.get("degenerate") else coherent)
        r.setdefault("short", {"response": g.response, "refusal": s_refusal,
                               "coherent": 0 if g.degenerate is not None else s_coherent})  # fmt: skip
    store.put_artifact(run_id, load.default, reading.REFERENCE, data)


def _pack_rows(
    spec: ExperimentSpec, store: Store, run_id: str, load: Loader, chunks: list[Chunk], say: Progress
) -> int:
    """The spec's pack_rows; for 'auto', measured once per (run, model) and kept in the store, so a resumed
    run re-forms the same packs."""
    if spec.generation.pack_rows != "auto":
        return spec.generation.pack_rows

    def compute() -> tuple[dict, None]:
        model = load()
        prompts = list(chunks[0].prompts) if chunks else ["Hello"]
        ids = model.tokenizer(model.format(prompts, system=spec.generation.system), add_special_tokens=False)
        groups: dict[tuple, int] = {}
        for c in chunks:
            groups[c.pack_group] = groups.get(c.pack_group, 0) + len(c.prompts)
        limit = max(groups.values(), default=len(prompts))
        say(f"{load.default}: tuning the batch size", 0, 1)
        rows, table = autotune_rows(
            model, ids["input_ids"], spec.generation.max_new_tokens, start=len(prompts), limit=limit
        )
        return {"rows": rows, "probes": table}, None

    found, _ = store.cached(run_id, load.default, "pack_rows", compute)
    return int(found["rows"])


def _model_context(
    spec: ExperimentSpec, store: Store, run_id: str, load: Loader, sets: PromptSets, say: Progress
) -> tuple[ModelContext, int]:
    """Directions, coherence thresholds and transfer maps, computed once per (run, model), kept in the store."""
    name = load.default

    def directions() -> tuple[dict, bytes]:
        say(f"{name}: extracting directions", 0, 1)
        probes = [s for s in spec.studies if isinstance(s, Readability)]
        probes = [s for s in probes if store.get_artifact(run_id, name, f"readability:{s.label}") is None]

        def read(harmful: Captured, harmless: Captured) -> None:  # the probes from the extraction's own pass
            for study in probes:
                table = readability(spec, study, load(), sets, train=(harmful, harmless))
                store.put_artifact(run_id, name, f"readability:{study.label}", table)

        bank = prepare_bank(spec, load(), sets, read if probes else None)
        return bank.metadata, bank_to_bytes(bank)

    _meta, bank_bytes = store.cached(run_id, name, "directions", directions)
    assert bank_bytes is not None
    n_layers = int(bank_from_bytes(bank_bytes).metadata.get("n_layers", 0)) or load().n_layers
    coherence = None
    if spec.coherence.enabled:

        def calibrate() -> tuple[dict, None]:
            say(f"{name}: calibrating the coherence gate", 0, 1)
            return calibrate_coherence(spec, load(), sets), None

        coherence = store.cached(run_id, name, "coherence", calibrate)[0]
    at_length = None
    tokens = confirm_tokens(spec)
    if coherence is not None and tokens is not None:
        short = coherence

        def calibrate_long() -> tuple[dict, None]:
            say(f"{name}: calibrating the coherence gate at {tokens} tokens", 0, 1)
            return calibrate_coherence(spec, load(), sets, tokens, short), None

        at_length = store.cached(run_id, name, f"coherence@{tokens}", calibrate_long)[0]
    transfer = {}
    transfers = [s for s in spec.studies if isinstance(s, Transfer)]
    for study in {s.source_model: s for s in transfers}.values():
        source = study.source_model

        def fit(study=study, source=source) -> tuple[dict, bytes]:
            say(f"{name}: fitting transfer from {source}", 0, 1)
            bank = transfer_bank(spec, study, load(), load(source), sets, bank_from_bytes(bank_bytes))
            return bank.metadata, bank_to_bytes(bank)

        blob = store.cached(run_id, name, f"transfer:{source}", fit)[1]
        assert blob is not None
        transfer[source] = blob
    ctx = ModelContext(
        name,
        bank_bytes,
        dict(sorted(transfer.items())),
        coherence,
        tuple(spec.judges),
        spec.generation.system,
        spec.device,
        spec.dtype,
        spec.seed,
        at_length,
    )
    return ctx, n_layers


def selection_table(study: DirectionSelection, model: Model, sets: PromptSets, scoring: ScoringPrompts):
    """A selection study's candidate table (JSON) and the chosen direction file (bytes; None if none passes):
    candidates extracted on the extraction sets, scored on `scoring` (never the eval prompts the verdict reads)."""
    sel = select_direction(
        model,
        (list(sets.extract_harmful), list(sets.extract_harmless)),
        (list(scoring.harmful), list(scoring.harmless)),
        positions=study.positions,
        layers=None if study.layers == "all" else study.layers,
        kl_max=study.kl_max,
        ablate_to=study.ablate_to,
        criterion=study.criterion,
        scored_on=scoring.scored_on,
    )
    chosen = sel.chosen
    table = {
        "settings": sel.settings,
        "candidates": [{**c.__dict__, "chosen": c == chosen} for c in sel.candidates],
        "chosen": None if chosen is None else chosen.__dict__,
        "no_choice": no_choice_message(sel) if chosen is None else None,
    }
    return table, (bank_to_bytes(sel.bank) if sel.bank is not None else None)


def prepare_bank(
    spec: ExperimentSpec, model: Model, sets: PromptSets, on_capture: Callable[[Captured, Captured], None] | None = None
) -> DirectionBank:
    """The run's direction bank: from a file, or extracted in one pass (whose activations `on_capture` also gets)."""
    d = spec.directions
    if d.source == "file":
        bank = DirectionBank.load(d.path)  # type: ignore[arg-type]
        bank.check_model(model)
        return bank
    dims = [k for s in spec.studies if isinstance(s, Subspace) for k in s.ks]
    dims += [s.subspace_k for s in spec.studies if isinstance(s, Frontier) and "subspace" in s.rungs]
    return extract_directions(
        model,
        sets.extract_harmful,
        sets.extract_harmless,
        method=d.method,
        position=d.position,
        system=spec.generation.system,
        subspace=max(dims, default=0),
        on_capture=on_capture,
    )


def calibrate_coherence(
    spec: ExperimentSpec, model: Model, sets: PromptSets, tokens: int = 0, short: dict | None = None
) -> dict:
    """The gate's thresholds from the unsteered model's answers to the calibration prompts at the spec's length,
    or at `tokens` (confirmation at length) with the relevance rule scaled by the medians at the two lengths."""
    prompts = list(sets.extract_harmless)[: spec.coherence.calibration_prompts]
    reference = None
    if tokens and spec.coherence.min_relevance is not None:
        reference = (short or {}).get("relevance_median")
        if reference is None:  # thresholds stored before the median was recorded: measure it again
            reference = calibrate_coherence(spec, model, sets)["relevance_median"]
    gate = calibrated_gate(
        model,
        prompts,
        max_new_tokens=tokens or spec.generation.max_new_tokens,
        batch_size=spec.generation.batch_size,
        system=spec.generation.system,
        quantile=spec.coherence.quantile,
        margin=spec.coherence.margin,
        min_relevance=spec.coherence.min_relevance,
        reference_median=reference,
    )
    assert gate.thresholds is not None  # a calibrated gate has its thresholds
    return gate.thresholds.to_dict()
