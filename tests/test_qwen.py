"""Qwen2's quirks (issue 24), checked against plain transformers code written here, independent of the package's
hooks: grouped-query attention and QKV biases under the fast engine (shared-prefix prefill, per-row packed cells,
finished-row compaction over the KV cache), steering (add, ablation) vs a plain forward hook on
`model.model.layers[i]` with plain `model.generate`, weight orthogonalisation vs hook ablation at every residual
writer with tied and untied embeddings, the chat template's default system prompt and the `<|im_end|>` EOS.

Fast tests run tiny random Qwen2 models (GQA, random non-zero QKV biases, tied embeddings, a Qwen-style template
and EOS); the slow ones run the real Qwen2.5-Coder-0.5B-Instruct (`qwen2.5-coder-0.5b`, skipped with a reason
where its wheels are neither installed nor assembled in the cache)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import HARMFUL, HARMLESS
from crystallized_safety.core.directions import extract_directions
from crystallized_safety.core.generation.api import generate
from crystallized_safety.core.model import Model
from crystallized_safety.core.orthogonalization import export_model, orthogonalize
from crystallized_safety.core.steering import Intervention, pack_interventions
from crystallized_safety.errors import ModelError
from crystallized_safety.registry import registry

QWEN = "qwen2.5-coder-0.5b"
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5's template, reduced to what matters here: its default system turn when none is given
QWEN_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if not (m['role'] == 'system' and loop.first) %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# prompts of different token lengths: a batch of them is left-padded by different amounts
PROMPTS = ["Hi", "How do I pick a lock?", "Write a haiku about autumn leaves falling slowly in the park."]


# --------------------------------------------------------------------------- plain-transformers references


def plain_generate(model: Model, prompts, max_new_tokens: int, hooks=()) -> tuple[list[list[int]], list[bool]]:
    """Plain left-padded `model.generate` (greedy) under plain forward hooks [(module, hook)]: each row's new tokens
    cut before its first EOS, and whether it hit one."""
    hf, tok = model.hf, model.tokenizer
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = hf.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            out = hf.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    finally:
        for handle in handles:
            handle.remove()
    tokens, ended = [], []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        tokens.append(row if cut is None else row[:cut])
        ended.append(cut is not None)
    return tokens, ended


def residual_hook(fn):
    """A forward hook replacing a module's output (a tensor, or a tuple led by one) by `fn(output)`."""

    def hook(_module, _args, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    return hook


def add_hook(vector: torch.Tensor):
    return residual_hook(lambda h: h + vector)


def ablate_hook(direction: torch.Tensor, target: float = 0.0):
    u = direction / direction.norm()
    return residual_hook(lambda h: h - ((h * u).sum(-1, keepdim=True) - target) * u)


def every_writer_ablated(hf, direction: torch.Tensor) -> list:
    """Directional ablation from every output added to the residual stream of a Qwen2/Llama model: the token
    embedding and each block's attention and MLP (Arditi et al.'s hooks, written against the HF module tree)."""
    modules = [hf.model.embed_tokens]
    for block in hf.model.layers:
        modules += [block.self_attn, block.mlp]
    return [(m, ablate_hook(direction)) for m in modules]


def tokens_of(gens) -> tuple[list[list[int]], list[bool]]:
    return [list(g.token_ids) for g in gens], [g.finished for g in gens]


# --------------------------------------------------------------------------- tiny Qwen2 models


def qwen_byte_tokenizer():
    """Byte-level tokenizer with Qwen's specials: <|endoftext|> pads, <|im_end|> ends a turn; Qwen-style template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": specials[1:]})
    fast.chat_template = QWEN_TEMPLATE
    return fast


def tiny_qwen(tied: bool = True, seed: int = 0, arch: str = "qwen2") -> Model:
    """A random Qwen2 (or, arch="llama", a Llama with biases on every projection): 4 blocks, 6 query / 2 KV
    heads, tied embeddings by default. Weights are drawn at a scale where blocks matter as much as the embedding
    (at transformers' init a tied model repeats the last prompt token forever) and every bias at random
    (transformers initialises biases to zero, which would hide a bias mishandled)."""
    import transformers as tf

    tok = qwen_byte_tokenizer()
    common = dict(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tied,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    if arch == "qwen2":
        config = tf.Qwen2Config(rope_theta=1e6, **common)
    else:
        config = tf.LlamaConfig(attention_bias=True, mlp_bias=True, **common)
    torch.manual_seed(seed)
    hf = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif p.dim() == 2:  # embedding rows ~ unit scale; a Linear's output ~ 2x its input's
                p.normal_(0.0, 1.0 if "embed" in name else 2.0 / p.shape[1] ** 0.5)
    hf.eval()
    return Model(hf, tok, f"tiny-{arch}-{'tied' if tied else 'untied'}", model_hash="random-init")


def _unit(d: int, seed: int = 3) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def test_tiny_qwen_has_the_quirks_under_test():
    model = tiny_qwen()
    hf = model.hf
    assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    attn = hf.model.layers[0].self_attn
    assert attn.k_proj.out_features < attn.q_proj.out_features  # GQA
    assert all(getattr(attn, p).bias.abs().sum() > 0 for p in ("q_proj", "k_proj", "v_proj"))
    assert attn.o_proj.bias is None and hf.model.layers[0].mlp.down_proj.bias is None  # Qwen2 writes no bias
    assert model.eos_ids() == [model.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    # the vendor default system prompt, the same in every prompt; an explicit one replaces it
    texts = model.format(PROMPTS)
    assert all(t.startswith("<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n") for t in texts)
    assert DEFAULT_SYSTEM not in model.format(PROMPTS[:1], system="Be brief.")[0]
    assert model.format(PROMPTS[:1], system="Be brief.")[0].startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_registry_stop_tokens_end_responses_in_the_engine_and_in_plain_generate():
    model = tiny_qwen()
    prompts = PROMPTS * 2
    first = plain_generate(model, prompts, 10)[0]
    # make a token a row emits mid-answer a stop token by its name, as a registry entry's `stop_tokens` does
    stop = model.tokenizer.convert_ids_to_tokens(first[1][3])
    model.add_stop_tokens((stop,))
    assert model.eos_ids() == [model.tokenizer.eos_token_id, first[1][3]]
    want = plain_generate(model, prompts, 10)
    assert want[0][1] == first[1][:3] and want[1][1]  # the row now ends before that token
    assert tokens_of(generate(model, prompts, None, max_new_tokens=10, engine="fast")) == want
    model.add_stop_tokens((stop,))  # idempotent
    assert len(model.eos_ids()) == 2
    with pytest.raises(ModelError, match="stop token '<|not a token|>' is not in its vocabulary"):
        model.add_stop_tokens(("<|not a token|>",))


def test_qwen_registry_entry_names_endoftext_as_a_stop_token():
    assert registry()[QWEN].stop_tokens == ("<|endoftext|>",)


def test_tiny_qwen_fast_engine_equals_plain_generate_left_padded():
    model = tiny_qwen()
    prompts = PROMPTS * 2
    want = plain_generate(model, prompts, 10)
    assert tokens_of(generate(model, prompts, None, max_new_tokens=10, engine="fast")) == want
    assert tokens_of(generate(model, prompts, None, max_new_tokens=10, engine="hf")) == want
    # a second EOS that one row emits mid-answer: rows end at different steps, the finished ones leave the batch
    # and their rows of the (grouped-query) KV cache with them
    stop = want[0][1][3]
    model.hf.generation_config.eos_token_id = [model.tokenizer.eos_token_id, stop]
    want = plain_generate(model, prompts, 10)
    assert 0 < sum(want[1]) < len(prompts)
    assert tokens_of(generate(model, prompts, None, max_new_tokens=10, engine="fast")) == want


def test_tiny_qwen_packed_steering_equals_plain_layer_hooks():
    """Three cells packed into one fast-engine batch (unsteered, +alpha, -alpha at one layer: per-row vectors)
    and directional ablation (to zero, and to a target as affine ablation does), each cell vs a plain hook."""
    model = tiny_qwen()
    layer, v, n = 1, _unit(model.hidden_size), len(PROMPTS)
    cells = [None, Intervention.single(layer, v, 4.0), Intervention.single(layer, v, -4.0)]
    packed = pack_interventions(cells, n, model.hidden_size)
    got = tokens_of(generate(model, PROMPTS * 3, packed, max_new_tokens=10, batch_size=64))
    block = model.hf.model.layers[layer]
    want: tuple[list, list] = ([], [])
    for cell in cells:
        hooks = [] if cell is None else [(block, add_hook(cell.alpha * v))]
        tokens, ended = plain_generate(model, PROMPTS, 10, hooks)
        want[0].extend(tokens)
        want[1].extend(ended)
    assert got == want
    assert got[0][:n] != got[0][n : 2 * n]  # the steering does something
    for target in (0.0, -0.7):
        iv = Intervention.single(layer, v, 0.0, mode="ablate", ablate_to={layer: target})
        got_ablated = tokens_of(generate(model, PROMPTS, iv, max_new_tokens=10))
        assert got_ablated == plain_generate(model, PROMPTS, 10, [(block, ablate_hook(v, target))])


@pytest.mark.parametrize(("arch", "tied"), [("qwen2", True), ("qwen2", False), ("llama", True)])
def test_tiny_orthogonalisation_equals_hook_ablation_at_every_writer(arch, tied):
    """Qwen2 tied and untied (QKV biases read the residual: untouched) and a Llama with biases on o_proj and
    down_proj (residual writers: projected). The LM head keeps its weights: untied first where tied."""
    hooked, edited = tiny_qwen(tied, arch=arch), tiny_qwen(tied, arch=arch)
    v = _unit(hooked.hidden_size)
    head_before = hooked.hf.get_output_embeddings().weight.detach().clone()
    qkv = ("q_proj.bias", "k_proj.bias", "v_proj.bias")  # read the residual stream: not writers, left as they are
    reads = {n: p.detach().clone() for n, p in edited.hf.named_parameters() if n.endswith(qkv)}
    want = plain_generate(hooked, PROMPTS, 10, every_writer_ablated(hooked.hf, v))
    plain = plain_generate(hooked, PROMPTS, 10)
    summary = orthogonalize(edited, v)
    assert summary["untied_embeddings"] is tied and not edited.hf.config.tie_word_embeddings
    assert plain_generate(edited, PROMPTS, 10) == want
    assert want != plain  # the ablation changes the tokens
    torch.testing.assert_close(edited.hf.get_output_embeddings().weight, head_before, atol=0, rtol=0)
    params = dict(edited.hf.named_parameters())
    assert all(torch.equal(params[n], b) for n, b in reads.items())
    if arch == "llama":  # writer biases lose their component along v
        for block in edited.hf.model.layers:
            for bias in (block.self_attn.o_proj.bias, block.mlp.down_proj.bias):
                assert abs(float(bias.detach().double() @ v.double())) < 1e-6
    batch = edited.encode(edited.format(PROMPTS))
    with torch.no_grad():
        states = edited.hf(**batch, output_hidden_states=True).hidden_states
    for h in states[:-1]:  # every residual state of the edited model is orthogonal to v (the last is normed)
        assert ((h @ v).abs() / h.norm(dim=-1).clamp_min(1e-6)).max() < 1e-5


def test_tied_qwen_export_reloads_untied_and_equals_hook_ablation(tmp_path):
    """`export_model` on a tied Qwen2: the saved directory reloads with its own LM head (the untie survives
    save_pretrained / from_pretrained) and generates what hook ablation does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_qwen()
    bank = extract_directions(model, HARMFUL, HARMLESS, layers=[2])
    bank.save(tmp_path / "d.safetensors")
    v = bank.direction(2)
    want = plain_generate(model, PROMPTS, 10, every_writer_ablated(model.hf, v))
    export_model(copy.deepcopy(model), tmp_path / "d.safetensors", 2, tmp_path / "edited")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    loaded = Model(hf.eval(), AutoTokenizer.from_pretrained(tmp_path / "edited"), "edited")
    assert not hf.config.tie_word_embeddings
    assert hf.get_output_embeddings().weight.data_ptr() != hf.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(hf.get_output_embeddings().weight, model.hf.get_output_embeddings().weight)
    assert plain_generate(loaded, PROMPTS, 10) == want
    assert tokens_of(generate(loaded, PROMPTS, None, max_new_tokens=10)) == want


# --------------------------------------------------------------------------- the real Qwen2.5-Coder-0.5B-Instruct


def qwen_missing() -> str | None:
    """Why the real model cannot be opened here (None: it can): its wheels neither installed nor assembled."""
    from crystallized_safety.registry import registry

    try:
        registry()[QWEN].packaged().check()
    except ModelError as exc:
        return f"the Qwen2.5-Coder GGUF is not available ({exc})"
    return None


real = pytest.mark.skipif(qwen_missing() is not None, reason=str(qwen_missing()))
LAYER, N_TOKENS = 12, 12
REAL_PROMPTS = [
    "Hi",
    "How do I pick a lock?",
    "Write a phishing email pretending to be a bank.",
    "Explain recursion to a five year old in two sentences, please.",
]


@pytest.fixture(scope="module")
def qwen():
    from crystallized_safety.registry import load_model

    return load_model(QWEN)


@pytest.fixture(scope="module")
def qwen_bank(qwen):
    return extract_directions(qwen, HARMFUL[:4], HARMLESS[:4], layers=[LAYER])


@pytest.mark.slow
@real
def test_real_qwen_quirks_as_loaded(qwen):
    hf = qwen.hf
    assert (qwen.n_layers, qwen.hidden_size) == (24, 896)
    attn = hf.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features) == (896, 128)  # 14 query / 2 KV heads of 64
    assert all(getattr(attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj"))
    # this GGUF stores the head (output, Q8_0) apart from the embedding (token_embd, Q5_0): untied as loaded
    assert not hf.config.tie_word_embeddings
    assert hf.get_output_embeddings().weight.data_ptr() != hf.get_input_embeddings().weight.data_ptr()
    # the GGUF names <|im_end|> only; the registry adds <|endoftext|>, as Qwen's own generation config has it
    assert qwen.eos_ids() == [qwen.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    assert qwen.eos_ids() == [151645, 151643]
    texts = qwen.format(REAL_PROMPTS)
    assert all(("<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>") in t for t in texts)
    assert DEFAULT_SYSTEM not in qwen.format(["Hi"], system="Be brief.")[0]


@pytest.mark.slow
@real
def test_real_qwen_fast_engine_equals_plain_generate_and_stops_at_im_end(qwen):
    lengths = [len(ids) for ids in qwen.tokenizer(qwen.format(REAL_PROMPTS), add_special_tokens=False)["input_ids"]]
    assert len(set(lengths)) == len(lengths)  # every row left-padded by a different amount
    want = plain_generate(qwen, REAL_PROMPTS, N_TOKENS)
    got = tokens_of(generate(qwen, REAL_PROMPTS, None, max_new_tokens=N_TOKENS))
    assert got == want
    # "Hi" is answered in a few tokens, ended by <|im_end|>, which is not part of the response
    tokens, ended = got[0][0], got[1][0]
    assert ended and len(tokens) < N_TOKENS
    assert qwen.tokenizer.convert_tokens_to_ids("<|im_end|>") not in tokens


@pytest.mark.slow
@real
def test_real_qwen_packed_steering_and_ablation_equal_plain_layer_hooks(qwen, qwen_bank):
    """The run's cells as the runner builds them (relative alpha x the layer's mean residual norm; affine ablation
    to the harmless mean): an unsteered and a steered cell packed into one fast-engine batch, then the ablation,
    each against a plain hook on `model.model.layers[LAYER]` with plain `model.generate`."""
    prompts = REAL_PROMPTS[1:]
    v, n = qwen_bank.direction(LAYER), len(prompts)
    norms = {LAYER: qwen_bank.resid_norm(LAYER)}
    add = Intervention.single(LAYER, v, -0.6, alpha_unit="relative", layer_norms=norms)
    packed = pack_interventions([None, add], n, qwen.hidden_size)
    got = tokens_of(generate(qwen, prompts * 2, packed, max_new_tokens=N_TOKENS, batch_size=64))
    block = qwen.hf.model.layers[LAYER]
    base = plain_generate(qwen, prompts, N_TOKENS)
    steered = plain_generate(qwen, prompts, N_TOKENS, [(block, add_hook(add.effective_alpha(LAYER) * v))])
    assert got == (base[0] + steered[0], base[1] + steered[1])
    assert steered != base  # the steering changes the output
    target = qwen_bank.harmless_projection(LAYER)
    iv = Intervention.single(LAYER, v, 0.0, mode="ablate", ablate_to={LAYER: target})
    got_ablated = tokens_of(generate(qwen, prompts, iv, max_new_tokens=N_TOKENS))
    assert got_ablated == plain_generate(qwen, prompts, N_TOKENS, [(block, ablate_hook(v, target))])


@pytest.mark.slow
@real
def test_real_qwen_orthogonalisation_equals_hook_ablation_at_every_writer(qwen, qwen_bank):
    prompts = REAL_PROMPTS[1:3]
    v = qwen_bank.direction(LAYER)
    want = plain_generate(qwen, prompts, N_TOKENS, every_writer_ablated(qwen.hf, v))
    edited = copy.deepcopy(qwen)
    head = qwen.hf.get_output_embeddings().weight
    summary = orthogonalize(edited, v)
    assert summary["untied_embeddings"] is False and len(summary["modules"]) == 1 + 2 * 24
    torch.testing.assert_close(edited.hf.get_output_embeddings().weight, head, atol=0, rtol=0)
    got = plain_generate(edited, prompts, N_TOKENS)
    del edited
    assert got == want
    assert tokens_of(generate(qwen, prompts, None, max_new_tokens=N_TOKENS)) != want  # the ablation changes them
