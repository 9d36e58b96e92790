"""Divergence from the unsteered model: how much an intervention (or another model) changes what the model
would say where there is nothing to refuse. This is the damage that heretic and refusal_direction report next to
the refusal rate:
- *first-token KL*: KL(unsteered || steered) of the next-token distribution after each prompt (refusal_direction's
  filter, heretic's objective), averaged over prompts;
- *teacher-forced KL*: the same KL at every position of the unsteered model's own answer (the steered model
  reads that answer token by token), pooled over the answer's tokens: it sees damage that only shows after the
  first token.
Both are in nats, computed in float64 from the logits of the answer positions only (the LM head over the
vocabulary is the costly part)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..core.model import Model
from ..core.steering import Intervention, pack_interventions, steer
from ..errors import CrystallizedSafetyError


def kl_rows(base_log_probs: torch.Tensor, other_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities [rows, vocab] (float64)."""
    p, q = base_log_probs.double(), other_log_probs.double()
    return (p.exp() * (p - q)).sum(-1)


def mean_kl(base: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(base) || softmax(other)) for logits [rows, vocab], in nats."""
    return float(kl_rows(torch.log_softmax(base.double(), -1), torch.log_softmax(other.double(), -1)).mean())


@dataclass(frozen=True)
class Divergence:
    kl_first: float  # mean over prompts of the first-token KL
    kl_answer: float  # pooled over every answer position (teacher-forced)
    prompts: int
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


class DivergenceMeter:
    """KL(reference || model under an intervention), teacher-forced on fixed answers to fixed prompts.

    `answers` are token ids of the unsteered answers (without EOS); an empty answer still has its first-token
    position. The reference is `reference` (another model: e.g. the base a model organism was tuned from) or
    `model` itself, unsteered; its log-probabilities are computed once and reused for every intervention.
    Several 'add' interventions share one forward (one block of rows each)."""

    def __init__(
        self,
        model: Model,
        prompts: Sequence[str],
        answers: Sequence[Sequence[int]],
        *,
        system: str | None = None,
        batch_size: int = 16,
        reference: Model | None = None,
        max_rows: int = 64,
    ) -> None:
        if len(prompts) != len(answers) or not prompts:
            raise CrystallizedSafetyError(
                f"divergence needs one answer per prompt, got {len(prompts)} prompts and {len(answers)} answers"
            )
        self.model, self.batch_size, self.max_rows = model, max(1, batch_size), max_rows
        ref = reference or model
        self.seqs: list[list[int]] = []
        self.spans: list[tuple[int, int]] = []  # positions whose logits predict the answer's tokens
        for text, answer in zip(ref.format(list(prompts), system=system), answers):
            ids = ref.tokenizer(text, add_special_tokens=False)["input_ids"]
            self.seqs.append(ids + list(answer))
            self.spans.append((len(ids) - 1, len(ids) - 1 + max(len(answer), 1)))
        n, step = len(self.seqs), self.batch_size
        self.batches = [range(i, min(i + step, n)) for i in range(0, n, step)]
        with torch.inference_mode():
            self.base = [self._log_probs(ref, rows, None, 1) for rows in self.batches]

    def _log_probs(self, model: Model, rows: range, iv: Intervention | None, blocks: int) -> torch.Tensor:
        """Log-softmax at the answer positions of `rows`, for `blocks` copies of the batch (one per packed
        intervention), concatenated block by block, row by row. Right-padded: positions are the sequences' own."""
        seqs = [self.seqs[i] for i in rows] * blocks
        spans = [self.spans[i] for i in rows] * blocks
        width = max(len(s) for s in seqs)
        pad = model.pad_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=model.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=model.device)
        with steer(model, iv, batch_rows=len(seqs)):
            hidden = model.body(input_ids=ids, attention_mask=mask).last_hidden_state
        picked = torch.cat([hidden[k, a:b] for k, (a, b) in enumerate(spans)])
        return model.check_logits(torch.log_softmax(model.head(picked).double(), -1))

    def _groups(self, interventions: Sequence[Intervention | None]) -> list[list[int]]:
        per = max(1, self.max_rows // self.batch_size)
        groups: list[list[int]] = []
        adds = [i for i, iv in enumerate(interventions) if iv is None or (iv.mode.packs and iv.rows is None)]
        groups += [adds[i : i + per] for i in range(0, len(adds), per)]
        groups += [[i] for i in range(len(interventions)) if i not in set(adds)]
        return groups

    def measure(self, interventions: Sequence[Intervention | None]) -> list[Divergence]:
        """One Divergence per intervention (None = the model unsteered)."""
        first = torch.zeros(len(interventions), dtype=torch.float64)
        total = torch.zeros(len(interventions), dtype=torch.float64)
        tokens = sum(b - a for a, b in self.spans)
        with torch.inference_mode():
            for group in self._groups(interventions):
                ivs = [interventions[i] for i in group]
                for rows, base in zip(self.batches, self.base):
                    iv = pack_interventions(ivs, len(rows), self.model.hidden_size)
                    steered = self._log_probs(self.model, rows, iv, len(ivs))
                    per_block = steered.shape[0] // len(ivs)
                    starts = torch.tensor([0] + [b - a for a, b in (self.spans[i] for i in rows)]).cumsum(0)[:-1]
                    for j, i in enumerate(group):
                        kl = kl_rows(base, steered[j * per_block : (j + 1) * per_block])
                        total[i] += kl.sum()
                        first[i] += kl[starts].sum()
        n = len(self.seqs)
        return [Divergence(float(first[i] / n), float(total[i] / tokens), n, tokens) for i in range(len(interventions))]
