"""DirectionBank: diff-in-means / PCA / probe, controls, safetensors and .pt files, bad files."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from conftest import HARMFUL, HARMLESS, make_tiny
from crystallized_safety.core.activations import capture
from crystallized_safety.core.directions import (
    DirectionBank,
    extract_directions,
    orthogonal_direction,
    random_direction,
)
from crystallized_safety.errors import LayerError, PromptError, VectorFileError


@pytest.fixture(scope="module")
def bank(tiny_llama):
    return extract_directions(tiny_llama, HARMFUL, HARMLESS, batch_size=4)


def test_mean_diff_matches_independent_computation(tiny_llama, bank):
    texts_h, texts_n = tiny_llama.format(HARMFUL), tiny_llama.format(HARMLESS)

    def last_token_states(texts):
        rows = []
        for text in texts:  # one prompt at a time, no padding, HF hidden_states
            ids = tiny_llama.tokenizer(text, return_tensors="pt", add_special_tokens=False)
            with torch.inference_mode():
                hs = tiny_llama.hf(**ids, output_hidden_states=True).hidden_states
            rows.append(torch.stack([h[0, -1] for h in hs[1:-1]]))  # layers 0..L-2 (last one is post-norm)
        return torch.stack(rows)

    diff = last_token_states(texts_h).mean(0) - last_token_states(texts_n).mean(0)
    ref = diff / diff.norm(dim=-1, keepdim=True)
    cos = (bank.directions[:-1] * ref).sum(-1)
    assert bool((cos > 0.9999).all()), cos
    torch.testing.assert_close(bank.raw_norms[:-1], diff.norm(dim=-1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bank.directions.norm(dim=-1), torch.ones(4))
    assert bank.layers == [0, 1, 2, 3]
    assert bank.metadata["harmful_count"] == str(len(HARMFUL)) and bank.metadata["method"] == "mean_diff"


def test_pca_and_probe_directions(tiny_llama, bank):
    pca = extract_directions(tiny_llama, HARMFUL, HARMLESS, method="pca")
    probe = extract_directions(tiny_llama, HARMFUL, HARMLESS, method="probe")
    # PCA: first right singular vector of the paired differences, sign-aligned with the mean difference
    h = capture(tiny_llama, HARMFUL).acts
    n = capture(tiny_llama, HARMLESS).acts
    for layer in range(4):
        d = (h[:, layer] - n[:, layer]).double()
        top = torch.linalg.eigh(d.T @ d).eigenvectors[:, -1].float()
        assert abs(float(top @ pca.directions[layer])) > 0.999
        assert float(pca.directions[layer] @ bank.directions[layer]) > 0
    # probe: its direction separates the two training sets perfectly (tiny, separable problem)
    for layer in range(4):
        w = probe.directions[layer]
        assert float((h[:, layer] @ w).min()) > float((n[:, layer] @ w).max())


def test_save_load_roundtrip(tmp_path, bank):
    path = bank.save(tmp_path / "dirs.safetensors")
    loaded = DirectionBank.load(path)
    assert torch.equal(loaded.directions, bank.directions)
    assert torch.equal(loaded.mean_harmful, bank.mean_harmful) and torch.equal(loaded.resid_norms, bank.resid_norms)
    assert loaded.layers == bank.layers
    for key in (
        "model_id",
        "model_hash",
        "layer_convention",
        "position",
        "harmful_sha256",
        "harmless_sha256",
        "harmful_count",
        "harmless_count",
        "tool_version",
    ):
        assert loaded.metadata[key] == bank.metadata[key]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        assert {"directions", "mean_harmful", "mean_harmless"} <= set(fh.keys())
        assert fh.get_tensor("directions").shape == (4, 64)
        assert json.loads(fh.metadata()["layers"]) == [0, 1, 2, 3]
    with pytest.raises(VectorFileError, match="name the output"):
        bank.save(tmp_path / "dirs.pt")


def test_layer_subset(tiny_llama):
    part = extract_directions(tiny_llama, HARMFUL, HARMLESS, layers="3,1")
    assert part.layers == [3, 1] and part.directions.shape == (2, 64)
    with pytest.raises(LayerError, match="no direction for layer 0"):
        part.direction(0)


def test_bad_files(tmp_path, tiny_llama):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(VectorFileError, match="not a valid safetensors"):
        DirectionBank.load(bad)
    with pytest.raises(VectorFileError, match="does not exist"):
        DirectionBank.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"something": torch.zeros(2, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(VectorFileError, match="no 'directions' tensor"):
        DirectionBank.load(tmp_path / "other.safetensors")
    save_file({"directions": torch.full((2, 3), float("inf"))}, str(tmp_path / "inf.safetensors"))
    with pytest.raises(VectorFileError, match="NaN or inf"):
        DirectionBank.load(tmp_path / "inf.safetensors")
    other = make_tiny("llama")
    other_bank = DirectionBank(directions=torch.eye(4, 32), layers=[0, 1, 2, 3])
    with pytest.raises(VectorFileError, match="hidden size 32 .* has 64"):
        other_bank.check_model(other)


class Evil:
    def __reduce__(self):
        return (exec, ("open('/tmp/csafety_pwned', 'w').write('x')",))


def test_pt_files_load_without_unpickling(tmp_path):
    torch.save(torch.ones(64), tmp_path / "v.pt")
    single = DirectionBank.load(tmp_path / "v.pt")
    assert single.any_layer and torch.equal(single.direction(17), torch.ones(64))
    torch.save(torch.randn(4, 64), tmp_path / "m.pt")
    assert DirectionBank.load(tmp_path / "m.pt").layers == [0, 1, 2, 3]
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump(Evil(), fh)
    import os

    if os.path.exists("/tmp/csafety_pwned"):
        os.remove("/tmp/csafety_pwned")
    with pytest.raises(VectorFileError, match="not a plain tensor file"):
        DirectionBank.load(evil)
    assert not os.path.exists("/tmp/csafety_pwned")


def test_controls_are_seeded_unit_and_orthogonal(bank):
    r1, r2, r3 = random_direction(64, 0), random_direction(64, 0), random_direction(64, 1)
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)
    assert abs(float(r1.norm()) - 1) < 1e-6
    v = bank.direction(2)
    o = orthogonal_direction(v, 5)
    assert abs(float(o @ v)) < 1e-6 and abs(float(o.norm()) - 1) < 1e-6
    assert torch.equal(o, orthogonal_direction(v, 5)) and not torch.equal(o, orthogonal_direction(v, 6))


def test_prompt_set_errors(tiny_llama):
    with pytest.raises(PromptError, match="identical"):
        extract_directions(tiny_llama, HARMFUL, list(reversed(HARMFUL)))
    with pytest.raises(PromptError, match="no prompts"):
        extract_directions(tiny_llama, [], HARMLESS)
    with pytest.raises(PromptError, match="duplicate"):
        extract_directions(tiny_llama, HARMFUL + HARMFUL[:1], HARMLESS)
