"""Model loading, registry, chat formatting and the structural decoder-layer lookup."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import ARCHS, make_tiny
from crystallized_safety.core.loading import resolve_device_dtype
from crystallized_safety.core.model import decoder_layers
from crystallized_safety.errors import LayerError, ModelError
from crystallized_safety.registry import load_model, registry

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
    with pytest.raises(ModelError, match="'someorg/some-model-that-is-not-cached' is not in the local Hugging Face"):
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


# --------------------------------------------------------------------------- saved configs both majors read


def _tiny_llama_rope(theta: float):
    import transformers as tf

    from conftest import byte_tokenizer, tiny_config

    config = tiny_config("llama", 263)
    config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval(), byte_tokenizer()


def test_saved_config_carries_transformers4_rope_keys_and_reloads_identically(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from crystallized_safety.core.loading import save_pretrained

    hf, tok = _tiny_llama_rope(100000.0)
    save_pretrained(hf, tok, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert "rope_scaling" not in cfg  # default rope: transformers 4 needs no scaling block
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.rope_parameters["rope_theta"] == 100000.0
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 12, 40, 41, 99, 100, 150]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=0, rtol=0)


def test_portable_config_scaled_and_per_layer_type_rope(tmp_path):
    import json

    from crystallized_safety.core.loading import portable_config

    scaled = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}}
    (tmp_path / "config.json").write_text(json.dumps(scaled))
    portable_config(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    gemma3 = {
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
    }
    (tmp_path / "config.json").write_text(json.dumps(gemma3))
    portable_config(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["rope_theta"], cfg["rope_local_base_freq"]) == (1000000.0, 10000.0)
    before = (tmp_path / "config.json").read_text()
    portable_config(tmp_path)  # idempotent
    assert (tmp_path / "config.json").read_text() == before


def test_portable_tokenizer_config_names_a_class_both_transformers_read(tiny_llama, tmp_path):
    """transformers 5 saves `TokenizersBackend`, which transformers 4 cannot load: the saved directory names
    `PreTrainedTokenizerFast` instead, and transformers 5 loads it back to the same tokens and chat text."""
    import json

    from transformers import AutoTokenizer

    from crystallized_safety.core.loading import portable_tokenizer_config

    tiny_llama.tokenizer.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "TokenizersBackend"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    portable_tokenizer_config(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    before = (tmp_path / "tokenizer_config.json").read_text()
    portable_tokenizer_config(tmp_path)  # idempotent
    assert (tmp_path / "tokenizer_config.json").read_text() == before
    back = AutoTokenizer.from_pretrained(tmp_path)
    text = "How do I pick a lock?"
    assert back(text)["input_ids"] == tiny_llama.tokenizer(text)["input_ids"]
    chat = [{"role": "user", "content": text}]
    kw = {"tokenize": False, "add_generation_prompt": True}
    assert back.apply_chat_template(chat, **kw) == tiny_llama.tokenizer.apply_chat_template(chat, **kw)
    portable_tokenizer_config(tmp_path / "missing")  # no tokenizer_config.json: left alone


TF4_ENV = Path(__file__).resolve().parents[1] / ".venvs" / "transformers-4.57"  # made by `make side-envs`


@pytest.mark.slow
@pytest.mark.skipif(not (TF4_ENV / ".installed").is_file(),
                    reason=f"no transformers 4.57 side environment at {TF4_ENV}: run `make side-envs`")  # fmt: skip
def test_transformers4_reads_a_saved_model_with_the_same_logits(tmp_path):
    """An older reader (transformers 4.57, what steering-vectors 0.12 pins) loads what we save and computes
    the same logits: before the fix it silently used rope_theta 10,000. The reader lives in a side environment
    prepared by `make side-envs` (a test installs nothing)."""
    import subprocess
    import sys

    from crystallized_safety.core.loading import save_pretrained

    hf, tok = _tiny_llama_rope(100000.0)
    save_pretrained(hf, tok, tmp_path / "model")
    ids = [[1, 5, 9, 33, 70, 2, 12, 40, 41, 99, 100, 150, 151, 152, 7, 8]]
    code = (
        "import json, sys, torch, transformers as tf\n"
        f"m = tf.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}).eval()\n"
        f"with torch.no_grad(): out = m(torch.tensor({ids})).logits\n"
        "print(json.dumps([tf.__version__, m.config.rope_theta, out.tolist()]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(TF4_ENV)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    version, theta, logits = json.loads(res.stdout.strip().splitlines()[-1])
    assert version.startswith("4.57") and theta == 100000.0
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(logits), hf(torch.tensor(ids)).logits, atol=1e-5, rtol=1e-5)
