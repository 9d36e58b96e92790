"""Interventions on the residual stream, and the one context manager through which hooks are applied.

An `Intervention` says *what* to do (layers, direction(s), alpha, mode, positions); `steer()` applies
it to a `Model` for the duration of a `with` block and always removes its hooks, also on exceptions.
`layer_hooks()` is the general mechanism, also used for capturing activations. Both also take a plain Hugging
Face model (a `PreTrainedModel`: its decoder blocks are found structurally, `layers_path` overrides):

    with steer(hf_model, Intervention.single(12, direction, -8.0)):
        out = hf_model.generate(**batch, max_new_tokens=32, do_sample=False)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from .. import validation
from ..errors import InterventionError
from . import modes
from .model import Model
from .modes import Mode, as_vector, check_numbers

Positions = Literal["all", "prompt", "generated"]
AlphaUnit = Literal["absolute", "relative"]
HookFn = Callable[[torch.Tensor], torch.Tensor | None]

# The largest |alpha| accepted per unit (validation.ALPHA_LIMITS, shared with the CLI and the spec): beyond
# these, activations overflow (fp16/bf16 at once, fp32 soon after) and generation returns NaN logits, i.e. empty
# "responses" a substring judge would count as flips.
ALPHA_LIMITS = validation.ALPHA_LIMITS
POSITIONS = ("all", "prompt", "generated")


def as_model(model: Model | nn.Module, layers_path: str | None = None) -> Model:
    """The project's `Model` as is; a plain Hugging Face model as a `Model.of_module` view (`layers_path`
    overrides where its decoder blocks are; a `Model` already knows)."""
    if isinstance(model, Model):
        if layers_path is not None:
            raise InterventionError("layers_path is for a plain Hugging Face model: a Model knows its layers")
        return model
    if not isinstance(model, nn.Module):
        raise InterventionError(f"cannot steer a {type(model).__name__}: pass a Model or a Hugging Face model")
    return Model.of_module(model, layers_path)


@contextmanager
def layer_hooks(
    model: Model | nn.Module, fns: Mapping[int, HookFn], *, layers_path: str | None = None
) -> Iterator[None]:
    """Register forward hooks on decoder blocks; `fn(hidden) -> new hidden | None` per layer.

    Blocks return either a tensor or a tuple whose first element is the residual stream; the hook
    hides that difference. Handles are removed on exit, whatever happens inside the block. `model` is a
    `Model` or a plain Hugging Face model (`as_model`).
    """
    model = as_model(model, layers_path)
    handles = []

    def wrap(fn: HookFn):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            new = fn(hidden)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    try:
        for layer, fn in fns.items():
            model.check_layer(layer)
            handles.append(model.layers[layer].register_forward_hook(wrap(fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(init=False)
class Intervention:
    """What to do to the residual stream at which layers.

    - `directions`: layer -> vector [d] (shared by every row) or [rows, d] (one per batch row).
      Vectors are used as given (unit directions from a DirectionBank; raw vectors from the seed API).
    - `alpha`: one number, or one per row (several interventions in one batch).
    - `mode`: a `core.modes.Mode` (or its registered name): add (h + a*v), ablate (set the projection on v to a
      target), ablate_add (both), affine (ablate to where harmless prompts sit), rotate (angular steering: alpha in
      degrees); `modes.MODES` lists them.
    - `positions`: all | prompt (prefill only) | generated (tokens produced during generation).
    - `alpha_unit`: absolute, or relative (alpha * `layer_norms[layer]`, the layer's mean residual norm).
    - `layer_weights`: per-layer multipliers (e.g. a total alpha split across K layers: 1/K each).
    - `params`: the mode's own parameters (`modes.Ablation`: `ablate_to`, a subspace `basis` and its
      `basis_targets`; `modes.Rotation`: `planes`; None for add), or pass them as keywords
      (`Intervention({2: v}, mode="ablate", ablate_to={2: 1.25})`); `mode.bind(bank, directions)` reads them from a
      direction file.
    """

    directions: dict[int, torch.Tensor]
    alpha: float | torch.Tensor
    mode: Mode
    positions: str  # Positions
    alpha_unit: str  # AlphaUnit
    layer_norms: dict[int, float] | None
    layer_weights: dict[int, float]
    params: Any  # the mode's (its `params_type`)

    def __init__(
        self,
        directions: Mapping[int, torch.Tensor | Sequence[float]],
        alpha: float | torch.Tensor = 0.0,
        mode: Mode | str = "add",
        positions: str = "all",
        alpha_unit: str = "absolute",
        layer_norms: dict[int, float] | None = None,
        layer_weights: dict[int, float] | None = None,
        params: Any = None,
        **mode_params: Any,
    ) -> None:
        if not directions:
            raise InterventionError("an intervention needs at least one layer with a direction")
        self.mode = modes.mode(mode)
        if positions not in POSITIONS:
            raise InterventionError(f"unknown positions '{positions}': use one of {', '.join(POSITIONS)}")
        if alpha_unit not in ("absolute", "relative"):
            raise InterventionError(f"unknown alpha unit '{alpha_unit}': use absolute or relative")
        self.positions, self.alpha_unit, self.layer_norms = positions, alpha_unit, layer_norms
        self.layer_weights = dict(layer_weights or {})
        self.directions = {int(k): as_vector(v, f"direction for layer {k}") for k, v in directions.items()}
        if not isinstance(alpha, (int, float)):
            alpha = torch.as_tensor(alpha, dtype=torch.float32).detach()
            if alpha.dim() != 1:
                raise InterventionError("alpha must be a number or a 1-D sequence with one value per prompt")
        self.alpha = alpha
        check_numbers(self.alpha, f"{self.alpha_unit} alpha", ALPHA_LIMITS[self.alpha_unit])
        check_numbers(list(self.layer_weights.values()), "layer weight", ALPHA_LIMITS["relative"])
        self.params = self.mode.take(params, mode_params)
        if self.layer_norms:
            check_numbers(list(self.layer_norms.values()), "layer residual norm", positive=True)
        self.mode.check(self)
        if self.alpha_unit == "relative":
            missing = [k for k in self.directions if not self.layer_norms or k not in self.layer_norms]
            if missing:
                raise InterventionError(
                    f"relative alpha needs the mean residual norm of layers {missing}: use a direction file from "
                    "`csafety extract` or pass layer_norms"
                )

    @classmethod
    def single(
        cls, layer: int, direction: torch.Tensor, alpha: float | Sequence[float] | torch.Tensor, **kwargs
    ) -> Intervention:
        value = alpha if isinstance(alpha, (int, float, torch.Tensor)) else torch.as_tensor(alpha, dtype=torch.float32)
        return cls(directions={layer: direction}, alpha=value, **kwargs)

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    @property
    def rows(self) -> int | None:
        """Number of batch rows this intervention is tied to (None = any)."""
        counts = {v.shape[0] for v in self.directions.values() if v.dim() == 2}
        if isinstance(self.alpha, torch.Tensor):
            counts.add(self.alpha.shape[0])
        if len(counts) > 1:
            raise InterventionError(f"per-row alphas/directions disagree on the number of rows: {sorted(counts)}")
        return counts.pop() if counts else None

    def select(self, rows: slice | torch.Tensor) -> Intervention:
        """The same intervention restricted to batch rows: a slice (micro-batching) or an index tensor
        (rows still running, or one representative per distinct row)."""
        if self.rows is None:
            return self
        directions = {k: (v[rows] if v.dim() == 2 else v) for k, v in self.directions.items()}
        alpha = self.alpha[rows] if isinstance(self.alpha, torch.Tensor) else self.alpha
        return replace(self, directions=directions, alpha=alpha)

    def effective_alpha(self, layer: int) -> float | torch.Tensor:
        scale = self.layer_weights.get(layer, 1.0)
        if self.alpha_unit == "relative":
            scale = scale * float(self.layer_norms[layer])  # type: ignore[index]
        return self.alpha * scale if scale != 1.0 else self.alpha

    def check(self, model: Model, batch_rows: int | None = None) -> None:
        for layer, vec in self.directions.items():
            model.check_layer(layer)
            if vec.shape[-1] != model.hidden_size:
                raise InterventionError(
                    f"direction for layer {layer} has size {vec.shape[-1]} but {model.model_id} has hidden size "
                    f"{model.hidden_size}: use a direction extracted from this model (or a transfer map)"
                )
        rows = self.rows
        if rows is not None and batch_rows is not None and rows != batch_rows:
            raise InterventionError(f"intervention has {rows} per-row values but the batch has {batch_rows} prompts")


def pack_interventions(
    interventions: Sequence[Intervention | None], rows: int, hidden_size: int
) -> Intervention | None:
    """One Intervention for len(interventions) blocks of `rows` rows each (several cells in one batch).

    A single intervention is returned as is. Several of a mode that packs (add; None = unsteered) become per-row
    vectors with each row's effective alpha folded in (alpha x norm x weight, computed exactly as the single
    intervention's hook computes it), zeros where one does not touch a layer, and alpha 1: each row's residual
    stream gets the same arithmetic as when its intervention runs alone.
    """
    if len(interventions) == 1:
        return interventions[0]
    used = [iv for iv in interventions if iv is not None]
    if any(not iv.mode.packs for iv in used):
        raise InterventionError("only 'add' conditions can share a batch; ablation runs one condition per batch")
    if len({iv.positions for iv in used}) > 1:
        raise InterventionError("interventions that steer different positions cannot share a batch")
    layers = sorted({layer for iv in used for layer in iv.layers})
    if not layers:
        return None
    blocks = {layer: torch.zeros(len(interventions) * rows, hidden_size) for layer in layers}
    for j, one in enumerate(interventions):
        if one is None:
            continue
        for layer in one.layers:
            blocks[layer][j * rows : (j + 1) * rows] = one.effective_alpha(layer) * one.directions[layer]
    return Intervention(directions=blocks, alpha=1.0, mode=modes.ADD, positions=used[0].positions)


def _make_hook(iv: Intervention, layer: int, prompt_len: int | None) -> HookFn:
    vec = iv.directions[layer]
    operator = iv.mode.operator(iv, layer)
    state = {"end": 0, "calls": 0}

    def position_mask(hidden: torch.Tensor) -> torch.Tensor | None:
        if iv.positions == "all" or prompt_len is None:
            return (
                None
                if iv.positions != "generated"
                else torch.zeros(1, hidden.shape[1], 1, dtype=torch.bool, device=hidden.device)
            )
        steps = hidden.shape[1]
        # First call: prefill from position 0. Later single-token calls continue (KV cache); a longer
        # later call is a full recompute without cache, which starts at 0 again.
        start = state["end"] if (state["calls"] and steps == 1) else 0
        state["end"], state["calls"] = start + steps, state["calls"] + 1
        pos = torch.arange(start, start + steps, device=hidden.device)
        keep = pos < prompt_len if iv.positions == "prompt" else pos >= prompt_len
        return keep.view(1, -1, 1)

    def hook(hidden: torch.Tensor) -> torch.Tensor:
        v = vec.to(device=hidden.device, dtype=hidden.dtype)
        if vec.dim() == 2:
            v = v.view(v.shape[0], 1, v.shape[1])  # [rows, d] -> [rows, 1, d]: one vector per batch row
        mask = position_mask(hidden)
        if mask is not None and not bool(mask.any()):
            return hidden
        out = operator(hidden, v)
        if mask is not None:
            out = torch.where(mask, out, hidden)
        return out

    return hook


@contextmanager
def steer(
    model: Model | nn.Module,
    intervention: Intervention | None,
    *,
    prompt_len: int | None = None,
    batch_rows: int | None = None,
    layers_path: str | None = None,
) -> Iterator[None]:
    """Apply `intervention` to `model` inside the block (no-op for None).

    `model` is the project's `Model` or a plain Hugging Face model (its blocks found as `decoder_layers`
    finds them, `layers_path` overrides); either way the same hooks, so the same tokens. `prompt_len` is the
    padded prompt length; it is what lets `positions=prompt|generated` tell prompt tokens from generated ones
    during cached generation.
    """
    model = as_model(model, layers_path)
    if intervention is None:
        yield
        return
    intervention.check(model, batch_rows)
    fns = {layer: _make_hook(intervention, layer, prompt_len) for layer in intervention.layers}
    model.active_interventions += 1
    try:
        with layer_hooks(model, fns):
            yield
    finally:
        model.active_interventions -= 1
