"""Weight orthogonalisation: directional ablation folded into the weights (Arditi et al. 2024, "Refusal in
language models is mediated by a single direction"; the edit that refusal_direction and heretic apply).

Every module that writes into the residual stream (token and position embeddings, each block's attention and
MLP output projections, their biases) is projected off the unit direction v: W <- W - v v^T W for a Linear,
E <- E - E v v^T for an embedding table. The residual stream then never holds a component along v, which is
exactly what ablating v from every writer's output with hooks does, so generation from the edited weights
equals generation under that activation ablation. Tied input/output embeddings are untied first: otherwise the
edit would reach the LM head too and change every logit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..errors import InterventionError, ModelError
from .directions import DirectionBank
from .loading import atomic_dir, file_sha256, save_pretrained
from .model import Model


def _unit(direction: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(direction, dtype=torch.float64).flatten()
    if not torch.isfinite(v).all() or v.norm() == 0:
        raise InterventionError("the direction to fold out must be finite and non-zero")
    return v / v.norm()


def _project_out(module: nn.Module, v: torch.Tensor) -> None:
    """In place: `module`'s contribution to the residual stream loses its component along unit `v`."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    w = weight.data.double()
    vv = v.to(w.device)
    if isinstance(module, nn.Embedding):  # rows are residual vectors
        new = w - torch.outer(w @ vv, vv)
    elif isinstance(module, nn.Linear):  # [d_out = residual, d_in]
        new = w - torch.outer(vv, vv @ w)
    elif type(module).__name__ == "Conv1D":  # GPT-2: [d_in, d_out = residual]
        new = w - torch.outer(w @ vv, vv)
    else:
        raise ModelError(f"cannot fold a direction into a {type(module).__name__}")
    weight.data.copy_(new.to(weight.dtype))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        b = bias.data.double()
        bias.data.copy_((b - (b @ vv) * vv).to(bias.dtype))


def _untie(model: Model) -> bool:
    """Give the LM head its own weights when they are the input embedding's; True if they were tied."""
    head, embed = model.hf.get_output_embeddings(), model.hf.get_input_embeddings()
    if head is None or head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    head.weight = nn.Parameter(head.weight.detach().clone())
    model.hf.config.tie_word_embeddings = False
    if hasattr(model.hf.config, "get_text_config"):
        model.hf.config.get_text_config().tie_word_embeddings = False
    return True


def orthogonalize(model: Model, direction: torch.Tensor) -> dict:
    """Fold the ablation of `direction` into `model`'s weights, in place; returns what was changed."""
    v = _unit(direction)
    if v.shape[0] != model.hidden_size:
        raise InterventionError(f"direction has size {v.shape[0]} but {model.model_id} has hidden size "
                                f"{model.hidden_size}")  # fmt: skip
    writers = model.residual_writers()  # raises before anything changes where the edit cannot be exact
    untied = _untie(model)
    with torch.no_grad():
        for _name, module in writers:
            _project_out(module, v)
    return {"modules": [name for name, _ in writers], "untied_embeddings": untied}


def ablation_hooks(model: Model, direction: torch.Tensor) -> list[tuple[nn.Module, Callable]]:
    """(module, forward hook) pairs that ablate `direction` from every residual writer's output: the activation
    counterpart of `orthogonalize` (what its equivalence test and `export_model`'s check compare against)."""
    v = _unit(direction)

    def hook(_module, _args, output):
        out = output[0] if isinstance(output, tuple) else output
        u = v.to(device=out.device, dtype=out.dtype)
        new = out - (out @ u)[..., None] * u
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return [(module, hook) for _name, module in model.residual_writers()]


def export_model(model: Model, directions: str | Path, layer: int, out: str | Path) -> Path:
    """Write a Hugging Face directory of `model` with the refusal direction of `layer` (from the direction file)
    folded out of its weights, plus a card (README.md, csafety-edit.json) saying what changed and from what."""
    out = Path(out)
    if out.exists():
        raise ModelError(f"'{out}' exists: pass a new directory for the edited model")
    if not out.parent.is_dir():
        raise ModelError(f"cannot write '{out}': directory '{out.parent}' does not exist")
    bank = DirectionBank.load(directions)
    bank.check_model(model)
    summary = orthogonalize(model, bank.direction(model.check_layer(layer)))
    edit = {
        "edit": "directional ablation folded into the weights (weight orthogonalisation)",
        "base_model": model.model_id,
        "base_model_hash": model.model_hash,
        "direction_file": str(directions),
        "direction_file_sha256": file_sha256(Path(directions)),
        "direction_layer": layer,
        "direction_source": {k: bank.metadata.get(k, "") for k in ("model_id", "method", "position", "tool")},
        "modules_edited": len(summary["modules"]),
        "untied_embeddings": summary["untied_embeddings"],
        "tool": f"crystallized-safety {__version__}",
    }
    with atomic_dir(out) as tmp:
        save_pretrained(model.hf, model.tokenizer, tmp)
        (tmp / "csafety-edit.json").write_text(json.dumps(edit, indent=1) + "\n")
        (tmp / "README.md").write_text(_card(edit))
    return out


def _card(edit: dict) -> str:
    return (
        f"# {edit['base_model']}, refusal direction folded out\n\n"
        f"Made by {edit['tool']}: the unit direction of layer {edit['direction_layer']} from "
        f"`{edit['direction_file']}` (sha256 `{edit['direction_file_sha256']}`) was projected out of every "
        f"weight that writes into the residual stream ({edit['modules_edited']} modules: embeddings, attention "
        "and MLP output projections and their biases), so the model can no longer represent it "
        "(Arditi et al. 2024). "
        + (
            "Input and output embeddings were tied; they were untied first, so the LM head is unchanged. "
            if edit["untied_embeddings"]
            else ""
        )  # fmt: skip
        + f"Base model hash: `{edit['base_model_hash']}`.\n\nThis is a research artefact for studying refusal: "
        "it answers requests its base model refuses.\n"
    )
