"""Runs in the steering-vectors side environment (see sides.py; transformers 4.57, as steering-vectors 0.12 pins):
transformers 4 loads a model directory this tool saved (AutoTokenizer, AutoModelForCausalLM), steering-vectors
extracts its vectors on the contrast pairs (`train_steering_vector`, mean of the paired differences at the last
token, every layer) and steers greedy generation at one layer with its own `SteeringVector.apply`, its vector scaled
to a given norm (signed).

Request: {"model": dir, "pairs": [[positive, negative]] (chat-formatted), "layer": L, "norm": signed norm,
"texts": [chat-formatted prompt], "max_new_tokens": n, "eos": [ids], "control": dir or null (a second directory
whose plain first-token logits and rope theta are read too)}.
Answer: {"transformers", "steering_vectors", "rope_theta", "tokenizer", "prompt_ids", "layers", "tokens_plain",
"tokens_steered", "control_rope_theta"}; arrays "vectors" [layers, d], "first_plain" [prompts, vocab] and
"first_control".
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import steering_vectors
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    stem = Path(sys.argv[2])
    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(request["model"])
    model = AutoModelForCausalLM.from_pretrained(request["model"], torch_dtype=torch.float32).eval()
    eos = request["eos"]
    keep = ("input_ids", "attention_mask")  # transformers 4's tokenizer adds token_type_ids, which generate refuses
    encoded = [{k: v for k, v in tokenizer(t, return_tensors="pt").items() if k in keep} for t in request["texts"]]

    def first_logits(m) -> np.ndarray:
        return np.stack([m(**ids).logits[0, -1].float().numpy() for ids in encoded])

    def greedy() -> list[list[int]]:
        out = []
        for ids in encoded:
            gen = model.generate(**ids, do_sample=False, max_new_tokens=request["max_new_tokens"],
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            new = gen[0, ids["input_ids"].shape[1] :].tolist()
            out.append(new[: next((i for i, t in enumerate(new) if t in eos), len(new))])
        return out

    pairs = [tuple(p) for p in request["pairs"]]
    vector = steering_vectors.train_steering_vector(model, tokenizer, pairs, read_token_index=-1)
    layers = sorted(vector.layer_activations)
    layer = request["layer"]
    one = steering_vectors.SteeringVector({layer: vector.layer_activations[layer]}, vector.layer_type)
    multiplier = request["norm"] / float(vector.layer_activations[layer].norm())
    tokens_plain, first_plain = greedy(), first_logits(model)
    with one.apply(model, multiplier=multiplier):
        tokens_steered = greedy()

    answer = {
        "transformers": transformers.__version__,
        "steering_vectors": version("steering-vectors"),
        "rope_theta": getattr(model.config, "rope_theta", None),
        "tokenizer": type(tokenizer).__name__,
        "prompt_ids": [ids["input_ids"][0].tolist() for ids in encoded],
        "layers": layers,
        "tokens_plain": tokens_plain,
        "tokens_steered": tokens_steered,
        "control_rope_theta": None,
    }
    arrays = {"vectors": np.stack([vector.layer_activations[k].float().numpy() for k in layers]),
              "first_plain": first_plain}  # fmt: skip
    if request.get("control"):
        control = AutoModelForCausalLM.from_pretrained(request["control"], torch_dtype=torch.float32).eval()
        answer["control_rope_theta"] = getattr(control.config, "rope_theta", None)
        arrays["first_control"] = first_logits(control)
    np.savez(stem.with_suffix(".npz"), **arrays)
    stem.with_suffix(".answer.json").write_text(json.dumps(answer))


if __name__ == "__main__":
    main()
