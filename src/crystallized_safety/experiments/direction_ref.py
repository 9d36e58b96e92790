"""Which vector a condition steers along, typed: `DirectionRef` parses and prints the stored form
(`extracted`, `inverted`, `orthogonal:S`, `random:S`, `shared:L`, `subspace:K@L`, `transfer:MODEL`, `none`) in
one place. `subspace:K@L` is the K-dimensional refusal subspace of layer L (its vector: the subspace's first)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..core.directions import DirectionBank, orthogonal_direction, random_direction
from ..errors import LayerError

Kind = Literal["none", "extracted", "inverted", "orthogonal", "random", "shared", "subspace", "transfer"]
KINDS: tuple[str, ...] = ("none", "extracted", "inverted", "orthogonal", "random", "shared", "subspace", "transfer")
CONTROLS = ("orthogonal", "random")  # equal-norm control directions, one per seed


@dataclass(frozen=True)
class DirectionRef:
    kind: Kind
    arg: str = ""  # the seed (orthogonal, random), source layer (shared) or source model (transfer)

    @classmethod
    def parse(cls, text: str) -> DirectionRef:
        kind, _, arg = text.partition(":")
        if kind not in KINDS or bool(arg) != (kind in (*CONTROLS, "shared", "subspace", "transfer")):
            raise ValueError(f"unknown direction '{text}'")
        if kind == "subspace" and not all(part.isdigit() for part in arg.partition("@")[::2]):
            raise ValueError(f"direction '{text}' needs 'subspace:K@LAYER'")
        if kind in (*CONTROLS, "shared") and not arg.lstrip("-").isdigit():
            raise ValueError(f"direction '{text}' needs an integer after ':'")
        return cls(kind, arg)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind

    @property
    def is_control(self) -> bool:
        return self.kind in CONTROLS

    @property
    def is_transfer(self) -> bool:
        return self.kind == "transfer"

    @property
    def subspace(self) -> tuple[int, int]:
        """(K, source layer) of a `subspace:K@L` reference."""
        k, _, layer = self.arg.partition("@")
        return int(k), int(layer)

    def _seed(self, layer: int, seed: int) -> int:
        return 1000 * int(self.arg) + layer + 1_000_003 * seed

    def vector(
        self, bank: DirectionBank, layer: int, transfer: dict[str, DirectionBank] | None = None, seed: int = 0
    ) -> torch.Tensor:
        """The unit vector at `layer`. Control seeds are `1000 * S + layer`, offset by the spec's `seed`
        (0 keeps the seeds of earlier versions)."""
        if self.kind == "extracted":
            return bank.direction(layer)
        if self.kind == "inverted":
            return -bank.direction(layer)
        if self.kind == "orthogonal":
            return orthogonal_direction(bank.direction(layer), seed=self._seed(layer, seed))
        if self.kind == "random":
            return random_direction(bank.hidden_size, seed=self._seed(layer, seed))
        if self.kind == "shared":
            return bank.direction(int(self.arg))
        if self.kind == "subspace":
            k, source = self.subspace
            return bank.basis(source, k)[0]
        if self.kind == "transfer":
            if not transfer or self.arg not in transfer:
                raise LayerError(f"no transferred directions from '{self.arg}' were prepared")
            return transfer[self.arg].direction(layer)
        raise ValueError(f"direction '{self}' has no vector")
