"""The worker: runs packs of chunks for one model (generate under the packed intervention, judge, gate
coherence, read the first-token refusal score from the generation's own prefill) into typed store rows."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..core.directions import DirectionBank
from ..core.generation import FastEngine, generate
from ..core.generation.output import DEGENERATE
from ..core.model import Model
from ..judges.coherence import CoherenceGate
from ..judges.refusal_score import RefusalScoreJudge, refusal_log_odds
from ..judges.substring import SubstringJudge
from ..store import GenerationRow
from .chunks import Chunk, pack_intervention


def bank_to_bytes(bank: DirectionBank) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return bank.save(Path(tmp) / "bank.safetensors").read_bytes()


def bank_from_bytes(data: bytes) -> DirectionBank:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bank.safetensors"
        path.write_bytes(data)
        return DirectionBank.load(path)


@dataclass
class ModelContext:
    """Everything a worker needs besides the loaded model: sent once per model, small and picklable. A remote
    worker opens the model itself, with the spec's `device` and `dtype`."""

    model_name: str
    bank_bytes: bytes
    transfer_bytes: dict[str, bytes] = field(default_factory=dict)
    coherence: dict | None = None
    judges: tuple[str, ...] = ("substring",)
    system: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    coherence_at_length: dict | None = None  # the gate's thresholds for confirmations at length

    def bank(self) -> DirectionBank:
        return bank_from_bytes(self.bank_bytes)

    def transfer(self) -> dict[str, DirectionBank]:
        return {k: bank_from_bytes(v) for k, v in self.transfer_bytes.items()}


class ChunkWorker:
    """Runs chunks for one model: generate under the intervention, judge, gate coherence."""

    def __init__(self, model: Model, ctx: ModelContext) -> None:
        self.model, self.ctx = model, ctx
        self.bank, self.transfer = ctx.bank(), ctx.transfer()
        self.substring = SubstringJudge()
        self.delayed = SubstringJudge(delayed=True)  # confirmations at length: a refusal after the opening counts
        self.gate = CoherenceGate(model, ctx.coherence, system=ctx.system) if ctx.coherence else None
        long = ctx.coherence_at_length
        self.gate_at_length = CoherenceGate(model, long, system=ctx.system) if long and ctx.coherence else self.gate
        self.scorer = RefusalScoreJudge(model, system=ctx.system) if "score" in ctx.judges else None

    def judge_answers(
        self, prompts: Sequence[str], responses: Sequence[str], at_length: bool
    ) -> list[tuple[int | None, int | None]]:
        """(refusal, coherent) of answers judged as this model's are (short: the substring judge and the gate; at
        length: as confirmations, delayed refusals read, the gate calibrated at length), e.g. a reference model's."""
        verdicts, coh = self._judge(prompts, responses, at_length)
        return [
            (None if v.refusal is None else int(v.refusal), None if c is None else int(c.coherent))
            for v, c in zip(verdicts, coh)
        ]

    def _judge(self, prompts: Sequence[str], responses: Sequence[str], at_length: bool) -> tuple[list, list]:
        """(judge verdicts, gate results or None each): the short judge and gate, or those of confirmations."""
        verdicts = (self.delayed if at_length else self.substring).judge(prompts, responses)
        gate = self.gate_at_length if at_length else self.gate
        refusals = [v.refusal for v in verdicts]
        return verdicts, gate.evaluate(prompts, responses, refusals) if gate is not None else [None] * len(prompts)

    def run_pack(self, pack: Sequence[Chunk]) -> list[list[GenerationRow]]:
        """One batched generate for every chunk of the pack (same prompts, one intervention per row block)."""
        iv = pack_intervention(
            [c.condition for c in pack], len(pack[0].prompts), self.bank, self.transfer, self.ctx.seed
        )
        prompts = [p for chunk in pack for p in chunk.prompts]
        scores: list[float | None] = [None] * len(prompts)
        scorer = self.scorer

        def first_token_scores(rows: slice, logits) -> None:
            # the first-token refusal score read from the generation's own prefill (no second forward pass)
            assert scorer is not None
            scores[rows] = refusal_log_odds(logits, scorer.token_ids).cpu().tolist()

        gens = generate(
            self.model,
            prompts,
            iv,
            max_new_tokens=pack[0].max_new_tokens,
            batch_size=len(prompts),
            system=self.ctx.system,
            seed=self.ctx.seed,
            engine=FastEngine(on_first_logits=first_token_scores if scorer is not None else None),
        )
        responses = [g.response for g in gens]
        verdicts, coh = self._judge(prompts, responses, at_length=bool(pack[0].condition.max_new_tokens))
        out, pos = [], 0
        for chunk in pack:
            rows, indices = [], chunk.indices  # a subset's eval-set indices, else start, start + 1, ...
            for i in range(len(chunk.prompts)):
                g, v, s, c = gens[pos], verdicts[pos], scores[pos], coh[pos]
                pos += 1
                rows.append(
                    GenerationRow(
                        model=chunk.model,
                        study=chunk.study,
                        condition_key=chunk.condition.key,
                        condition=chunk.condition.to_json(),
                        prompt_set=chunk.condition.prompt_set,
                        prompt_index=indices[i],
                        prompt=g.prompt,
                        response=g.response,
                        n_tokens=len(g.token_ids),
                        finished=int(g.finished),
                        refusal=None if v.refusal is None else int(v.refusal),
                        judge=v.judge,
                        judge_reason=v.reason if g.degenerate is None else DEGENERATE + g.degenerate,
                        score=s,
                        # a degenerate output is incoherent whether or not the gate runs: never a bypass
                        coherent=0 if g.degenerate is not None else None if c is None else int(c.coherent),
                        perplexity=None if c is None else c.perplexity,
                        distinct_n=None if c is None else c.distinct,
                        token_ids=json.dumps(list(g.token_ids)),
                        relevance=None if c is None else c.relevance,
                    )
                )
            out.append(rows)
        return out
