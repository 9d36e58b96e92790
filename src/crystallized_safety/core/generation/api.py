"""Batched generation under an Intervention: the public `generate`.

Greedy by default (verdicts must be reproducible); seeded sampling on request. Batches are cut from
the prompt list in order; on out-of-memory the batch size halves and the batch is retried (`oom`).

Two engines: `fast` (greedy only; shared-prefix prefill, last-position logits, finished-row compaction,
see `fast`; pass a `FastEngine` to change its switches or read the first-token logits) and `hf`
(left-padded `model.generate`, the reference in `reference`; also used for sampling).
"""

from __future__ import annotations

from collections.abc import Sequence

from ...errors import CrystallizedSafetyError, PromptError
from ..model import Model
from ..steering import Intervention
from .fast import FastEngine
from .oom import in_batches
from .output import Generation
from .reference import Decoding, reference_batch


def generate(
    model: Model,
    prompts: Sequence[str],
    intervention: Intervention | None = None,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    system: str | None = None,
    raw: bool = False,
    engine: str | FastEngine = "fast",
) -> list[Generation]:
    """Generate a response per prompt; an intervention with per-row values covers all `prompts` in order.

    `engine`: "fast" (greedy; sampling falls back to "hf"), "hf" (the reference), or a `FastEngine` whose
    `on_first_logits(rows, logits)` receives each batch's next-token logits after the prompt (the first-token
    refusal score without a second prefill)."""
    if not prompts:
        raise PromptError("no prompts to generate from: pass at least one prompt")
    if max_new_tokens < 1:
        raise CrystallizedSafetyError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not isinstance(engine, FastEngine) and engine not in ("fast", "hf"):
        raise CrystallizedSafetyError(f"unknown engine '{engine}': use fast or hf")
    if isinstance(engine, FastEngine) and do_sample:
        raise CrystallizedSafetyError("the fast engine decodes greedily: use engine='hf' to sample")
    if intervention is not None:
        intervention.check(model, len(prompts))
    texts = model.format(prompts, system=system, raw=raw)
    model.check_fits(texts, max_new_tokens, raw=raw)
    decoding = Decoding(max_new_tokens, do_sample, temperature, top_p, seed)
    fast = engine if isinstance(engine, FastEngine) else (FastEngine() if engine == "fast" and not do_sample else None)

    def run(rows: slice) -> list[Generation]:
        iv = intervention.select(rows) if intervention is not None else None
        if fast is not None:
            return fast.generate(model, prompts[rows], texts[rows], iv, max_new_tokens, rows=rows, raw=raw)
        return reference_batch(model, prompts[rows], texts[rows], iv, decoding.with_seed(seed + rows.start), raw=raw)

    return in_batches(len(texts), batch_size, run)
