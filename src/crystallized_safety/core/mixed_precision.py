"""Mixed precision: attention and MLP in bf16, everything a conclusion depends on in fp32.

A model loaded in bf16 keeps its residual stream in bf16 too: 8 significant bits, so at a norm of ~25,600 (the
attention-sink token of SmolLM2's middle layers) one step is 128, and at the ~100-460 of ordinary tokens one
step is 0.5-2: each block's update and each steering vector is rounded into that grid, layer after layer.
Here each block's attention and MLP modules (their weights, matmuls, KV cache and softmax) run in bf16, their
inputs cast down on entry and their outputs cast back up on exit, while the embeddings, the residual stream, the
norms between sublayers, the LM head's input and every steering hook stay in fp32 (the LM head itself computes
in bf16 and returns fp32 logits). On hardware with native bf16 (AMX, AVX512-BF16, tensor cores) the matmuls,
the weight traffic and the KV cache are what cost; the rest is cheap in fp32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from .model import Model

LOW = torch.bfloat16


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors (also inside tuples and lists, e.g. rotary (cos, sin)) to `dtype`; the rest as is."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _down(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return _cast(args, LOW), {k: _cast(v, LOW) for k, v in kwargs.items()}


def _up(_module: nn.Module, _args: tuple, output: Any) -> Any:
    return _cast(output, torch.float32)


def mix_precision(model: Model, head: bool = True) -> int:
    """Convert `model` (loaded in fp32) in place: each block's attention and MLP, and the LM head when `head`,
    compute in bf16 and hand fp32 back. A head tied to the input embedding is untied first (the embedding stays
    fp32). Returns the number of modules converted."""
    if model.dtype != torch.float32:
        raise ModelError(f"mixed precision starts from a float32 model, got {model.dtype}: load it with dtype float32")
    modules = model.sublayers()
    out = model.hf.get_output_embeddings()
    if head and isinstance(out, nn.Linear):
        inp = model.hf.get_input_embeddings()
        if inp is not None and out.weight is inp.weight:
            out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=False)
            model.hf.config.tie_word_embeddings = False
        modules.append(out)
    for module in modules:
        for param in module.parameters():
            param.data = param.data.to(LOW)
        module.register_forward_pre_hook(_down, with_kwargs=True)
        module.register_forward_hook(_up)
    model.precision = "mixed"
    return len(modules)
