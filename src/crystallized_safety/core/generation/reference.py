"""The reference engine: plain left-padded `model.generate` under an intervention (also used for sampling,
and by the server). The fast engine is tested token for token against it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..model import Model
from ..steering import Intervention, steer
from .output import Generation, generations


@dataclass(frozen=True)
class Decoding:
    """How to pick tokens: greedy, or seeded sampling with temperature / top-p."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def with_seed(self, seed: int) -> Decoding:
        return replace(self, seed=seed)


def reference_batch(
    model: Model,
    prompts: Sequence[str],
    texts: Sequence[str],
    intervention: Intervention | None,
    decoding: Decoding,
    *,
    raw: bool = False,
) -> list[Generation]:
    """One batched `generate` over already formatted `texts`; `intervention` covers exactly these rows.
    Each row's tokens are cut before its first EOS (padding only ever follows an EOS); rows whose logits were
    constant at some step come back flagged `degenerate`."""
    batch = model.encode(texts, raw=raw)
    prompt_len = batch["input_ids"].shape[1]
    devices = [model.device] if model.device.type == "cuda" else []
    with (
        torch.inference_mode(),
        torch.random.fork_rng(devices=devices),
        steer(model, intervention, prompt_len=prompt_len, batch_rows=len(texts)),
    ):
        torch.manual_seed(decoding.seed)
        flat: set[int] = set()
        out = model.generate_reference(
            batch,
            max_new_tokens=decoding.max_new_tokens,
            do_sample=decoding.do_sample,
            temperature=decoding.temperature,
            top_p=decoding.top_p,
            flat=flat,
        )
    eos = set(model.eos_ids())
    tokens, ended = [], []
    for ids in out[:, prompt_len:].tolist():
        cut = next((i for i, t in enumerate(ids) if t in eos), None)
        tokens.append(ids[:cut] if cut is not None else ids)
        ended.append(cut is not None)
    return generations(model, prompts, tokens, ended, flat)
