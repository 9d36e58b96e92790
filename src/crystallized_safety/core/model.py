"""Model loading, chat formatting and the one place that knows where decoder layers live.

Everything architecture-specific stays in this file: the rest of the package sees a `Model` with
`layers` (the decoder blocks, in order), `n_layers`, `hidden_size` and `encode()`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InterventionError, LayerError, ModelError, PromptError
from ..validation import is_int

LAYER_CONVENTION = "i = output of decoder block i (0-based) = HF hidden_states[i+1]"


# --------------------------------------------------------------------------- decoder layers


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"layers path '{path}' not found on {type(root).__name__} (no attribute '{part}')")
        obj = getattr(obj, part)
    return obj


def _has_path(root: nn.Module, path: str) -> bool:
    obj: Any = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return isinstance(obj, nn.Module)


# Output projections that write into the residual stream, by the names the architectures use
# (Llama/Mistral/Qwen2/Phi-3/Gemma; GPT-2; GPT-NeoX).
WRITER_PATHS = {
    "attention": ("self_attn.o_proj", "attn.c_proj", "attention.dense"),
    "mlp": ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h"),
}


def _num_layers(config: Any) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def decoder_layers(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """Return the decoder blocks of any HF causal LM, in order.

    Structural search (no per-architecture table): the ModuleList whose length equals the config's
    layer count and whose children all share one class; the shallowest one wins. `path` (e.g.
    "model.layers") overrides the search for architectures it gets wrong.
    """
    if path:
        found = _get_path(model, path)
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise ModelError(f"layers path '{path}' is not a non-empty ModuleList of decoder blocks")
        return found
    expected = _num_layers(getattr(model, "config", None))
    candidates: list[tuple[int, str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if expected is not None and len(module) != expected:
            continue
        candidates.append((name.count("."), name, module))
    if not candidates:
        raise ModelError(
            f"could not find the decoder layers of {type(model).__name__}; pass the path explicitly "
            "(e.g. --layers-path model.layers)"
        )
    candidates.sort(key=lambda c: (c[0], c[1]))
    return candidates[0][2]


# --------------------------------------------------------------------------- model wrapper


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: counted from each row's first real token (absolute-position
    models such as GPT-2 would otherwise see shifted positions); 0 on padding."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def select_cache_rows(cache: Any, index: torch.Tensor) -> None:
    """Keep (and reorder, or repeat) the batch rows `index` of a KV cache, in place."""
    cache.batch_select_indices(index)


def merge_system(messages: Sequence[dict[str, str]], system_role: bool) -> list[dict[str, str]]:
    """Messages a template without a system role accepts (Gemma, Mistral v0.3): system texts are joined and
    prepended to the first user turn. Unchanged where the template has a system role."""
    if system_role:
        return [dict(m) for m in messages]
    system = [m["content"] for m in messages if m["role"] == "system"]
    out = [dict(m) for m in messages if m["role"] != "system"]
    if system:
        first = next(m for m in out if m["role"] == "user")
        first["content"] = "\n\n".join(system) + "\n\n" + first["content"]
    return out


@dataclass
class Model:
    """A loaded causal LM plus what the rest of the package needs to know about it."""

    hf: Any
    tokenizer: Any
    model_id: str
    model_hash: str = "unknown"
    system_role: bool = True
    layers_path: str | None = None
    layers: nn.ModuleList = field(init=False, repr=False)
    active_interventions: int = field(default=0, init=False, repr=False)  # > 0 inside steer()
    precision: str = field(default="", init=False, repr=False)  # "mixed": bf16 matmuls, fp32 residual
    _forward_kw: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.layers = decoder_layers(self.hf, self.layers_path)
        if self.tokenizer is None:  # a view of a plain module (`of_module`): blocks and shapes only
            return
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"

    @classmethod
    def of_module(cls, hf: nn.Module, layers_path: str | None = None) -> Model:
        """A view of a plain Hugging Face causal LM (any `PreTrainedModel`, blocks found by `decoder_layers`) with
        no tokenizer: what steering and activation hooks need (layers, hidden size, a name for errors)."""
        if isinstance(hf, Model):
            raise ModelError("Model.of_module takes a plain torch module; this is already a Model")
        name = getattr(hf, "name_or_path", None) or type(hf).__name__
        return cls(hf, None, str(name), layers_path=layers_path)

    # -- shape facts
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        config = self.hf.config
        for key in ("hidden_size", "n_embd", "d_model"):
            if isinstance(getattr(config, key, None), int):
                return getattr(config, key)
        raise ModelError(f"cannot read the hidden size of {type(self.hf).__name__} from its config")

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the first parameter, or for a sharded model (`device_map`) the one the
        input embedding executes on (offloaded weights sit on "meta" but run on the CPU or their GPU)."""
        placement = getattr(self.hf, "hf_device_map", None)
        if placement and len(set(placement.values())) > 1:
            first = next(iter(placement.values()))
            return torch.device("cpu" if first in ("cpu", "disk", "meta") else first)
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def residual_writers(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every module whose output is added to the residual stream as is: the token (and
        learned position) embeddings, and per decoder layer the attention and MLP output projections. An
        architecture that normalises a block's output before adding it (Gemma 2/3: post-attention and
        post-feed-forward norms) has no such module, and raises: no weight edit removes a direction exactly."""
        writers: list[tuple[str, nn.Module]] = [("embed_tokens", self.hf.get_input_embeddings())]
        wpe = getattr(getattr(self.hf, "transformer", None), "wpe", None)  # GPT-2's learned positions
        if isinstance(wpe, nn.Embedding):
            writers.append(("wpe", wpe))
        for i, block in enumerate(self.layers):
            if hasattr(block, "post_feedforward_layernorm"):
                raise ModelError(
                    f"{self.model_id} normalises each block's output before the residual add (post-norms): a "
                    "direction cannot be folded out of its weights; ablate it with a hook (steering) instead"
                )
            for candidates in (WRITER_PATHS["attention"], WRITER_PATHS["mlp"]):
                found = [(path, _get_path(block, path)) for path in candidates if _has_path(block, path)]
                if len(found) != 1:
                    raise ModelError(
                        f"cannot find layer {i}'s residual writer of {type(block).__name__} among {candidates}"
                    )
                writers.append((f"layers.{i}.{found[0][0]}", found[0][1]))
        return writers

    def sublayers(self) -> list[nn.Module]:
        """Each block's attention and MLP modules (the parents of its residual writers), block by block."""
        out = []
        for i, block in enumerate(self.layers):
            for kind, candidates in WRITER_PATHS.items():
                parents = sorted({path.rsplit(".", 1)[0] for path in candidates})
                found = [_get_path(block, path) for path in parents if _has_path(block, path)]
                if len(found) != 1:
                    raise ModelError(f"cannot find layer {i}'s {kind} module of {type(block).__name__} among {parents}")
                out.append(found[0])
        return out

    def check_layer(self, layer: int) -> int:
        if not is_int(layer, 0, self.n_layers - 1):
            raise LayerError(
                f"layer {layer} is out of range for {self.model_id}: "
                f"it has {self.n_layers} layers (0..{self.n_layers - 1})"
            )
        return layer

    def parse_layers(self, spec: str | Sequence[int] | None) -> list[int]:
        """'all' / None -> every layer; '0,5,10' or a list -> those, checked, order kept, no repeats."""
        if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
            return list(range(self.n_layers))
        if isinstance(spec, str):
            try:
                items = [int(part) for part in spec.split(",") if part.strip()]
            except ValueError:
                raise LayerError(
                    f"cannot parse layers '{spec}': use 'all' or comma-separated integers like 0,5,10"
                ) from None
        else:
            items = list(spec)
        if not items:
            raise LayerError("no layers given: use 'all' or comma-separated integers like 0,5,10")
        if len(set(items)) != len(items):
            raise LayerError(f"layers {items} contain a repeat: list each layer once")
        return [self.check_layer(i) for i in items]

    # -- chat formatting
    def format(self, prompts: Sequence[str], *, system: str | None = None, raw: bool = False) -> list[str]:
        """Wrap user prompts in the model's chat template (generation prompt appended).

        raw=True passes the text through untouched (base models, or deliberate raw probing).
        """
        if raw:
            return [(system + "\n\n" + p) if system else p for p in prompts]
        if not self.has_chat_template:
            raise ModelError(
                f"{self.model_id} has no chat template; pass --raw to feed prompts as plain text, "
                "or use a model with a chat template"
            )
        out = []
        for prompt in prompts:
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": prompt})
            out.append(self.chat_text(messages))
        return out

    def chat_text(self, messages: Sequence[dict[str, str]]) -> str:
        """Chat-template text for OpenAI-style messages, generation prompt appended (system text merged into
        the first user turn where the template has no system role)."""
        merged = merge_system(messages, self.system_role)
        return self.tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)

    def post_instruction_length(self) -> int:
        """Number of template tokens after the user's text (e.g. '<|im_end|>\\n<|im_start|>assistant\\n')."""
        if not self.has_chat_template:
            return 0
        marker = "\u2063MARKER\u2063"
        text = self.format([marker])[0]
        tail = text[text.rindex(marker) + len(marker) :]
        return len(self.tokenizer(tail, add_special_tokens=False)["input_ids"])

    def encode(self, texts: Sequence[str], *, raw: bool = False) -> dict[str, torch.Tensor]:
        """Left-padded token batch on the model's device. Chat-formatted text already holds its BOS."""
        batch = self.tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=raw)
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    # -- the Hugging Face adapter: the only place the rest of the package touches transformers internals
    @property
    def body(self) -> nn.Module:
        """The decoder without its LM head (returns `last_hidden_state`): for residual-stream work."""
        return self.hf.base_model

    @property
    def head(self) -> nn.Module:
        """The LM head (hidden state -> vocabulary logits)."""
        return self.hf.get_output_embeddings()

    @property
    def context_length(self) -> int | None:
        """Longest sequence (prompt + generated tokens) the model's config allows; None if it does not say."""
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(self.hf.config, key, None)
            if isinstance(value, int):
                return value
        return None

    def check_fits(self, texts: Sequence[str], max_new_tokens: int, *, raw: bool = False) -> list[int]:
        """Prompt token counts, or a clear error when a prompt plus `max_new_tokens` exceeds the context length
        (checked on characters first, so a megabyte prompt fails before it is tokenised)."""
        limit = self.context_length
        if limit is not None and max_new_tokens >= limit:
            raise PromptError(f"max_new_tokens {max_new_tokens} does not fit the model's context of {limit} tokens")
        if limit is not None:
            for i, text in enumerate(texts):
                if len(text) > MAX_CHARS_PER_TOKEN * limit:
                    raise PromptError(
                        f"prompt {i + 1} is {len(text):,} characters, far beyond the model's context of {limit} "
                        "tokens: shorten it"
                    )
        counts = [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=raw)["input_ids"]]
        if limit is not None and counts and max(counts) + max_new_tokens > limit:
            i = counts.index(max(counts))
            raise PromptError(
                f"prompt {i + 1} ({counts[i]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                f"of {limit} tokens: shorten the prompt or generate fewer tokens"
            )
        return counts

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else pad

    def add_stop_tokens(self, tokens: Sequence[str]) -> None:
        """Make `tokens` end a response too (in the generation config, so the engine and plain `generate` agree): a
        GGUF carries one EOS id, where e.g. Qwen's own generation config names two (`<|im_end|>`, `<|endoftext|>`)."""
        config = self.hf.generation_config
        ids = config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        for token in tokens:
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if not isinstance(tid, int) or tid == self.tokenizer.unk_token_id:
                raise ModelError(f"model '{self.model_id}': stop token {token!r} is not in its vocabulary")
            if tid not in ids:
                ids.append(tid)
        config.eos_token_id = ids

    def eos_ids(self) -> list[int]:
        """Every token id that ends a response: the generation config's EOS ids plus the tokenizer's."""
        ids = self.hf.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def left_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, attention mask, position ids) of left-padded token sequences, on the model's device."""
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[self.pad_id] * (width - len(s)) + list(s) for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.device)
        return ids, mask, positions(mask)

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        *,
        cache: Any = None,
        keep: int | None = None,
        use_cache: bool = True,
    ) -> tuple[torch.Tensor, Any]:
        """(logits of the last `keep` positions (all if None), KV cache). The LM head runs only where kept
        when the model supports it, which is the widest matmul of a small model."""
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": use_cache}
        if use_cache:
            kwargs[self._kw["cache"]] = cache
        if keep is not None and self._kw["keep"]:
            kwargs["logits_to_keep"] = keep
        out = self.hf(**kwargs)
        logits = out.logits if keep is None else out.logits[:, -keep:]
        return logits, (output_cache(out) if use_cache else None)

    @property
    def _kw(self) -> dict[str, Any]:
        """Forward keywords of this transformers version, read once from the signature (never by trial)."""
        if self._forward_kw is None:
            params = inspect.signature(self.hf.forward).parameters
            self._forward_kw = {
                "cache": "cache" if "cache" in params else "past_key_values",
                "keep": "logits_to_keep" in params,
            }
        return self._forward_kw

    def generate_reference(
        self,
        batch: dict[str, torch.Tensor],
        *,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float,
        top_p: float,
        flat: set[int] | None = None,
    ) -> torch.Tensor:
        """Plain `model.generate` on a left-padded batch: prompt + new token ids (the reference engine). Rows whose
        logits were constant at any step are added to `flat` (see `flat_rows`)."""
        from transformers import GenerationConfig

        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_ids(),
        )
        from transformers import LogitsProcessor, LogitsProcessorList

        dtype = self.dtype

        class FiniteLogits(LogitsProcessor):  # last in the list: top-p's -inf is allowed, NaN / +inf are not
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                if torch.isnan(scores).any() or torch.isposinf(scores).any():
                    raise InterventionError(nonfinite_message(dtype))
                if flat is not None:
                    flat.update(flat_rows(scores).nonzero().flatten().tolist())
                return scores

        return self.hf.generate(
            **batch, generation_config=config, logits_processor=LogitsProcessorList([FiniteLogits()])
        )

    def check_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits`, or a clear error when steering (or the dtype) made them NaN / inf: never silent garbage."""
        lo, hi = torch.aminmax(logits)  # NaN propagates; one pass, ~15x cheaper than isfinite(...).all() here
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise InterventionError(nonfinite_message(self.dtype))
        return logits

    def metadata(self) -> dict[str, str]:
        return {
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "n_layers": str(self.n_layers),
            "hidden_size": str(self.hidden_size),
        }


MAX_CHARS_PER_TOKEN = 64  # a text this many times longer than the context cannot fit, whatever the tokenizer


def flat_rows(logits: torch.Tensor) -> torch.Tensor:
    """Rows ([rows, vocab] -> bool [rows]) whose logits are all equal: the hidden state carried nothing (a huge
    steering vector overflowed the final norm to zero), so greedy decoding picks token 0 (often padding) and
    sampling picks uniformly random tokens. Finite but meaningless, so `check_logits` cannot catch it. Entries
    masked to -inf (top-p) are ignored; a row needs two or more candidates left to count as flat."""
    lo, hi = torch.aminmax(logits, dim=-1)
    if not bool(torch.isneginf(lo).any()):
        return hi == lo
    masked = torch.isneginf(logits)
    lo = logits.masked_fill(masked, float("inf")).amin(-1)
    return (hi == lo) & ((~masked).sum(-1) > 1)


def nonfinite_message(dtype: torch.dtype) -> str:
    return (
        "the model produced NaN/inf logits: steering pushed the activations out of range (lower the alpha, check "
        f"the direction file's norms and means) or {str(dtype).removeprefix('torch.')} overflowed (try float32)"
    )


def output_cache(out: Any) -> Any:
    """The KV cache of a model output, under whichever name this transformers version uses."""
    return out["cache"] if "cache" in out else out["past_key_values"]
