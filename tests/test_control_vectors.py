"""Control vectors in llama.cpp / repeng's GGUF layout (issue 15, part 5): the file is what llama.cpp reads
(checked with the `gguf` reader: architecture, keys, tensor names, f32, layer numbering), a round trip keeps
the directions and the steering, and foreign files without residual norms refuse relative alphas clearly.

llama.cpp itself is not run here: `llama-cpp-python` ships no binary wheel on the package index for this
platform (only a source build with a C++ toolchain), so a CI machine cannot install it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import HARMFUL, HARMLESS, cli_err, cli_ok, make_tiny
from crystallized_safety.core.control_vectors import export_gguf, import_gguf
from crystallized_safety.core.directions import extract_directions
from crystallized_safety.core.generation.api import generate
from crystallized_safety.core.steering import Intervention
from crystallized_safety.errors import VectorFileError


@pytest.fixture(scope="module")
def bank_and_model():
    model = make_tiny("llama")
    return extract_directions(model, HARMFUL, HARMLESS, layers=[1, 2, 3]), model


def test_layout_is_what_llama_cpp_reads(bank_and_model, tmp_path):
    from gguf import GGUFReader

    bank, _model = bank_and_model
    path = export_gguf(bank, tmp_path / "cv.gguf", [2, 3], -0.5, "relative", "llama")
    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    count = reader.fields["controlvector.layer_count"]
    assert int(count.parts[count.data[0]][0]) == 2
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert set(tensors) == {"direction.2", "direction.3"}
    for layer in (2, 3):
        want = (bank.direction(layer).double() * -0.5 * bank.resid_norm(layer)).numpy()
        assert tensors[f"direction.{layer}"].dtype == np.float32
        np.testing.assert_allclose(tensors[f"direction.{layer}"], want, rtol=1e-6, atol=1e-6)
    provenance = json.loads(bytes(reader.fields["csafety.provenance"].parts[-1]).decode())
    assert provenance["alpha_unit"] == "relative" and "block N" in provenance["convention"]


def test_round_trip_keeps_directions_and_steering(bank_and_model, tmp_path):
    bank, model = bank_and_model
    path = export_gguf(bank, tmp_path / "cv.gguf", [1, 3], 2.5)
    back = import_gguf(path)
    assert back.layers == [1, 3] and back.resid_norms is None
    for layer in (1, 3):
        torch.testing.assert_close(back.direction(layer), bank.direction(layer), atol=1e-6, rtol=1e-6)
    norms = json.loads(back.metadata["gguf_norms"])
    assert norms == pytest.approx({"1": 2.5, "3": 2.5}, rel=1e-6)
    # steering with the imported vectors at their stored norm = steering with the original at alpha 2.5
    prompts = ["Tell me about bread.", "How do I pick a lock?"]
    original = Intervention(directions={1: bank.direction(1), 3: bank.direction(3)}, alpha=2.5)
    imported = Intervention(directions={k: back.direction(k) * norms[str(k)] for k in (1, 3)}, alpha=1.0)
    a = generate(model, prompts, original, max_new_tokens=6)
    b = generate(model, prompts, imported, max_new_tokens=6)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    with pytest.raises(VectorFileError, match="imported from other tools lack them"):
        back.resid_norm(1)


def test_bad_exports_and_imports(bank_and_model, tmp_path):
    bank, _ = bank_and_model
    with pytest.raises(VectorFileError, match="cannot steer layer 0"):
        export_gguf(bank, tmp_path / "x.gguf", [0, 1], 1.0)
    with pytest.raises(VectorFileError, match="GGUF files"):
        export_gguf(bank, tmp_path / "x.bin", [1], 1.0)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF junk")
    with pytest.raises(VectorFileError, match="not a readable GGUF"):
        import_gguf(tmp_path / "junk.gguf")


def test_cli_export_import_and_relative_alpha_error(bank_and_model, tmp_path):
    bank, model = bank_and_model
    bank.save(tmp_path / "d.safetensors")
    model.hf.save_pretrained(tmp_path / "tiny")
    model.tokenizer.save_pretrained(tmp_path / "tiny")
    cli_ok(["vectors", "export", "--directions", str(tmp_path / "d.safetensors"), "-l", "2", "--alpha", "-0.3",
            "--alpha-unit", "relative", "--out", str(tmp_path / "cv.gguf")])  # fmt: skip
    cli_ok(["vectors", "import", "--in", str(tmp_path / "cv.gguf"), "--out", str(tmp_path / "back.safetensors")])
    cli_err(["generate", "--model", str(tmp_path / "tiny"), "-p", "hi", "--directions",
             str(tmp_path / "back.safetensors"), "-l", "2", "--alpha", "-0.3", "--alpha-unit", "relative"],
            "no residual norms")  # fmt: skip
    cli_ok(["generate", "--model", str(tmp_path / "tiny"), "-p", "hi", "--max-new-tokens", "2", "--directions",
            str(tmp_path / "back.safetensors"), "-l", "2", "--alpha", "-3"])  # fmt: skip
    cli_err(["vectors", "export", "--directions", str(tmp_path / "d.safetensors"), "-l", "2", "--alpha", "nan",
             "--out", str(tmp_path / "n.gguf")], "finite")  # fmt: skip


def test_repeng_reads_our_file(bank_and_model, tmp_path):
    """Where repeng is installed, its own importer reads our export with the same layers and vectors."""
    repeng = pytest.importorskip(
        "repeng", reason="repeng is not in .venv (it pins numpy < 2): `make interop` checks it in its own environment"
    )
    bank, _ = bank_and_model
    path = export_gguf(bank, tmp_path / "cv.gguf", [1, 2], 1.0)
    vector = repeng.ControlVector.import_gguf(str(path))
    assert sorted(vector.directions) == [1, 2]
    np.testing.assert_allclose(vector.directions[2], bank.direction(2).numpy(), atol=1e-6)
