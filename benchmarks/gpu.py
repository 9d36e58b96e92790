"""GPU benchmark: the sweep engine vs one batched `model.generate` per cell vs the seed's naive loop, on a
random-weight model built from a real config (no download), in one process.

    python benchmarks/gpu.py                          # Llama-3.1-8B shape, bf16 on cuda; 6 layers x 5 alphas
    python benchmarks/gpu.py --config tiny --quick    # a few-MB model on CPU: the CI smoke run

The grid is `benchmarks/sweep.py`'s (layers x alphas x prompts x new tokens, a baseline included), through the
same code paths (`engine_sweep`, `naive_sweep`). The naive loop is timed on `--naive-cells` cells and reported
per cell (it is the slow baseline; running it over the whole grid would take most of a GPU session). Weights
are random, so verdicts mean nothing here: only tokens/s, speedups, memory and engine-vs-generate agreement.
The last line is machine-readable:
engine_tok_s=... generate_tok_s=... naive_tok_s=... speedup_vs_generate=... speedup_vs_naive=... peak_mem_gb=...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from sweep import engine_sweep, naive_sweep  # noqa: E402

from crystallized_safety.core.directions import DirectionBank, random_direction  # noqa: E402
from crystallized_safety.core.model import Model  # noqa: E402
from crystallized_safety.prompts import bundled  # noqa: E402

CONFIGS = {
    # Llama-3.1-8B-Instruct's published shape (config.json), weights random
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
}  # fmt: skip
CHAT = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tokenizer(vocab_size: int):
    """A byte-level tokenizer built in memory, padded with inert tokens to the model's vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    names = specials + alphabet
    names += [f"<x{i}>" for i in range(vocab_size - len(names))]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(names)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": specials[3:]})
    fast.chat_template = CHAT
    return fast


def build(config: str, device: str, dtype: torch.dtype) -> Model:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **CONFIGS[config])
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    hf.eval()
    return Model(hf, tokenizer(cfg.vocab_size), f"random-{config}", model_hash="random-init")


def random_bank(model: Model, layers: list[int], prompts: list[str]) -> DirectionBank:
    """Random unit directions; residual norms measured on the prompts (relative alphas then mean what they do)."""
    batch = model.encode(model.format(prompts[:8]))
    with torch.inference_mode():
        states = model.hf(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    norms = torch.tensor([float(states[i + 1][mask].float().norm(dim=-1).mean()) for i in layers])
    directions = torch.stack([random_direction(model.hidden_size, 100 + i) for i in layers])
    return DirectionBank(directions=directions, layers=layers, resid_norms=norms)


def peak_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def timed(device: str, fn):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="llama-3.1-8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--alphas", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=35)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--pack-rows", type=int, default=256)
    ap.add_argument("--naive-cells", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 layers x 2 alphas x 8 prompts x 8 tokens")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.alphas, args.prompts, args.tokens, args.naive_cells = 2, 2, 8, 8, 1
    dtype = {"auto": torch.bfloat16 if args.device.startswith("cuda") else torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]  # fmt: skip
    model, build_s = timed(args.device, lambda: build(args.config, args.device, dtype))
    n = model.n_layers
    layers = sorted({round(n * (i + 1) / (args.layers + 1)) for i in range(args.layers)})
    alphas = [-0.1 * (i + 1) for i in range(args.alphas)]
    cells = [(None, 0.0)] + [(layer, alpha) for layer in layers for alpha in alphas]
    prompts = list(bundled("harmful", "eval"))[: args.prompts]
    bank = random_bank(model, layers, prompts)
    print(f"model {model.model_id}: {sum(p.numel() for p in model.hf.parameters()) / 1e9:.2f} B params, "
          f"{dtype}, {args.device}, built in {build_s:.1f} s; grid {len(cells)} cells x {len(prompts)} prompts x "
          f"{args.tokens} tokens", flush=True)  # fmt: skip
    engine_sweep(model, prompts[:2], cells[:2], bank, 2, args.pack_rows)  # warm-up (kernels, allocator)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    (engine, tokens), engine_s = timed(args.device, lambda: engine_sweep(model, prompts, cells, bank, args.tokens,
                                                                          args.pack_rows))  # fmt: skip
    engine_peak = peak_gb(args.device)
    print(f"engine: {engine_s:.1f} s, {tokens / engine_s:.0f} tok/s, peak {engine_peak:.2f} GB", flush=True)
    (batched, tokens_b), generate_s = timed(args.device, lambda: engine_sweep(model, prompts, cells, bank,
                                                                              args.tokens, 0, "batched"))  # fmt: skip
    print(f"batched generate: {generate_s:.1f} s, {tokens_b / generate_s:.0f} tok/s", flush=True)
    sub = cells[1 : 1 + args.naive_cells]
    naive, naive_sub_s = timed(args.device, lambda: naive_sweep(model, prompts, sub, bank, args.tokens))
    naive_s = naive_sub_s / len(sub) * len(cells)  # per cell, over the whole grid
    naive_tokens = sum(len(model.tokenizer(t)["input_ids"]) for r in naive.values() for t in r) or 1
    print(f"naive loop: {naive_sub_s:.1f} s for {len(sub)} cells -> {naive_s:.0f} s for the grid", flush=True)
    same = sum(engine[c] == batched[c] for c in cells) / len(cells)
    result = {
        "engine_tok_s": tokens / engine_s,
        "generate_tok_s": tokens_b / generate_s,
        "naive_tok_s": naive_tokens / naive_sub_s,
        "speedup_vs_generate": generate_s / engine_s,
        "speedup_vs_naive": naive_s / engine_s,
        "peak_mem_gb": engine_peak,
        "cells_identical": same,
    }
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    print(json.dumps({"device": device_name, "torch": torch.__version__, "config": args.config, **vars(args)}))
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
