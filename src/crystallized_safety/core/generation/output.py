"""What generation returns: one `Generation` per prompt, flagged when its output is degenerate.

Why the flag: a steering vector far beyond the residual stream's scale (a direction row of 1e30, norms of 1e30
with relative alphas) leaves the logits finite but meaningless: constant (greedy picks token 0, often the pad
token; sampling picks uniformly random tokens) or one token forever. Written as-is, such a row reads as an empty
or odd answer, and an empty answer holds no refusal phrase, so it would count as a bypass. Flagged rows are
counted as incoherent by the run's worker and answered with an error by the server.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from ..model import Model

MIN_CONSTANT_RUN = 16  # one token repeated this many times, and nothing else: no answer looks like that
DEGENERATE = "degenerate output: "  # how a stored row's judge_reason flags it (the run's worker writes it)


@dataclass(frozen=True)
class Generation:
    prompt: str
    response: str
    token_ids: tuple[int, ...]
    finished: bool  # hit EOS before max_new_tokens
    degenerate: str | None = None  # why the output is garbage (constant logits, only padding, one token)


def degenerate_reason(model: Model, tokens: Sequence[int], response: str, flat_logits: bool) -> str | None:
    """Why a row's output is degenerate, or None: constant logits at some step, new tokens that are all padding
    or special (decoding to nothing), or a single token repeated MIN_CONSTANT_RUN times or more."""
    if flat_logits:
        return "constant logits (the steering erased the hidden state)"
    if tokens and not response:
        pad = model.tokenizer.pad_token_id
        kind = "padding" if pad is not None and all(t == pad for t in tokens) else "special tokens"
        return f"only {kind} ({len(tokens)} tokens, no text)"
    if len(tokens) >= MIN_CONSTANT_RUN and len(set(tokens)) == 1:
        return f"one token repeated {len(tokens)} times"
    return None


def generations(
    model: Model,
    prompts: Sequence[str],
    tokens: Sequence[Sequence[int]],
    ended: Sequence[bool],
    flat: Collection[int] = (),
) -> list[Generation]:
    """Decode each row's new tokens (already cut before the first EOS) into a `Generation`; `flat`: the rows
    whose logits were constant at some step."""
    out = []
    for row, (prompt, t, e) in enumerate(zip(prompts, tokens, ended)):
        response = model.tokenizer.decode(list(t), skip_special_tokens=True).strip()
        reason = degenerate_reason(model, t, response, row in flat)
        out.append(Generation(prompt, response, tuple(t), bool(e), reason))
    return out
