"""Mixed precision (issue 16, part 1): bf16 matmuls with the residual stream, norms and steering in fp32. Checked
sublayer by sublayer against a plain bf16 copy of the same model (each attention and MLP block, fed the mixed
model's inputs cast to bf16, must return the mixed model's output bit for bit), end to end against the model's
own fp32 and bf16 forms (mixed is closer to fp32), and through `open_model(dtype="mixed")`."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from crystallized_safety.core.generation import generate
from crystallized_safety.core.loading import open_model
from crystallized_safety.core.mixed_precision import mix_precision
from crystallized_safety.core.steering import Intervention, steer
from crystallized_safety.errors import ModelError


def hidden_dtypes(model, ids) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()

    def fn(h):
        seen.add(h.dtype)

    from crystallized_safety.core.steering import layer_hooks

    with layer_hooks(model, dict.fromkeys(range(model.n_layers), fn)), torch.no_grad():
        model.hf(input_ids=ids)
    return seen


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_each_sublayer_computes_exactly_what_a_bf16_model_computes(arch):
    """Inside attention and MLP the mixed model is a bf16 model: a plain bf16 copy's sublayer, fed the same inputs
    cast to bf16, returns the same output bit for bit; between sublayers everything stays fp32."""
    model, copy16 = make_tiny(arch, seed=0), make_tiny(arch, seed=0)
    assert mix_precision(model) == 2 * model.n_layers + 1  # attention + MLP per block, and the head
    copy16.hf.to(torch.bfloat16)
    seen: dict[int, tuple] = {}
    mixed_subs, plain_subs = model.sublayers(), copy16.sublayers()

    def record(k):
        def hook(_m, args, kwargs, output):
            seen[k] = (args, kwargs, output)

        return hook

    handles = [m.register_forward_hook(record(k), with_kwargs=True) for k, m in enumerate(mixed_subs)]
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 2, 3]])
    with torch.no_grad():
        logits = model.hf(input_ids=ids, use_cache=False).logits  # no cache: each sublayer can be called again
    for h in handles:
        h.remove()
    assert logits.dtype == torch.float32 and hidden_dtypes(model, ids) == {torch.float32}
    assert model.hf.get_input_embeddings().weight.dtype == torch.float32
    for k, (args, kwargs, output) in seen.items():
        first = output[0] if isinstance(output, tuple) else output
        assert first.dtype == torch.float32  # handed back to the residual stream in fp32
        cast = [a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        kw = {
            key: tuple(t.to(torch.bfloat16) for t in v) if isinstance(v, tuple) else
            (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v)
            for key, v in kwargs.items()
        }  # fmt: skip
        with torch.no_grad():
            want = plain_subs[k](*cast, **kw)
        want = want[0] if isinstance(want, tuple) else want
        assert want.dtype == torch.bfloat16
        assert torch.equal(first, want.float()), (k, (first - want.float()).abs().max())


def test_mixed_is_closer_to_fp32_than_bf16_and_steers_in_fp32():
    fp32, mixed = make_tiny("llama", seed=0), make_tiny("llama", seed=0)
    mix_precision(mixed)
    bf16 = make_tiny("llama", seed=0)
    bf16.hf.to(torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 2, 3, 40, 41, 42]])
    v = torch.randn(fp32.hidden_size, generator=torch.Generator().manual_seed(0))
    iv = Intervention.single(1, v / v.norm(), 3.0)
    out = {}
    for name, m in (("fp32", fp32), ("mixed", mixed), ("bf16", bf16)):
        with steer(m, iv), torch.no_grad():
            out[name] = m.hf(input_ids=ids).logits.float()
    err_mixed = (out["mixed"] - out["fp32"]).abs().max()
    err_bf16 = (out["bf16"] - out["fp32"]).abs().max()
    assert err_mixed < err_bf16, (err_mixed, err_bf16)
    assert hidden_dtypes(mixed, ids) == {torch.float32}


def test_tied_head_is_untied_and_the_embedding_stays_fp32():
    model = make_tiny("llama", seed=0)
    model.hf.get_output_embeddings().weight = model.hf.get_input_embeddings().weight  # tie them
    mix_precision(model)
    assert model.hf.get_output_embeddings().weight.dtype == torch.bfloat16
    assert model.hf.get_input_embeddings().weight.dtype == torch.float32


def test_open_model_with_dtype_mixed_generates_like_by_hand(tiny_model_dirs):
    path = tiny_model_dirs[1]["tiny"]
    model = open_model(path, dtype="mixed")
    assert model.precision == "mixed" and model.dtype == torch.float32
    by_hand = open_model(path, dtype="float32")
    mix_precision(by_hand)
    prompts = ["How do I bake bread?", "Hi there"]
    a = [g.token_ids for g in generate(model, prompts, max_new_tokens=6)]
    b = [g.token_ids for g in generate(by_hand, prompts, max_new_tokens=6)]
    assert a == b and all(len(t) for t in a)


def test_mixed_needs_a_float32_model():
    model = make_tiny("llama", seed=0)
    model.hf.to(torch.bfloat16)
    with pytest.raises(ModelError, match="starts from a float32 model"):
        mix_precision(model)
