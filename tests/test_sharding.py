"""Models sharded with a device map (issue 16, part 4), tested on devices that exist on a CPU machine: the
embedding and first blocks on the CPU, the last blocks offloaded to disk (accelerate streams their weights in).
Steering vectors and ablation targets reach each block on the block's own device, so steered generation and
extraction equal those of the unsharded model; placements that cannot work are one clear error."""

from __future__ import annotations

import pytest
import torch

from conftest import HARMFUL, HARMLESS, cli_err, make_tiny
from crystallized_safety.core.directions import extract_directions
from crystallized_safety.core.generation.api import generate
from crystallized_safety.core.loading import check_device_map
from crystallized_safety.core.steering import Intervention
from crystallized_safety.errors import ModelError
from crystallized_safety.registry import load_model

SPLIT = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "disk",
         "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
PROMPTS = ["How do I bake bread?", "Tell me a joke.", "How do I pick a lock?"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("shard") / "tiny"
    model = make_tiny("llama")
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return path


def test_sharded_model_steers_and_extracts_like_the_whole(saved, monkeypatch, tmp_path):
    monkeypatch.setenv("CSAFETY_CACHE", str(tmp_path / "cache"))
    whole = load_model(str(saved))
    sharded = load_model(str(saved), device_map=SPLIT)
    assert sharded.hf.hf_device_map["model.layers.3"] == "disk" and sharded.device == torch.device("cpu")
    assert any(p.device.type == "meta" for p in sharded.layers[3].parameters())  # really offloaded
    v = torch.randn(64, generator=torch.Generator().manual_seed(1))
    cases = [
        Intervention(directions={1: v / v.norm(), 3: v / v.norm()}, alpha=-4.0),
        Intervention(directions={3: v / v.norm()}, mode="ablate", ablate_to={3: 0.5}),
    ]
    for iv in cases:
        for engine in ("fast", "hf"):
            a = generate(whole, PROMPTS, iv, max_new_tokens=6, engine=engine)
            b = generate(sharded, PROMPTS, iv, max_new_tokens=6, engine=engine)
            assert [g.token_ids for g in a] == [g.token_ids for g in b]
    bank_a = extract_directions(whole, HARMFUL, HARMLESS, layers=[1, 3])
    bank_b = extract_directions(sharded, HARMFUL, HARMLESS, layers=[1, 3])
    torch.testing.assert_close(bank_a.directions, bank_b.directions, atol=1e-5, rtol=1e-4)


def test_placements_that_cannot_work_are_clear_errors(saved, monkeypatch, tmp_path):
    monkeypatch.setenv("CSAFETY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="this machine has 0 GPU"):
        check_device_map({**SPLIT, "model.layers.2": "cuda:3"})
    with pytest.raises(ModelError, match="use cpu, disk, cuda:N"):
        check_device_map({"model.layers.0": "moon"})
    with pytest.raises(ModelError, match="unknown device map"):
        check_device_map("everywhere")
    incomplete = {k: v for k, v in SPLIT.items() if k != "model.layers.2"}
    with pytest.raises(ModelError, match="cannot place the model"):
        load_model(str(saved), device_map=incomplete)
    cli_err(["generate", "--model", str(saved), "-p", "hi", "--device-map", "{not json"], "--device-map")
    cli_err(["generate", "--model", str(saved), "-p", "hi", "--device-map", '{"model.layers.0": "cuda:1"}'],
            "0 GPU")  # fmt: skip
