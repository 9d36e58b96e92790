"""Capture the residual stream of ALL chosen layers in one batched, left-padded forward pass.

Layer i is the output of decoder block i (= HF `hidden_states[i+1]`, except that HF applies the final
norm to its last entry; hooks on the block see the true residual stream for every layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import CrystallizedSafetyError, PromptError
from ..validation import is_int
from .model import Model, positions
from .steering import layer_hooks

Position = str | int  # "last" | "mean" | negative offset into the post-instruction tokens


class _StopForward(Exception):
    """Raised by the deepest hook so layers past it (and the LM head) are never computed."""


def parse_position(value: str | int) -> Position:
    """'last' | 'mean' | a negative integer (e.g. -2: second-to-last prompt token)."""
    if is_int(value):
        position = value
    elif isinstance(value, str) and value.strip().lower() in ("last", "mean"):
        return value.strip().lower()
    else:
        try:
            position = int(str(value))
        except ValueError:
            raise CrystallizedSafetyError(
                f"unknown position '{value}': use last, mean, or a negative offset like -2"
            ) from None
    if position >= 0:
        raise CrystallizedSafetyError(f"position offset {position} must be negative (-1 = last prompt token)")
    return position


@dataclass
class Captured:
    """Activations at one position: `acts` [N, L, d] (float32, cpu) for `layers`, plus norm stats."""

    acts: torch.Tensor
    layers: list[int]
    position: Position
    resid_norm: torch.Tensor  # [L] mean residual norm over prompt tokens, first token (attention sink) excluded


def _capture_hook(
    acts: torch.Tensor,
    norm_sum: torch.Tensor,
    slot: int,
    deepest: bool,
    chunk: slice,
    position: Position,
    body_mask: torch.Tensor,
    lengths: torch.Tensor,
):
    """Hook for one layer and one batch: store the picked position, accumulate residual norms."""

    def fn(hidden: torch.Tensor) -> None:
        h = hidden.float()
        norm_sum[slot] += float((h.norm(dim=-1) * body_mask).sum())
        if position == "last":
            picked = h[:, -1]
        elif position == "mean":
            picked = (h * body_mask.unsqueeze(-1)).sum(dim=1) / lengths.unsqueeze(-1)
        else:
            assert isinstance(position, int)
            picked = h[:, position]
        acts[chunk, slot] = picked.cpu()
        if deepest:
            raise _StopForward

    return fn


def capture(
    model: Model,
    prompts: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    position: str | int = "last",
    batch_size: int = 16,
    system: str | None = None,
    raw: bool = False,
) -> Captured:
    """Residual stream at `position` for every prompt and layer, from one forward pass per batch."""
    if not prompts:
        raise PromptError("no prompts to capture activations for: pass a non-empty prompt set")
    layers = model.parse_layers(layers)
    position = parse_position(position)
    if isinstance(position, int) and not raw:
        limit = model.post_instruction_length()
        if -position > limit + 1:
            raise CrystallizedSafetyError(
                f"position {position} reaches into the user's text: this template has {limit} post-instruction "
                f"tokens, so use an offset between -1 and -{limit + 1}"
            )
    texts = model.format(prompts, system=system, raw=raw)
    deepest = max(layers)
    n, d = len(texts), model.hidden_size
    acts = torch.empty(n, len(layers), d, dtype=torch.float32)
    norm_sum = torch.zeros(len(layers), dtype=torch.float64)
    norm_count = 0
    body = model.body  # skip the LM head: only the residual stream is needed

    for start in range(0, n, batch_size):
        batch = model.encode(texts[start : start + batch_size], raw=raw)
        mask = batch["attention_mask"]
        rows = mask.shape[0]
        # Exclude padding and each row's first real token (attention sink) from means and norms.
        first = mask.float().argmax(dim=1)
        body_mask = mask.bool().clone()
        body_mask[torch.arange(rows), first] = False
        lengths = body_mask.sum(dim=1)
        if position == "mean" and bool((lengths == 0).any()):
            raise PromptError("a prompt is a single token: mean position needs at least two prompt tokens")
        norm_count += int(lengths.sum())
        chunk = slice(start, start + rows)

        fns = {
            layer: _capture_hook(acts, norm_sum, slot, layer == deepest, chunk, position, body_mask, lengths)
            for slot, layer in enumerate(layers)
        }
        with torch.inference_mode(), layer_hooks(model, fns):
            try:
                body(**batch, position_ids=positions(mask), use_cache=False)
            except _StopForward:
                pass
    resid = (norm_sum / max(norm_count, 1)).float()
    return Captured(acts=acts, layers=list(layers), position=position, resid_norm=resid)
