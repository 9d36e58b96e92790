"""Refusal directions per layer (`DirectionBank`), control directions, and their file format.

File format (safetensors, never pickle): tensors `directions` [L, d] (unit rows, sign harmful - harmless),
`mean_harmful` [L, d], `mean_harmless` [L, d], `raw_norms` [L] (|mean_harmful - mean_harmless|),
`resid_norms` [L] (mean residual norm, attention-sink token excluded), `layers` [L] (int64 layer indices),
optionally `subspace` [L, K, d] (orthonormal rows: the top-K right-singular vectors of the paired differences);
header metadata: model id and hash, layer convention, position, method, prompt-set hashes and counts,
tool version.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..errors import LayerError, VectorFileError
from ..prompts import PromptSet, as_prompt_set, check_contrast
from .activations import Captured, capture
from .model import LAYER_CONVENTION, Model

METHODS = ("mean_diff", "pca", "probe")
MAX_MAGNITUDE = 1e6
"""The largest norm a direction row, a mean (hence an affine target, the mean's projection) or a stored norm may
have. Why 1e6: real residual streams stay below ~1e4 in norm, massive activations included (a few dimensions of
a few thousand in 70B models), and float16 tops out at 65504; 1e6 leaves two orders of magnitude for any real
model, while a vector far beyond it (a crafted row of 1e30) leaves finite but meaningless logits (the final norm
overflows to zero: constant logits, token 0, exit 0). Such files are refused when loaded, before any model."""


@dataclass
class DirectionBank:
    """Unit directions for a set of layers, with the statistics they came from."""

    directions: torch.Tensor  # [L, d]
    layers: list[int]
    mean_harmful: torch.Tensor | None = None
    mean_harmless: torch.Tensor | None = None
    raw_norms: torch.Tensor | None = None
    resid_norms: torch.Tensor | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    any_layer: bool = False  # a single seed-style vector usable at whichever layer is asked for
    subspace: torch.Tensor | None = None  # [L, K, d]: a K-dimensional refusal subspace per layer

    @property
    def hidden_size(self) -> int:
        return int(self.directions.shape[1])

    def _row(self, layer: int) -> int:
        if self.any_layer:
            return 0
        if layer not in self.layers:
            raise LayerError(
                f"the direction file has no direction for layer {layer}; it holds layers {_span(self.layers)}"
            )
        return self.layers.index(layer)

    def direction(self, layer: int) -> torch.Tensor:
        return self.directions[self._row(layer)]

    def resid_norm(self, layer: int) -> float:
        if self.resid_norms is None:
            raise VectorFileError(
                "this direction file has no residual norms (files imported from other tools lack them): use "
                "--alpha-unit absolute, or extract directions with `csafety extract`"
            )
        return float(self.resid_norms[self._row(layer)])

    def basis(self, layer: int, k: int) -> torch.Tensor:
        """The first `k` orthonormal vectors [k, d] of the refusal subspace at `layer`."""
        if self.subspace is None or k > self.subspace.shape[1]:
            have = 0 if self.subspace is None else self.subspace.shape[1]
            raise VectorFileError(
                f"the direction file holds a {have}-dimensional refusal subspace, {k} asked: extract with "
                f"--subspace {k} (or a study asking for k = {k})"
            )
        return self.subspace[self._row(layer), :k]

    def harmless_mean(self, layer: int) -> torch.Tensor:
        """The mean residual of the harmless extraction prompts at `layer`."""
        if self.mean_harmless is None:
            raise VectorFileError("this direction file has no harmless mean: re-extract it with `csafety extract`")
        return self.mean_harmless[self._row(layer)]

    def harmless_projection(self, layer: int, vector: torch.Tensor | None = None) -> float:
        """Where harmless prompts sit on the direction (or on `vector`) at `layer`: the neutral target of affine
        ablation."""
        v = self.direction(layer) if vector is None else vector
        return float(self.harmless_mean(layer) @ v)

    def check_model(self, model: Model) -> None:
        if self.hidden_size != model.hidden_size:
            source = self.metadata.get("model_id", "another model")
            raise VectorFileError(
                f"direction file has hidden size {self.hidden_size} (from {source}) but {model.model_id} has "
                f"{model.hidden_size}: extract directions from this model, or use a transfer map"
            )
        for layer in self.layers:
            if not self.any_layer and layer >= model.n_layers:
                raise LayerError(
                    f"direction file holds layer {layer} but {model.model_id} has only {model.n_layers} layers"
                )

    # -- files
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise VectorFileError(
                f"direction files are safetensors: name the output '{path.with_suffix('.safetensors')}'"
            )
        tensors = {
            "directions": self.directions.float().contiguous(),
            "layers": torch.tensor(self.layers, dtype=torch.int64),
        }
        for name in ("mean_harmful", "mean_harmless", "raw_norms", "resid_norms", "subspace"):
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value.float().contiguous()
        meta = {**self.metadata, "layers": json.dumps(self.layers), "any_layer": json.dumps(self.any_layer)}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})
        return path

    @classmethod
    def load(cls, path: str | Path) -> DirectionBank:
        """Load a `.safetensors` bank, or a seed-style `.pt` tensor through `weights_only=True` (no unpickling)."""
        path = Path(path)
        if not path.is_file():
            raise VectorFileError(f"direction file '{path}' does not exist")
        if path.suffix in (".pt", ".pth"):
            return cls._load_pt(path)
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
                tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise VectorFileError(
                f"'{path}' is not a valid safetensors direction file ({str(exc).splitlines()[0]}); re-create it with "
                "`csafety extract`"
            ) from None
        if "directions" not in tensors:
            raise VectorFileError(f"'{path}' has no 'directions' tensor; re-create it with `csafety extract`")
        directions = _check_matrix(tensors["directions"], path)
        layer_list = _check_layers(tensors.get("layers"), directions.shape[0], path)
        extras = {}
        for name, shape in (("mean_harmful", directions.shape), ("mean_harmless", directions.shape)):
            extras[name] = _check_extra(tensors.get(name), name, shape, path)
        for name in ("raw_norms", "resid_norms"):
            extras[name] = _check_extra(tensors.get(name), name, directions.shape[:1], path, positive=True)
        sub = tensors.get("subspace")
        if sub is not None:
            k = sub.shape[1] if sub.dim() == 3 else 0
            shape = torch.Size((directions.shape[0], k, directions.shape[1]))
            extras["subspace"] = _check_extra(sub, "subspace", shape, path)
        any_layer = meta.pop("any_layer", "false")
        if any_layer not in ("true", "false"):
            raise VectorFileError(f"'{path}' has metadata any_layer={any_layer[:40]!r}: expected true or false")
        meta.pop("layers", None)
        return cls(directions=directions, layers=layer_list, metadata=meta, any_layer=any_layer == "true", **extras)

    @classmethod
    def _load_pt(cls, path: Path) -> DirectionBank:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - anything beyond plain tensors is refused
            raise VectorFileError(
                f"'{path}' is not a plain tensor file ({type(exc).__name__}); only tensors saved with "
                "torch.save(tensor) "
                "load, nothing is unpickled — or convert it to safetensors"
            ) from None
        if isinstance(obj, dict) and len(obj) == 1:
            obj = next(iter(obj.values()))
        if not isinstance(obj, torch.Tensor):
            raise VectorFileError(f"'{path}' holds a {type(obj).__name__}, not a tensor of shape [d] or [L, d]")
        if obj.dim() == 1:
            directions = _check_matrix(obj.unsqueeze(0), path)
            return cls(directions=directions, layers=[0], any_layer=True, metadata={"source": str(path)})
        directions = _check_matrix(obj, path)
        return cls(directions=directions, layers=list(range(directions.shape[0])), metadata={"source": str(path)})


def _check_matrix(tensor: torch.Tensor, path: Path) -> torch.Tensor:
    if tensor.dim() != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise VectorFileError(f"'{path}' directions must have shape [layers, hidden], got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise VectorFileError(
            f"'{path}' directions are {str(tensor.dtype).removeprefix('torch.')}, not floating point (quantised "
            "directions lose the direction): save them as float32"
        )
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise VectorFileError(f"'{path}' contains NaN or inf values; re-create it with `csafety extract`")
    zero = (tensor.norm(dim=-1) == 0).nonzero().flatten().tolist()
    if zero:
        raise VectorFileError(f"'{path}' has all-zero directions (rows {_span(zero)}): steering with them does nothing")
    _check_magnitude(tensor, "directions", path)
    return tensor


def _check_magnitude(tensor: torch.Tensor, name: str, path: Path) -> None:
    """Each row's norm (each value, for a 1-D tensor of norms) at most MAX_MAGNITUDE (computed in float64: a row
    of 1e30 would overflow float32's square)."""
    sizes = tensor.double().abs() if tensor.dim() == 1 else tensor.double().flatten(1).norm(dim=-1)
    if sizes.numel() and float(sizes.max()) > MAX_MAGNITUDE:
        rows = (sizes > MAX_MAGNITUDE).nonzero().flatten().tolist()
        raise VectorFileError(
            f"'{path}' '{name}' has magnitude {float(sizes.max()):.3g} (rows {_span(rows)}), beyond the "
            f"{MAX_MAGNITUDE:g} of any real residual stream: the file is corrupt or crafted; re-create it with "
            "`csafety extract`"
        )


def _check_layers(layers: torch.Tensor | None, rows: int, path: Path) -> list[int]:
    """The file's layer indices: 1-D integers, one per row, distinct, >= 0 (absent: 0..rows-1)."""
    if layers is None:
        return list(range(rows))
    if layers.dim() != 1 or layers.is_floating_point() or layers.dtype == torch.bool:
        raise VectorFileError(
            f"'{path}' 'layers' must be a 1-D integer tensor, got {layers.dtype} {tuple(layers.shape)}"
        )
    found = [int(x) for x in layers.tolist()]
    if len(found) != rows:
        raise VectorFileError(f"'{path}' is inconsistent: {len(found)} layer indices for {rows} rows")
    if min(found) < 0 or len(set(found)) != len(found):
        raise VectorFileError(f"'{path}' 'layers' must be distinct layer indices >= 0, got {_span(found)}")
    return found


def _check_extra(
    tensor: torch.Tensor | None, name: str, shape: torch.Size, path: Path, positive: bool = False
) -> torch.Tensor | None:
    """An optional statistic (means, norms): the right shape, floating point, finite (norms also > 0)."""
    if tensor is None:
        return None
    if tuple(tensor.shape) != tuple(shape) or not tensor.is_floating_point():
        raise VectorFileError(
            f"'{path}' is inconsistent: '{name}' is {str(tensor.dtype).removeprefix('torch.')} "
            f"{tuple(tensor.shape)}, expected floating point {tuple(shape)}"
        )
    tensor = tensor.float()
    if not torch.isfinite(tensor).all() or (positive and not (tensor > 0).all()):
        need = "finite and > 0" if positive else "finite"
        raise VectorFileError(f"'{path}' '{name}' must be {need}; re-create the file with `csafety extract`")
    _check_magnitude(tensor, name, path)
    return tensor


def _span(layers: Sequence[int]) -> str:
    return ",".join(map(str, layers)) if len(layers) < 12 else f"{layers[0]}..{layers[-1]} ({len(layers)} layers)"


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def pca_basis(harm: torch.Tensor, harmless: torch.Tensor, diff: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Top-`k` right-singular vectors [L, k, d] of the (uncentred) paired differences harmful_i - harmless_i per
    layer, each sign-aligned to the mean difference `diff`; orthonormal rows.

    Uncentred on purpose: centring would remove the mean difference, which is the signal.
    """
    n = min(harm.shape[0], harmless.shape[0])
    if not 1 <= k <= min(n, harm.shape[-1]):
        raise VectorFileError(f"a {k}-dimensional subspace needs at least {k} prompt pairs, got {n}")
    paired = (harm[:n] - harmless[:n]).transpose(0, 1)  # [L, n, d]
    _, _, vh = torch.linalg.svd(paired.double(), full_matrices=False)
    top = vh[:, :k, :]
    sign = torch.sign((top * diff.double()[:, None, :]).sum(-1, keepdim=True))
    sign[sign == 0] = 1
    return (top * sign).float()


def _pca_directions(harm: torch.Tensor, harmless: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """First right-singular vector of the paired differences, per layer, sign-aligned to diff."""
    return _unit(pca_basis(harm, harmless, diff, 1)[:, 0])


def fit_probe(
    pos: torch.Tensor, neg: torch.Tensor, l2: float = 1e-3, steps: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer L2-regularised logistic regression (pos = 1) on [N, L, d] activations.

    Returns raw-unit weights [L, d] and biases [L]: logit = x @ w + b. Standardised inside for conditioning.
    """
    x = torch.cat([pos, neg]).transpose(0, 1).double()  # [L, N, d]
    y = torch.cat([torch.ones(pos.shape[0]), torch.zeros(neg.shape[0])]).double()
    mu, sd = x.mean(1, keepdim=True), x.std(1, keepdim=True).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(x.shape[0], 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = torch.einsum("lnd,ld->ln", z, w) + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.expand_as(logits)) * x.shape[0]
        loss = loss + l2 * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_raw = w.detach() / sd.squeeze(1)
    b_raw = b.detach().squeeze(1) - (mu.squeeze(1) * w_raw).sum(-1)
    return w_raw.float(), b_raw.float()


def _probe_directions(harm: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """Unit weight vectors of per-layer logistic probes (harmful = 1)."""
    return _unit(fit_probe(harm, harmless)[0])


def extract_directions(
    model: Model,
    harmful: PromptSet | Sequence[str],
    harmless: PromptSet | Sequence[str],
    *,
    layers: str | Sequence[int] | None = None,
    position: str | int = "last",
    method: str = "mean_diff",
    batch_size: int = 16,
    system: str | None = None,
    raw: bool = False,
    subspace: int = 0,
    on_capture: Callable[[Captured, Captured], None] | None = None,
) -> DirectionBank:
    """Directions for every chosen layer from ONE batched pass over each prompt set (and, with `subspace` = K,
    the K-dimensional refusal subspace per layer from the same activations). `on_capture(harmful, harmless)` gets
    the captured activations, for a caller that reads them too (the runner's readability probes), so that no
    second pass over the same prompts is needed."""
    harmful_set, harmless_set = as_prompt_set(harmful, "harmful"), as_prompt_set(harmless, "harmless")
    check_contrast(harmful_set, harmless_set)
    if method not in METHODS:
        raise VectorFileError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    layer_list = model.parse_layers(layers)

    def cap(prompts):
        return capture(
            model, prompts, layers=layer_list, position=position, batch_size=batch_size, system=system, raw=raw
        )

    cap_h, cap_n = cap(list(harmful_set)), cap(list(harmless_set))
    if on_capture is not None:
        on_capture(cap_h, cap_n)
    mean_h, mean_n = cap_h.acts.mean(0), cap_n.acts.mean(0)
    diff = mean_h - mean_n
    if method == "mean_diff":
        directions = _unit(diff)
    elif method == "pca":
        directions = _pca_directions(cap_h.acts, cap_n.acts, diff)
    else:
        directions = _probe_directions(cap_h.acts, cap_n.acts)
    n_h, n_n = len(harmful_set), len(harmless_set)
    resid = (cap_h.resid_norm * n_h + cap_n.resid_norm * n_n) / (n_h + n_n)
    metadata = {
        **model.metadata(),
        "layer_convention": LAYER_CONVENTION,
        "position": str(cap_h.position),
        "method": method,
        "sign": "harmful - harmless (+alpha reinforces refusal)",
        "harmful_sha256": harmful_set.sha256,
        "harmless_sha256": harmless_set.sha256,
        "harmful_count": str(n_h),
        "harmless_count": str(n_n),
        "chat_template": "raw" if raw else "model",
        "system_prompt": system or "",
        "tool_version": __version__,
    }
    return DirectionBank(
        directions=directions,
        layers=layer_list,
        mean_harmful=mean_h,
        mean_harmless=mean_n,
        raw_norms=diff.norm(dim=-1),
        resid_norms=resid,
        metadata=metadata,
        subspace=pca_basis(cap_h.acts, cap_n.acts, diff, subspace) if subspace else None,
    )


# --------------------------------------------------------------------------- controls


def random_direction(hidden_size: int, seed: int) -> torch.Tensor:
    """A seeded, uniformly random unit direction (Gaussian, normalised)."""
    gen = torch.Generator().manual_seed(int(seed))
    return _unit(torch.randn(hidden_size, generator=gen, dtype=torch.float64)).float()


def orthogonal_direction(direction: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded random unit direction exactly orthogonal to `direction` (Gram-Schmidt in float64)."""
    ref = _unit(direction.double().flatten())
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(ref.shape[0], generator=gen, dtype=torch.float64)
    x = x - (x @ ref) * ref
    return _unit(x).float()
