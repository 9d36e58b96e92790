"""Model loading, registry, chat formatting and the structural decoder-layer lookup."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, make_tiny
from crystallized_safety.errors import LayerError, ModelError
from crystallized_safety.models import decoder_layers, load_model, registry, resolve_device_dtype

EXPECTED_PATH = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gemma2": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_found_structurally(arch):
    model = make_tiny(arch)
    expected = model.hf.get_submodule(EXPECTED_PATH[arch])
    assert decoder_layers(model.hf) is expected
    assert model.n_layers == 4 and model.hidden_size == 64


def test_decoder_layers_override_and_bad_path(tiny_llama):
    assert decoder_layers(tiny_llama.hf, "model.layers") is tiny_llama.hf.model.layers
    with pytest.raises(ModelError, match="layers path 'model.blocks' not found"):
        decoder_layers(tiny_llama.hf, "model.blocks")
    with pytest.raises(ModelError, match="not a non-empty ModuleList"):
        decoder_layers(tiny_llama.hf, "model.norm")


def test_decoder_layers_error_when_nothing_matches():
    with pytest.raises(ModelError, match="--layers-path"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_registry_has_seed_models_and_quirks():
    reg = registry()
    for alias in (
        "smollm2-135m",
        "llama-3.1-8b",
        "llama-3.1-70b",
        "mistral-7b",
        "qwen2.5-7b",
        "gemma-2-9b",
        "phi-3-mini",
    ):
        assert alias in reg
    assert reg["gemma-2-9b"].system_role is False
    assert reg["gemma-2-9b"].source == "google/gemma-2-9b-it"
    assert reg["llama-3.1-8b"].system_role is True
    assert reg["smollm2-135m"].gguf_file.endswith(".gguf")


def test_unknown_model_is_one_line_error():
    with pytest.raises(ModelError, match="unknown model 'nope'") as info:
        load_model("nope")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelError, match="does not exist"):
        load_model("/tmp/definitely-missing.gguf")


def test_hub_id_offline_is_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot load 'someorg/some-model-that-is-not-cached'"):
        load_model("someorg/some-model-that-is-not-cached")


def test_load_from_local_directory(tmp_path):
    tiny = make_tiny("qwen2")
    tiny.hf.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.n_layers == 4 and loaded.model_hash.startswith("sha256:")
    ids = tiny.encode(tiny.format(["hello"]))
    with torch.inference_mode():
        torch.testing.assert_close(loaded.hf(**ids).logits, tiny.hf(**ids).logits)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))


def test_chat_formatting_and_missing_template():
    chat = make_tiny("llama")
    text = chat.format(["Hi"], system="Be safe.")[0]
    assert text == "<s><|system|>Be safe.<|end|><|user|>Hi<|end|><|assistant|>"
    chat.system_role = False  # Gemma-style: system merged into the user turn
    assert chat.format(["Hi"], system="Be safe.")[0] == "<s><|user|>Be safe.\n\nHi<|end|><|assistant|>"
    plain = make_tiny("llama", chat=False)
    with pytest.raises(ModelError, match="no chat template; pass --raw"):
        plain.format(["Hi"])
    assert plain.format(["Hi"], raw=True) == ["Hi"]


def test_layer_checks(tiny_llama):
    assert tiny_llama.parse_layers("all") == [0, 1, 2, 3]
    assert tiny_llama.parse_layers("3,1") == [3, 1]
    with pytest.raises(LayerError, match="layer 4 is out of range .* 4 layers \\(0..3\\)"):
        tiny_llama.parse_layers("1,4")
    with pytest.raises(LayerError, match="cannot parse layers"):
        tiny_llama.parse_layers("1,x")
    with pytest.raises(LayerError, match="repeat"):
        tiny_llama.parse_layers([1, 1])


def test_device_dtype_resolution():
    dev, dt = resolve_device_dtype("cpu", "auto")
    assert dev.type == "cpu" and dt is torch.float32
    assert resolve_device_dtype("cpu", "bf16")[1] is torch.bfloat16
    with pytest.raises(ModelError, match="unknown dtype"):
        resolve_device_dtype("cpu", "int3")
    if not torch.cuda.is_available():
        assert resolve_device_dtype("auto", "auto") == (torch.device("cpu"), torch.float32)
        with pytest.raises(ModelError, match="no GPU"):
            resolve_device_dtype("cuda", "auto")
