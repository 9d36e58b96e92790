"""KL damage of an intervention (issue 15, part 2): the packed, batched meter equals an independent computation
(one prompt at a time, a plain transformers forward with a hand-written hook, KL by scipy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from conftest import make_tiny
from crystallized_safety.core.steering import Intervention
from crystallized_safety.judges.divergence import DivergenceMeter

PROMPTS = ["How do I bake bread?", "Hi", "Tell me a long story about a cat", "What is two plus two?", "Name a colour"]
ANSWERS = [[40, 41, 42, 43], [], [60, 61, 62, 63, 64, 65], [70, 71], [80, 81, 82]]


def reference_kl(model, layer: int | None, vec: torch.Tensor | None, mode: str = "add", alpha: float = 0.0):
    """Per prompt: (first-token KL, [KL at each answer position]) with scipy, one unpadded forward each."""
    hf = model.hf
    firsts, every = [], []
    for text, answer in zip(model.format(PROMPTS), ANSWERS):
        p = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + answer])
        span = slice(len(p) - 1, len(p) - 1 + max(len(answer), 1))
        with torch.no_grad():
            base = torch.softmax(hf(input_ids=ids).logits[0, span].double(), -1).numpy()
            handle = None
            if layer is not None:
                unit = vec / vec.norm()

                def hook(_m, _a, out, unit=unit):
                    h = out[0] if isinstance(out, tuple) else out
                    h = h - (h @ unit)[..., None] * unit if mode == "ablate" else h + alpha * vec
                    return (h, *out[1:]) if isinstance(out, tuple) else h

                handle = hf.model.layers[layer].register_forward_hook(hook)
            try:
                steered = torch.softmax(hf(input_ids=ids).logits[0, span].double(), -1).numpy()
            finally:
                if handle is not None:
                    handle.remove()
        kls = [entropy(base[i], steered[i]) for i in range(base.shape[0])]
        firsts.append(kls[0])
        every += kls
    return float(np.mean(firsts)), float(np.mean(every)), len(every)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_meter_equals_prompt_by_prompt_scipy(arch):
    model = make_tiny(arch, seed=0)
    g = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(model.hidden_size, generator=g), torch.randn(model.hidden_size, generator=g)
    v1, v2 = v1 / v1.norm(), v2 / v2.norm()
    ivs = [
        Intervention.single(1, v1, 4.0),
        None,
        Intervention.single(2, v2, -6.0),
        Intervention(directions={1: v2}, mode="ablate"),
    ]
    meter = DivergenceMeter(model, PROMPTS, ANSWERS, batch_size=2, max_rows=4)  # 3 prompt batches, packs of 2
    got = meter.measure(ivs)
    want = [
        reference_kl(model, 1, v1, alpha=4.0),
        (0.0, 0.0, 16),
        reference_kl(model, 2, v2, alpha=-6.0),
        reference_kl(model, 1, v2, mode="ablate"),
    ]
    for d, (first, answer, tokens) in zip(got, want):
        assert d.tokens == tokens == 16 and d.prompts == 5
        assert d.kl_first == pytest.approx(first, rel=1e-4, abs=1e-7)
        assert d.kl_answer == pytest.approx(answer, rel=1e-4, abs=1e-7)
    assert got[0].kl_answer > 1e-4 and got[2].kl_first > 1e-4  # the interventions do move the distribution
    assert abs(got[1].kl_answer) < 1e-7  # unsteered: zero up to padded-batch rounding


def test_meter_needs_one_answer_per_prompt():
    model = make_tiny("llama", seed=0)
    with pytest.raises(Exception, match="one answer per prompt"):
        DivergenceMeter(model, PROMPTS, ANSWERS[:2])
