"""Work units: a `Chunk` is one batch of prompts under one condition (the unit of work, retry and commit);
a pack is several chunks over the same prompts generated in one batch (one intervention per row block)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from ..core import modes
from ..core.directions import DirectionBank
from ..core.steering import Intervention, pack_interventions
from ..experiments.conditions import HARMFUL, HARMLESS, Condition, StudyPlan, baseline, build_intervention, plan_studies
from ..experiments.prompt_sets import PromptSets
from ..experiments.spec import ExperimentSpec


@dataclass(frozen=True)
class Chunk:
    """One batch of prompts under one condition: the unit of work, of retry and of commit."""

    model: str
    study: str
    condition: Condition
    start: int  # index of the first prompt in the eval set
    prompts: tuple[str, ...]
    max_new_tokens: int
    picked: tuple[int, ...] = ()  # the prompts' indices in the eval set when not start, start + 1, ... (a subset)

    @property
    def indices(self) -> tuple[int, ...]:
        """Each prompt's index in the eval set (what its row is stored under)."""
        return self.picked or tuple(range(self.start, self.start + len(self.prompts)))

    @property
    def key(self) -> str:
        fields: list = [
            self.model,
            self.condition.key,
            self.condition.prompt_set,
            self.start,
            len(self.prompts),
            self.max_new_tokens,
        ]
        raw = json.dumps(fields + [list(self.picked)] if self.picked else fields)  # contiguous: the keys as before
        return hashlib.sha256(raw.encode()).hexdigest()[:20]

    @property
    def pack_group(self) -> tuple:
        """Chunks with equal groups can share one generate (same prompts, same token budget)."""
        return (self.condition.prompt_set, self.start, self.picked, self.prompts, self.max_new_tokens)


Pack = tuple[Chunk, ...]


def pack_intervention(
    conds: Sequence[Condition],
    rows: int,
    bank: DirectionBank,
    transfer: dict[str, DirectionBank] | None = None,
    seed: int = 0,
) -> Intervention | None:
    """One Intervention for len(conds) blocks of `rows` rows each (several cells in one batch): see
    `steering.pack_interventions`."""
    ivs = [build_intervention(c, bank, transfer, seed) for c in conds]
    return pack_interventions(ivs, rows, bank.hidden_size)


def make_packs(chunks: Sequence[Chunk], pack_rows: int) -> list[Pack]:
    """Deterministic packs: chunks over the same prompts and token budget, 'add' mode (or baseline), up to
    `pack_rows` rows per generate. Formed from ALL chunks of a run, so a resumed run re-forms the same packs."""
    groups: dict[tuple, list[Chunk]] = {}
    packs: list[Pack] = []
    for chunk in chunks:
        if not modes.mode(chunk.condition.mode).packs and not chunk.condition.is_baseline:
            packs.append((chunk,))
            continue
        groups.setdefault(chunk.pack_group, []).append(chunk)
    for group in groups.values():
        per = max(1, pack_rows // len(group[0].prompts)) if pack_rows else 1
        packs.extend(tuple(group[i : i + per]) for i in range(0, len(group), per))
    return packs


def expand(
    spec: ExperimentSpec, model_name: str, n_layers: int, sets: PromptSets
) -> tuple[list[StudyPlan], list[Chunk]]:
    """All chunks for one model, deduplicated across studies, baselines first."""
    plans = plan_studies(spec, n_layers, model_name)
    wanted: dict[str, tuple[str, Condition]] = {}
    for prompt_set in (HARMFUL, HARMLESS):
        cond = baseline(prompt_set)
        wanted[cond.key] = ("baseline", cond)
    for plan in plans:
        for _tags, cond in plan.conditions:
            wanted.setdefault(cond.key, (plan.label, cond))
    return plans, [c for study, cond in wanted.values() for c in chunks_of(spec, model_name, study, cond, sets)]


def chunks_of(
    spec: ExperimentSpec, model_name: str, study: str, cond: Condition, sets: PromptSets, batch_size: int = 0
) -> list[Chunk]:
    """The chunks of one condition: its prompt set in batches (the spec's size, or `batch_size`), to its own length
    or the spec's."""
    prompts = list(sets.eval_harmful if cond.prompt_set == HARMFUL else sets.eval_harmless)
    bs, mnt = batch_size or spec.generation.batch_size, cond.max_new_tokens or spec.generation.max_new_tokens
    return [
        Chunk(model_name, study, cond, start, tuple(prompts[start : start + bs]), mnt)
        for start in range(0, len(prompts), bs)
    ]
