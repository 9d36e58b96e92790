"""Runs an experiment spec into a store: prepares each model once, runs only the chunks the store lacks,
then analyses. Executors decide *where* chunks run (in-process, or on a Ray cluster) behind one interface.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from . import __version__
from .directions import DirectionBank
from .errors import CrystallizedSafetyError
from .experiments.conditions import HARMFUL, HARMLESS, Condition, StudyPlan, baseline, build_intervention, plan_studies
from .experiments.spec import ExperimentSpec
from .models import Model, load_model
from .progress import Progress, silent
from .prompts import PromptSet, check_disjoint, load_prompts
from .steering import Intervention, pack_interventions

# --------------------------------------------------------------------------- work units


@dataclass(frozen=True)
class Chunk:
    """One batch of prompts under one condition: the unit of work, of retry and of commit."""

    model: str
    study: str
    condition: Condition
    start: int  # index of the first prompt in the eval set
    prompts: tuple[str, ...]
    max_new_tokens: int

    @property
    def key(self) -> str:
        raw = json.dumps(
            [
                self.model,
                self.condition.key,
                self.condition.prompt_set,
                self.start,
                len(self.prompts),
                self.max_new_tokens,
            ]
        )
        return hashlib.sha256(raw.encode()).hexdigest()[:20]


@dataclass
class ModelContext:
    """Everything a worker needs besides the model: sent once per model, small and picklable."""

    bank_bytes: bytes
    transfer_bytes: dict[str, bytes] = field(default_factory=dict)
    coherence: dict | None = None
    judges: tuple[str, ...] = ("substring",)
    system: str | None = None

    def bank(self) -> DirectionBank:
        return _bank_from_bytes(self.bank_bytes)

    def transfer(self) -> dict[str, DirectionBank]:
        return {k: _bank_from_bytes(v) for k, v in self.transfer_bytes.items()}


def _bank_to_bytes(bank: DirectionBank) -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = bank.save(Path(tmp) / "bank.safetensors")
        return path.read_bytes()


def _bank_from_bytes(data: bytes) -> DirectionBank:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bank.safetensors"
        path.write_bytes(data)
        return DirectionBank.load(path)


class ChunkWorker:
    """Runs chunks for one model: generate under the intervention, judge, gate coherence."""

    def __init__(self, model: Model, ctx: ModelContext) -> None:
        from .judges.coherence import CoherenceGate
        from .judges.substring import SubstringJudge

        self.model, self.ctx = model, ctx
        self.bank, self.transfer = ctx.bank(), ctx.transfer()
        self.substring = SubstringJudge()
        self.gate = CoherenceGate(model, ctx.coherence, system=ctx.system) if ctx.coherence else None
        self.scorer = None
        if "score" in ctx.judges:
            from .judges.refusal_score import RefusalScoreJudge

            self.scorer = RefusalScoreJudge(model, system=ctx.system)

    def run(self, chunk: Chunk) -> list[dict]:
        return self.run_pack((chunk,))[0]

    def run_pack(self, pack: Sequence[Chunk]) -> list[list[dict]]:
        """One batched generate for every chunk of the pack (same prompts, one intervention per row block)."""
        from .generation import generate

        iv = pack_intervention([c.condition for c in pack], len(pack[0].prompts), self.bank, self.transfer)
        prompts = [p for chunk in pack for p in chunk.prompts]
        scores: list = [None] * len(prompts)

        def first_token_scores(rows: slice, logits) -> None:
            # the first-token refusal score read from the generation's own prefill (no second forward pass)
            from .judges.refusal_score import refusal_log_odds

            scores[rows] = refusal_log_odds(logits, self.scorer.token_ids).cpu().tolist()

        gens = generate(
            self.model,
            prompts,
            iv,
            max_new_tokens=pack[0].max_new_tokens,
            batch_size=len(prompts),
            system=self.ctx.system,
            first_logits=first_token_scores if self.scorer is not None else None,
        )
        responses = [g.response for g in gens]
        verdicts = self.substring.judge(prompts, responses)
        coh = self.gate.evaluate(prompts, responses) if self.gate is not None else [None] * len(prompts)
        out, pos = [], 0
        for chunk in pack:
            rows = []
            for i in range(len(chunk.prompts)):
                g, v, s, c = gens[pos], verdicts[pos], scores[pos], coh[pos]
                pos += 1
                rows.append(
                    {
                        "model": chunk.model,
                        "study": chunk.study,
                        "condition_key": chunk.condition.key,
                        "condition": chunk.condition.to_json(),
                        "prompt_set": chunk.condition.prompt_set,
                        "prompt_index": chunk.start + i,
                        "prompt": g.prompt,
                        "response": g.response,
                        "n_tokens": len(g.token_ids),
                        "finished": int(g.finished),
                        "refusal": None if v.refusal is None else int(v.refusal),
                        "judge": v.judge,
                        "judge_reason": v.reason,
                        "score": s,
                        "coherent": None if c is None else int(c.coherent),
                        "perplexity": None if c is None else c.perplexity,
                        "distinct_n": None if c is None else c.distinct,
                        "token_ids": json.dumps(list(g.token_ids)),
                    }
                )
            out.append(rows)
        return out


def pack_intervention(
    conds: Sequence[Condition], rows: int, bank: DirectionBank, transfer: dict[str, DirectionBank] | None = None
) -> Intervention | None:
    """One Intervention for len(conds) blocks of `rows` rows each (several cells in one batch): see
    `steering.pack_interventions`."""
    return pack_interventions([build_intervention(c, bank, transfer) for c in conds], rows, bank.hidden_size)


def make_packs(chunks: Sequence[Chunk], pack_rows: int) -> list[tuple[Chunk, ...]]:
    """Deterministic packs: chunks over the same prompts and token budget, 'add' mode (or baseline), up to
    `pack_rows` rows per generate. Formed from ALL chunks of a run, so a resumed run re-forms the same packs."""
    groups: dict[tuple, list[Chunk]] = {}
    packs: list[tuple[Chunk, ...]] = []
    for chunk in chunks:
        if chunk.condition.mode != "add" and not chunk.condition.is_baseline:
            packs.append((chunk,))
            continue
        groups.setdefault((chunk.condition.prompt_set, chunk.start, chunk.prompts, chunk.max_new_tokens), []).append(
            chunk
        )
    for group in groups.values():
        per = max(1, pack_rows // len(group[0].prompts)) if pack_rows else 1
        packs.extend(tuple(group[i : i + per]) for i in range(0, len(group), per))
    return packs


# --------------------------------------------------------------------------- executors


Pack = tuple[Chunk, ...]
ResultSink = Callable[[Pack, list[list[dict]], float, str], None]


class Executor(Protocol):
    name: str

    def run(
        self, model_name: str, load: Callable[[], Model], ctx: ModelContext, chunks: Sequence[Chunk], sink: ResultSink
    ) -> None: ...


class LocalExecutor:
    """In-process, in order; the model is the one the runner already loaded."""

    name = "local"

    def run(self, model_name, load, ctx, packs, sink) -> None:
        if not packs:
            return
        worker = ChunkWorker(load(), ctx)
        for pack in packs:
            t0 = time.perf_counter()
            rows = worker.run_pack(pack)
            sink(pack, rows, time.perf_counter() - t0, "local")


# --------------------------------------------------------------------------- preparation


def environment() -> dict:
    import transformers

    return {
        "tool_version": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
    }


@dataclass
class PromptSets:
    extract_harmful: PromptSet
    extract_harmless: PromptSet
    eval_harmful: PromptSet
    eval_harmless: PromptSet


def load_prompt_sets(spec: ExperimentSpec) -> PromptSets:
    p = spec.prompts

    def load(source: str, limit: int | None = None) -> PromptSet:
        filters = {} if source.startswith("bundled:") else {"column": p.column, "where": p.where, "dedupe": p.dedupe}
        return load_prompts(source, limit=limit, **filters)

    sets = PromptSets(
        load(p.extract_harmful), load(p.extract_harmless), load(p.eval_harmful, p.n), load(p.eval_harmless, p.n)
    )
    for a, b in (
        (sets.extract_harmful, sets.eval_harmful),
        (sets.extract_harmless, sets.eval_harmless),
        (sets.extract_harmful, sets.eval_harmless),
        (sets.extract_harmless, sets.eval_harmful),
    ):
        check_disjoint(a, b, "prompts: extraction and evaluation sets must be disjoint")
    return sets


def _prepare_bank(spec: ExperimentSpec, model: Model, sets: PromptSets) -> DirectionBank:
    from .directions import extract_directions

    d = spec.directions
    if d.source == "file":
        bank = DirectionBank.load(d.path)  # type: ignore[arg-type]
        bank.check_model(model)
        return bank
    return extract_directions(
        model,
        sets.extract_harmful,
        sets.extract_harmless,
        method=d.method,
        position=d.position,
        system=spec.generation.system,
    )


def _calibrate_coherence(spec: ExperimentSpec, model: Model, sets: PromptSets) -> dict:
    from .evaluation import calibrated_gate

    gate = calibrated_gate(
        model,
        list(sets.extract_harmless)[: spec.coherence.calibration_prompts],
        max_new_tokens=spec.generation.max_new_tokens,
        batch_size=spec.generation.batch_size,
        system=spec.generation.system,
        quantile=spec.coherence.quantile,
        margin=spec.coherence.margin,
    )
    return gate.thresholds.to_dict()


# --------------------------------------------------------------------------- the runner


@dataclass
class RunResult:
    run_id: str
    resumed: bool
    chunks_run: int
    chunks_skipped: int
    seconds: float
    verdicts: list[dict]


def expand(
    spec: ExperimentSpec, model_name: str, n_layers: int, sets: PromptSets
) -> tuple[list[StudyPlan], list[Chunk]]:
    """All chunks for one model, deduplicated across studies, baselines first."""
    plans = plan_studies(spec, n_layers, model_name)
    evals = {HARMFUL: list(sets.eval_harmful), HARMLESS: list(sets.eval_harmless)}
    wanted: dict[str, tuple[str, Condition]] = {}
    for prompt_set in (HARMFUL, HARMLESS):
        cond = baseline(prompt_set)
        wanted[cond.key] = ("baseline", cond)
    for plan in plans:
        for _tags, cond in plan.conditions:
            wanted.setdefault(cond.key, (plan.label, cond))
    bs, mnt = spec.generation.batch_size, spec.generation.max_new_tokens
    chunks = []
    for study, cond in wanted.values():
        prompts = evals[cond.prompt_set]
        for start in range(0, len(prompts), bs):
            chunks.append(Chunk(model_name, study, cond, start, tuple(prompts[start : start + bs]), mnt))
    return plans, chunks


def run_experiment(
    spec: ExperimentSpec,
    store,
    executor: Executor | None = None,
    progress: Progress | None = None,
    models: dict[str, Model] | None = None,
) -> RunResult:
    """Run (or resume) `spec` into `store`. `models` lets tests pass already-loaded models by name."""
    executor = executor or LocalExecutor()
    say = progress or silent
    t0 = time.perf_counter()
    run_id = spec.spec_hash()
    resumed = store.open_run(run_id, spec.name, spec.to_yaml(), spec.spec_hash(), environment())
    sets = load_prompt_sets(spec)
    store.put_artifact(
        run_id,
        "*",
        "prompt_sets",
        {
            name: {"name": ps.name, "source": ps.source, "sha256": ps.sha256, "n": len(ps)}
            for name, ps in vars(sets).items()
        },
    )
    ran = skipped = 0
    for model_name in spec.models:
        r, k = _run_model(spec, store, run_id, model_name, executor, sets, say, models)
        ran, skipped = ran + r, skipped + k
    store.finish_run(run_id)
    return RunResult(run_id, resumed, ran, skipped, time.perf_counter() - t0, store.verdicts(run_id))


class _Loader:
    """Loads models by name once (or hands out ones the caller already loaded)."""

    def __init__(self, spec: ExperimentSpec, default: str, given: dict[str, Model] | None) -> None:
        self.spec, self.default, self.given, self.cache = spec, default, given or {}, {}

    def __call__(self, name: str | None = None) -> Model:
        name = name or self.default
        if name in self.given:
            return self.given[name]
        if name not in self.cache:
            self.cache[name] = load_model(name, device=self.spec.device, dtype=self.spec.dtype)
        return self.cache[name]


def _run_model(
    spec: ExperimentSpec,
    store,
    run_id: str,
    model_name: str,
    executor: Executor,
    sets: PromptSets,
    say: Progress,
    models: dict[str, Model] | None,
) -> tuple[int, int]:
    from .experiments.analysis import analyse_model

    load = _Loader(spec, model_name, models)
    ctx, n_layers = _model_context(spec, store, run_id, model_name, load, sets, say)
    plans, chunks = expand(spec, model_name, n_layers, sets)
    if spec.screening.enabled:
        chunks = _screen(spec, store, run_id, model_name, executor, load, ctx, plans, chunks, say)
    done = store.done_chunks(run_id)
    packs = make_packs(chunks, _pack_rows(spec, store, run_id, model_name, load, chunks, say))
    todo = [p for p in packs if any(c.key not in done for c in p)]
    state = {"done": sum(c.key in done for c in chunks)}

    def sink(pack: Pack, rows: list[list[dict]], seconds: float, worker: str) -> None:
        entries = [(c.key, c.model, c.study, c.condition.key, r) for c, r in zip(pack, rows)]
        state["done"] += store.write_chunks(run_id, entries, seconds, worker)
        say(f"{model_name}: chunks", state["done"], len(chunks), f"{pack[0].study} {pack[0].condition.describe()}")

    todo_chunks = sum(len(p) for p in todo)
    say(f"{model_name}: chunks", state["done"], len(chunks), f"{todo_chunks} of {len(chunks)} to run")
    executor.run(model_name, load, ctx, todo, sink)
    analyse_model(spec, store, run_id, model_name, plans, load, sets)
    return todo_chunks, len(chunks) - todo_chunks


def _pack_rows(spec: ExperimentSpec, store, run_id: str, model_name: str, load, chunks, say: Progress) -> int:
    """The spec's pack_rows; for 'auto', measured once per (run, model) and kept in the store, so a resumed
    run re-forms the same packs."""
    if spec.generation.pack_rows != "auto":
        return spec.generation.pack_rows
    found = store.get_artifact(run_id, model_name, "pack_rows")
    if found is None:
        from .fastgen import autotune_rows

        model = load()
        prompts = list(chunks[0].prompts) if chunks else ["Hello"]
        ids = model.tokenizer(model.format(prompts, system=spec.generation.system), add_special_tokens=False)
        groups: dict[tuple, int] = {}
        for c in chunks:
            key = (c.condition.prompt_set, c.start, c.prompts, c.max_new_tokens)
            groups[key] = groups.get(key, 0) + len(c.prompts)
        limit = max(groups.values(), default=len(prompts))
        say(f"{model_name}: tuning the batch size", 0, 1)
        rows, table = autotune_rows(
            model, ids["input_ids"], spec.generation.max_new_tokens, start=len(prompts), limit=limit
        )
        store.put_artifact(run_id, model_name, "pack_rows", {"rows": rows, "probes": table})
        found = store.get_artifact(run_id, model_name, "pack_rows")
    return int(found[0]["rows"])


def _screen(
    spec: ExperimentSpec,
    store,
    run_id: str,
    model_name: str,
    executor: Executor,
    load: Callable,
    ctx: ModelContext,
    plans: list[StudyPlan],
    chunks: list[Chunk],
    say: Progress,
) -> list[Chunk]:
    """Screening mode: baselines first, then first-token scores for every screened cell in forward passes;
    drops the chunks of cells outside the band that are not among the best. Decisions kept in the store."""
    found = store.get_artifact(run_id, model_name, "screening")
    if found is None:
        base_keys = {baseline(HARMFUL).key, baseline(HARMLESS).key}
        base = [c for c in chunks if c.condition.key in base_keys]
        done = store.done_chunks(run_id)
        pending = [p for p in make_packs(base, 0) if any(c.key not in done for c in p)]

        def sink(pack: Pack, rows: list[list[dict]], seconds: float, worker: str) -> None:
            store.write_chunks(
                run_id, [(c.key, c.model, c.study, c.condition.key, r) for c, r in zip(pack, rows)], seconds, worker
            )

        executor.run(model_name, load, ctx, pending, sink)
        say(f"{model_name}: screening the grid with the first-token refusal score", 0, 1)
        store.put_artifact(
            run_id, model_name, "screening", screen_cells(spec, store, run_id, model_name, load(), ctx, plans)
        )
        found = store.get_artifact(run_id, model_name, "screening")
    dropped = set(found[0]["dropped"])
    return [c for c in chunks if c.condition.key not in dropped]


def screen_cells(
    spec: ExperimentSpec, store, run_id: str, model_name: str, model: Model, ctx: ModelContext, plans: list[StudyPlan]
) -> dict:
    """Screened flip rate per cell: baseline-refused prompts whose steered first-token score falls at or
    below the threshold calibrated against the substring judge on the unsteered outputs."""
    from .judges.refusal_score import RefusalScoreJudge

    base = {r["prompt_index"]: r for r in store.generations(run_id, model_name, baseline(HARMFUL).key, HARMFUL)}
    both = base | {
        -1 - r["prompt_index"]: r for r in store.generations(run_id, model_name, baseline(HARMLESS).key, HARMLESS)
    }
    scorer = RefusalScoreJudge(model, system=ctx.system)
    cal = scorer.calibrate([r["prompt"] for r in both.values()], [bool(r["refusal"]) for r in both.values()])
    order = sorted(base)
    prompts = [base[i]["prompt"] for i in order]
    refused = [k for k, i in enumerate(order) if base[i]["refusal"] == 1]
    bank, transfer = ctx.bank(), ctx.transfer()
    cells = {}
    for plan in plans:
        if plan.kind not in spec.screening.kinds:
            continue
        for _tags, cond in plan.conditions:
            if cond.prompt_set == HARMFUL and cond.direction == "extracted" and cond.key not in cells:
                cells[cond.key] = cond
    conds = list(cells.values())
    per = max(1, 256 // max(len(prompts), 1))
    rates: dict[str, float | None] = {}
    for i in range(0, len(conds), per):
        group = conds[i : i + per]
        packable = all(c.mode == "add" for c in group)
        parts = [group] if packable else [[c] for c in group]
        for part in parts:
            iv = pack_intervention(part, len(prompts), bank, transfer)
            scores = scorer.scores(prompts * len(part), iv).view(len(part), len(prompts))
            for j, cond in enumerate(part):
                flips = sum(1 for k in refused if float(scores[j, k]) <= cal.threshold)
                rates[cond.key] = flips / len(refused) if refused else None
    lo, hi = spec.screening.band
    ranked = sorted((k for k in rates if rates[k] is not None), key=lambda k: -rates[k])
    keep = {k for k in ranked if lo <= rates[k] <= hi} | set(ranked[: spec.screening.best])
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


def _model_context(
    spec: ExperimentSpec,
    store,
    run_id: str,
    model_name: str,
    load: Callable[[], Model],
    sets: PromptSets,
    say: Progress,
) -> tuple[ModelContext, int]:
    """Directions and coherence thresholds, computed once per (run, model) and kept in the store."""
    art = store.get_artifact(run_id, model_name, "directions")
    if art is None:
        say(f"{model_name}: extracting directions", 0, 1)
        model = load()
        bank = _prepare_bank(spec, model, sets)
        store.put_artifact(run_id, model_name, "directions", bank.metadata, _bank_to_bytes(bank))
        art = store.get_artifact(run_id, model_name, "directions")
    bank_bytes = art[1]
    n_layers = int(_bank_from_bytes(bank_bytes).metadata.get("n_layers", 0)) or load().n_layers
    coherence = None
    if spec.coherence.enabled:
        found = store.get_artifact(run_id, model_name, "coherence")
        if found is None:
            say(f"{model_name}: calibrating the coherence gate", 0, 1)
            store.put_artifact(run_id, model_name, "coherence", _calibrate_coherence(spec, load(), sets))
            found = store.get_artifact(run_id, model_name, "coherence")
        coherence = found[0]
    transfer = {}
    for source in sorted({s.source_model for s in spec.studies if s.kind == "transfer"}):  # type: ignore[attr-defined]
        found = store.get_artifact(run_id, model_name, f"transfer:{source}")
        if found is None:
            from .experiments.transfer import transfer_bank

            say(f"{model_name}: fitting transfer from {source}", 0, 1)
            study = next(s for s in spec.studies if s.kind == "transfer" and s.source_model == source)
            bank = transfer_bank(
                spec,
                study,
                load(),
                load(source),
                sets,
                _bank_from_bytes(bank_bytes),
            )
            store.put_artifact(run_id, model_name, f"transfer:{source}", bank.metadata, _bank_to_bytes(bank))
            found = store.get_artifact(run_id, model_name, f"transfer:{source}")
        transfer[source] = found[1]
    ctx = ModelContext(bank_bytes, transfer, coherence, tuple(spec.judges), spec.generation.system)
    return ctx, n_layers


def resolve_executor(name: str, address: str | None = None, workers: int | None = None) -> Executor:
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(address=address, workers=workers)
    raise CrystallizedSafetyError(f"unknown executor '{name}': use local or ray")


def iter_unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
