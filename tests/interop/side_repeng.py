"""Runs in the repeng side environment (see sides.py; numpy < 2, as repeng 0.4.0 pins): repeng trains a control
vector on the model, exports it with its own `export_gguf`, steers greedy generation with it through its own
`ControlModel`, then loads a file this tool exported with its own `import_gguf` and steers with that.

Request: {"model": dir, "pairs": [[positive, negative]] (chat-formatted), "layers": [ids], "coeff": c,
"texts": [chat-formatted prompt], "max_new_tokens": n, "eos": [ids], "export": path, "ours": path}.
Answer: {"numpy", "repeng_layers", "tokens_repeng", "ours_layers", "ours_hint", "tokens_ours"}; arrays "repeng" and
"ours" [layers, d]: the vectors as repeng holds them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import repeng
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    stem = Path(sys.argv[2])
    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(request["model"])
    model = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.float32).eval()
    eos = request["eos"]

    def greedy(control_model: repeng.ControlModel) -> list[list[int]]:
        out = []
        for text in request["texts"]:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            gen = control_model.generate(**ids, do_sample=False, max_new_tokens=request["max_new_tokens"],
                                         eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            new = gen[0, ids["input_ids"].shape[1] :].tolist()
            out.append(new[: next((i for i, t in enumerate(new) if t in eos), len(new))])
        return out

    layers = request["layers"]
    control = repeng.ControlModel(model, layers)
    dataset = [repeng.DatasetEntry(positive=p, negative=n) for p, n in request["pairs"]]
    vector = repeng.ControlVector.train(control, tokenizer, dataset, hidden_layers=layers)
    vector.export_gguf(request["export"])
    control.set_control(vector, request["coeff"])
    tokens_repeng = greedy(control)
    control.reset()

    ours = repeng.ControlVector.import_gguf(request["ours"])
    ours_layers = sorted(ours.directions)
    control = repeng.ControlModel(control.unwrap(), ours_layers)
    control.set_control(ours, 1.0)  # the file holds alpha x direction: added as is
    tokens_ours = greedy(control)

    answer = {
        "numpy": np.__version__,
        "repeng_layers": sorted(vector.directions),
        "tokens_repeng": tokens_repeng,
        "ours_layers": ours_layers,
        "ours_hint": ours.model_type,
        "tokens_ours": tokens_ours,
    }
    np.savez(
        stem.with_suffix(".npz"),
        repeng=np.stack([vector.directions[k] for k in sorted(vector.directions)]),
        ours=np.stack([np.asarray(ours.directions[k]) for k in ours_layers]),
    )
    stem.with_suffix(".answer.json").write_text(json.dumps(answer))


if __name__ == "__main__":
    main()
