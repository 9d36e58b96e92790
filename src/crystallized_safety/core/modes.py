"""Steering modes: one object per mode, registered once in `MODES`.

A mode is an operator on the residual stream: how it changes a hidden state (`operator`), what it needs beyond
a direction and an alpha (its parameters: `params_type`, checked by `take`; read from a direction file by
`bind`), and how it is named (its `name`: the same in YAML `mode:`, on the CLI's `--mode`, in an `Intervention`
and in a stored condition). The spec's choices, the CLI's `--mode`, conditions and the report all read this
registry, so adding a mode is one `register(...)` here (plus its tests).

    add         h + a v
    ablate      h - (h.u - t) u, t = 0 or given per layer (or a subspace's coordinates set to targets)
    ablate_add  ablate, then add
    affine      ablate to where harmless prompts sit (t = the harmless mean's projection, ACE)
    rotate      h's component in the plane (v, p) turned to a degrees from v, its norm kept (angular steering)

Importing this module does not import torch (the CLI builds `--mode`'s help from it before any heavy import).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import InterventionError

if TYPE_CHECKING:
    import torch

Operator = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]  # (hidden, direction on its device) -> hidden


class Steered(Protocol):
    """What an operator reads of the intervention it belongs to (`core.steering.Intervention`)."""

    directions: dict[int, torch.Tensor]
    alpha: float | torch.Tensor
    alpha_unit: str
    params: Any

    def effective_alpha(self, layer: int) -> float | torch.Tensor: ...


class HarmlessSource(Protocol):
    """What `bind` reads of a direction file (`core.directions.DirectionBank`)."""

    def harmless_mean(self, layer: int) -> torch.Tensor: ...

    def harmless_projection(self, layer: int, vector: torch.Tensor | None = None) -> float: ...


def as_vector(value: torch.Tensor | Sequence[float], what: str) -> torch.Tensor:
    """A finite [d] vector (non-zero) or [rows, d] matrix, as float32, or one clear error."""
    import torch

    tensor = torch.as_tensor(value, dtype=torch.float32).detach()
    if tensor.dim() not in (1, 2):
        raise InterventionError(f"{what} must be a [d] vector or a [batch, d] matrix, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise InterventionError(f"{what} contains NaN or inf values: re-extract or check the vector file")
    if tensor.dim() == 1 and tensor.norm() == 0:  # per-row matrices hold zero rows for unsteered cells
        raise InterventionError(f"{what} is all zeros: steering with it changes nothing")
    return tensor


def check_numbers(values, what: str, limit: float | None = None, positive: bool = False) -> None:
    """Every value finite (and within +-limit, and > 0 where asked), or one clear error."""
    import torch

    tensor = torch.as_tensor(values, dtype=torch.float64).flatten()
    if not torch.isfinite(tensor).all():
        raise InterventionError(f"{what} must be finite numbers, got NaN or inf")
    if limit is not None and (tensor.abs() > limit).any():
        raise InterventionError(f"{what} {float(tensor.abs().max()):g} is out of range: use |{what}| <= {limit:g}")
    if positive and not (tensor > 0).all():
        raise InterventionError(f"{what} must be > 0: re-extract the direction file with `csafety extract`")


def row_broadcast(x: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """Scalar stays scalar (exact h + a*v arithmetic); [B] -> [B, 1, 1]; [B, d] -> [B, 1, d]."""
    if isinstance(x, (int, float)):
        return x
    x = x.to(device=like.device, dtype=like.dtype)
    return x.view(x.shape[0], 1, *x.shape[1:]) if x.dim() == 2 else x.view(-1, 1, 1)


def rotate(hidden: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, cos: float, sin: float) -> torch.Tensor:
    """Each activation's component in the plane (b1, b2) turned to the angle (cos, sin) from b1, its length kept;
    the rest of the activation untouched (so the norm is preserved exactly, up to rounding)."""
    x1 = (hidden * b1).sum(-1, keepdim=True)
    x2 = (hidden * b2).sum(-1, keepdim=True)
    r = (x1 * x1 + x2 * x2).sqrt()
    return hidden + (r * cos - x1) * b1 + (r * sin - x2) * b2


# ----------------------------------------------------------------------------------------------- parameters


@dataclass
class Ablation:
    """Parameters of the ablating modes, per layer: `ablate_to`, the projection's value after ablation (default 0;
    the harmless mean's avoids pushing harmless prompts towards refusal: on the organism they project below zero);
    `basis`, an orthonormal [k, d] basis of a refusal subspace whose k coordinates are set to `basis_targets`
    (default zeros) instead of one projection (the intervention's direction is then the basis's first vector)."""

    ablate_to: dict[int, float] = field(default_factory=dict)
    basis: dict[int, torch.Tensor] = field(default_factory=dict)
    basis_targets: dict[int, torch.Tensor] = field(default_factory=dict)

    def check(self) -> None:
        import torch

        check_numbers(list(self.ablate_to.values()), "ablation target")
        for k, b in self.basis.items():
            if b.dim() != 2 or not torch.allclose(b @ b.T, torch.eye(b.shape[0]), atol=1e-4):
                raise InterventionError(f"layer {k}: a subspace basis must be orthonormal rows [k, d]")
            target = self.basis_targets.get(k)
            if target is not None and tuple(target.shape) != (b.shape[0],):
                raise InterventionError(f"layer {k}: {b.shape[0]} subspace targets needed, got {tuple(target.shape)}")


@dataclass
class Rotation:
    """Parameters of rotate (angular steering), per layer: a second vector, which with the direction spans the plane
    each activation's component is rotated in (to alpha degrees from the direction, towards the vector's side)."""

    planes: dict[int, torch.Tensor] = field(default_factory=dict)

    def check(self) -> None:
        self.planes = {int(k): as_vector(v, f"plane vector for layer {k}") for k, v in self.planes.items()}


# ---------------------------------------------------------------------------------------------------- modes


@dataclass(frozen=True)
class Mode(ABC):
    """A steering mode. `help`: what `--mode`'s help adds after the name; `study`: a study's `mode:` may name it
    (its alpha is a strength in the study's unit); `adds` / `ablates`: it adds alpha x the direction / sets the
    projection on it (or a subspace's coordinates) to a target; `angle`: alpha is an angle in degrees (one number,
    unit absolute); `harmless`: it reads the harmless mean from the direction file; `packs`: its effect is
    effective alpha x the direction, so cells fold into per-row vectors and share one batch
    (`core.steering.pack_interventions`); `label`: its name in a results table (default: the name)."""

    name: str
    help: str = ""
    study: bool = True
    adds: bool = False
    ablates: bool = False
    angle: bool = False
    harmless: bool = False
    packs: bool = False
    label: str = ""
    params_type: type | None = None  # its parameters (None: a direction and an alpha suffice)

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name)

    def __str__(self) -> str:
        return self.name

    def take(self, params: Any = None, keywords: Mapping[str, Any] | None = None) -> Any:
        """This mode's parameters, checked: `params` as given, or built from keywords (`ablate_to=...`)."""
        keywords = dict(keywords or {})
        if params is not None and keywords:
            raise InterventionError(f"give mode {self.name}'s parameters as params= or as keywords, not both")
        if self.params_type is None:
            if params is not None or keywords:
                given = ", ".join(keywords) or type(params).__name__
                raise InterventionError(f"mode {self.name} takes no parameters beyond a direction and alpha: {given}")
            return None
        if params is None:
            allowed = [f.name for f in fields(self.params_type)]
            unknown = [k for k in keywords if k not in allowed]
            if unknown:
                raise InterventionError(f"mode {self.name} takes {', '.join(allowed)}, not {', '.join(unknown)}")
            params = self.params_type(**keywords)
        elif not isinstance(params, self.params_type):
            raise InterventionError(f"mode {self.name} takes {self.params_type.__name__} params, not {params!r}")
        params.check()
        return params

    def check(self, iv: Steered) -> None:  # noqa: B027 - a hook: most modes need nothing more
        """What this mode needs of the whole intervention (alpha, unit, a parameter per layer); by default nothing."""

    def bind(
        self,
        bank: HarmlessSource,
        directions: Mapping[int, torch.Tensor],
        basis: Mapping[int, torch.Tensor] | None = None,
        to_harmless: bool = False,
    ) -> Any:
        """The parameters this mode reads from a direction file for `directions` (a subspace `basis` where one is
        ablated; `to_harmless`: ablate to the harmless mean, the CLI's `--ablate-to harmless-mean`)."""
        return None

    @abstractmethod
    def operator(self, iv: Steered, layer: int) -> Operator:
        """The function that changes a hidden state at `layer`: (hidden, the direction on its device and dtype, one
        per row as [rows, 1, d] where per-row) -> the new hidden state. Every mode defines it."""


@dataclass(frozen=True)
class Add(Mode):
    def operator(self, iv: Steered, layer: int) -> Operator:
        alpha = iv.effective_alpha(layer)
        return lambda hidden, v: hidden + row_broadcast(alpha, hidden) * v


@dataclass(frozen=True)
class Ablate(Mode):
    """Sets the projection on the direction (or a subspace's coordinates) to a target; then adds where `adds`;
    `harmless`: the target is where harmless prompts sit (affine ablation)."""

    def check(self, iv: Steered) -> None:
        if not self.harmless:
            return
        params: Ablation = iv.params
        have = params.basis_targets if params.basis else params.ablate_to
        missing = [k for k in iv.directions if k not in have]
        if missing:
            raise InterventionError(
                f"mode {self.name} ablates to where harmless prompts sit: give its targets for layers {missing} "
                "(a direction file's harmless_projection, or the mode's bind())"
            )

    def bind(self, bank, directions, basis=None, to_harmless=False) -> Ablation:
        affine = self.harmless or to_harmless
        if basis:
            targets = {k: b @ bank.harmless_mean(k) for k, b in basis.items()} if affine else {}
            return Ablation(basis=dict(basis), basis_targets=targets)
        return Ablation(ablate_to={k: bank.harmless_projection(k, v) for k, v in directions.items()} if affine else {})

    def operator(self, iv: Steered, layer: int) -> Operator:
        params: Ablation = iv.params
        basis, basis_target = params.basis.get(layer), params.basis_targets.get(layer)
        target = float(params.ablate_to.get(layer, 0.0))
        alpha = iv.effective_alpha(layer) if self.adds else None

        def ablate(hidden: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if basis is not None:
                b = basis.to(device=hidden.device, dtype=hidden.dtype)
                coords = hidden @ b.T  # [..., k]
                if basis_target is not None:
                    coords = coords - basis_target.to(device=hidden.device, dtype=hidden.dtype)
                out = hidden - coords @ b
            else:
                unit = v / v.norm(dim=-1, keepdim=True)
                proj = (hidden * unit).sum(dim=-1, keepdim=True)
                out = hidden - (proj - target) * unit
            return out if alpha is None else out + row_broadcast(alpha, hidden) * v

        return ablate


@dataclass(frozen=True)
class Rotate(Mode):
    def check(self, iv: Steered) -> None:
        if iv.alpha_unit != "absolute" or not isinstance(iv.alpha, (int, float)):
            raise InterventionError(f"{self.name} takes one angle in degrees as alpha, with alpha_unit absolute")
        planes = iv.params.planes
        missing = [k for k in iv.directions if k not in planes]
        if missing:
            raise InterventionError(f"{self.name} needs a plane vector for layers {missing}")
        for k, v in iv.directions.items():
            unit = v / v.norm()
            rest = planes[k] - (planes[k] @ unit) * unit
            if v.dim() != 1 or rest.norm() < 1e-6 * planes[k].norm():
                raise InterventionError(
                    f"layer {k}: the plane vector is parallel to the direction: no plane to rotate in"
                )

    def bind(self, bank, directions, basis=None, to_harmless=False) -> Rotation:
        return Rotation(planes={k: bank.harmless_mean(k) for k in directions})

    def operator(self, iv: Steered, layer: int) -> Operator:
        b1 = iv.directions[layer] / iv.directions[layer].norm()
        plane = iv.params.planes[layer]
        rest = plane - (plane @ b1) * b1
        b2 = rest / rest.norm()
        theta = math.radians(float(iv.alpha))  # checked: one number
        cos, sin = math.cos(theta), math.sin(theta)
        return lambda hidden, v: rotate(
            hidden, b1.to(hidden.device, hidden.dtype), b2.to(hidden.device, hidden.dtype), cos, sin
        )


# ------------------------------------------------------------------------------------------------- registry

MODES: dict[str, Mode] = {}


def register(mode: Mode) -> Mode:
    """Add a mode to the registry (its name must be new): from then on YAML, the CLI and `Intervention` accept it."""
    if mode.name in MODES:
        raise InterventionError(f"a mode named '{mode.name}' is already registered")
    MODES[mode.name] = mode
    return mode


def names(keep: Callable[[Mode], bool] | None = None) -> list[str]:
    """The registered modes' names (those `keep` accepts), in registration order."""
    return [name for name, m in MODES.items() if keep is None or keep(m)]


def one_of(choices: Sequence[str]) -> str:
    """'a, b or c'."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else "".join(choices)


def mode(name: str | Mode) -> Mode:
    """The mode named `name` (a Mode is returned as is), or one line listing the valid names."""
    if isinstance(name, Mode):
        return name
    found = MODES.get(name) if isinstance(name, str) else None
    if found is None:
        raise InterventionError(f"unknown mode '{name}': use one of {', '.join(MODES)}")
    return found


def is_ablation(m: Mode) -> bool:
    """Ablation alone (the ablation and subspace studies' `modes:`)."""
    return m.ablates and not m.adds


ADD = register(Add("add", adds=True, packs=True))
ABLATE = register(Ablate("ablate", ablates=True, label="zero", params_type=Ablation))
ABLATE_ADD = register(Ablate("ablate_add", adds=True, ablates=True, params_type=Ablation))
AFFINE = register(
    Ablate(
        "affine",
        help="ablate to the harmless mean",
        ablates=True,
        harmless=True,
        label="affine (harmless mean)",
        params_type=Ablation,
    )
)
ROTATE = register(
    Rotate(
        "rotate",
        help="angular steering: --alpha is the angle in degrees from the direction, in its plane with the harmless "
        "mean; the norm is kept",
        study=False,
        angle=True,
        harmless=True,
        params_type=Rotation,
    )
)
