"""Batched generation under an Intervention.

Greedy by default (verdicts must be reproducible); seeded sampling on request. Batches are cut from
the prompt list in order; on out-of-memory the batch size halves and the batch is retried.

Two engines: `fast` (greedy only; shared-prefix prefill, last-position logits, finished-row compaction,
see `fastgen`) and `hf` (left-padded `model.generate`, the reference; also used for sampling).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import CrystallizedSafetyError, PromptError
from .models import Model
from .steering import Intervention, steer


@dataclass(frozen=True)
class Generation:
    prompt: str
    response: str
    token_ids: tuple[int, ...]
    finished: bool  # hit EOS before max_new_tokens


def _is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _eos_ids(model: Model) -> list[int]:
    ids = model.hf.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if model.tokenizer.eos_token_id is not None and model.tokenizer.eos_token_id not in ids:
        ids.append(model.tokenizer.eos_token_id)
    return ids


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
    engine: str = "fast",
    share_prefix: bool = True,
    compact: bool = True,
    first_logits: Callable[[slice, torch.Tensor], None] | None = None,
) -> list[Generation]:
    """Generate a response per prompt; an intervention with per-row values covers all `prompts` in order.

    `first_logits(rows, logits)`, if given, receives each batch's next-token logits after the prompt
    (float32 [rows, vocab]; the `fast` engine only): the first-token refusal score without a second prefill."""
    from transformers import GenerationConfig

    if not prompts:
        raise PromptError("no prompts to generate from: pass at least one prompt")
    if max_new_tokens < 1:
        raise CrystallizedSafetyError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if engine not in ("fast", "hf"):
        raise CrystallizedSafetyError(f"unknown engine '{engine}': use fast or hf")
    if intervention is not None:
        intervention.check(model, len(prompts))
    texts = model.format(prompts, system=system, raw=raw)
    eos = _eos_ids(model)
    fast = engine == "fast" and not do_sample
    if first_logits is not None and not fast:
        raise CrystallizedSafetyError("first_logits needs greedy decoding with engine='fast'")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=None,
        pad_token_id=model.tokenizer.pad_token_id,
        eos_token_id=eos,
    )
    results: list[Generation] = []
    start, size = 0, max(1, batch_size)
    while start < len(texts):
        rows = slice(start, min(start + size, len(texts)))
        try:
            p, t = prompts[rows], texts[rows]
            if fast:
                opts = {"share_prefix": share_prefix, "compact": compact}
                if first_logits is not None:
                    opts["on_first_logits"] = lambda logits, rows=rows: first_logits(rows, logits)
                results.extend(_fast_batch(model, p, t, intervention, rows, max_new_tokens, raw, eos, opts))
            else:
                results.extend(_generate_batch(model, p, t, intervention, rows, config, raw, seed + start, eos))
        except Exception as exc:  # noqa: BLE001 - only OOM is handled, everything else re-raised
            if not _is_oom(exc) or size == 1:
                raise
            size //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start = rows.stop
    return results


def _generate_batch(
    model: Model,
    prompts: Sequence[str],
    texts: Sequence[str],
    intervention: Intervention | None,
    rows: slice,
    config,
    raw: bool,
    seed: int,
    eos: list[int],
) -> list[Generation]:
    batch = model.encode(texts, raw=raw)
    prompt_len = batch["input_ids"].shape[1]
    iv = intervention.select(rows) if intervention is not None else None
    devices = [model.device] if model.device.type == "cuda" else []
    with (
        torch.inference_mode(),
        torch.random.fork_rng(devices=devices),
        steer(model, iv, prompt_len=prompt_len, batch_rows=len(texts)),
    ):
        torch.manual_seed(seed)
        out = model.hf.generate(**batch, generation_config=config)
    new_tokens = out[:, prompt_len:].tolist()
    results = []
    for prompt, ids in zip(prompts, new_tokens):
        cut = next((i for i, t in enumerate(ids) if t in eos), None)
        kept = ids[:cut] if cut is not None else ids  # padding only ever follows an EOS
        response = model.tokenizer.decode(kept, skip_special_tokens=True).strip()
        results.append(Generation(prompt, response, tuple(kept), cut is not None))
    return results


def _fast_batch(
    model: Model,
    prompts: Sequence[str],
    texts: Sequence[str],
    intervention: Intervention | None,
    rows: slice,
    max_new_tokens: int,
    raw: bool,
    eos: list[int],
    opts: dict | None = None,
) -> list[Generation]:
    from .fastgen import greedy_batch

    ids = model.tokenizer(list(texts), add_special_tokens=raw)["input_ids"]
    iv = intervention.select(rows) if intervention is not None else None
    tokens, ended = greedy_batch(model, ids, iv, max_new_tokens, eos, **(opts or {}))
    return [
        Generation(prompt, model.tokenizer.decode(t, skip_special_tokens=True).strip(), tuple(t), e)
        for prompt, t, e in zip(prompts, tokens, ended)
    ]
