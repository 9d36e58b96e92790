"""What generation returns: one `Generation` per prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..model import Model


@dataclass(frozen=True)
class Generation:
    prompt: str
    response: str
    token_ids: tuple[int, ...]
    finished: bool  # hit EOS before max_new_tokens


def generations(
    model: Model, prompts: Sequence[str], tokens: Sequence[Sequence[int]], ended: Sequence[bool]
) -> list[Generation]:
    """Decode each row's new tokens (already cut before the first EOS) into a `Generation`."""
    return [
        Generation(prompt, model.tokenizer.decode(list(t), skip_special_tokens=True).strip(), tuple(t), bool(e))
        for prompt, t, e in zip(prompts, tokens, ended)
    ]
