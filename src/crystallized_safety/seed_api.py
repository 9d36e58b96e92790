"""The seed project's Python API, kept working as thin wrappers over the real design.

extractor = SteeringVectorExtractor("smollm2-135m"); extractor.load_model()
v = extractor.extract(harmful, harmless, layer=15)
steerer = ActivationSteerer("smollm2-135m", layer=15); steerer.load_model()
steerer.set_steering_vector(v); print(steerer.generate(prompt, alpha=-3.0))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .core.directions import DirectionBank, extract_directions
from .core.generation.api import generate
from .core.model import Model
from .core.steering import Intervention
from .errors import CrystallizedSafetyError, InterventionError
from .registry import load_model


class _Loaded:
    def __init__(self, model_name: str | Model, device: str = "auto", dtype: str = "auto") -> None:
        self.model_name = model_name
        self.device, self.dtype = device, dtype
        self.model: Model | None = model_name if isinstance(model_name, Model) else None

    def load_model(self):
        if self.model is None:
            self.model = load_model(str(self.model_name), device=self.device, dtype=self.dtype)
        return self

    def _require(self) -> Model:
        if self.model is None:
            raise CrystallizedSafetyError("call load_model() first")
        return self.model


class SteeringVectorExtractor(_Loaded):
    """Seed API: `extract(harmful, harmless, layer)` -> unit refusal direction (harmful - harmless)."""

    def extract(
        self,
        harmful: Sequence[str],
        harmless: Sequence[str],
        layer: int = 15,
        position: str | int = "last",
        method: str = "mean_diff",
    ) -> torch.Tensor:
        model = self._require()
        bank = extract_directions(model, harmful, harmless, layers=[layer], position=position, method=method)
        self.bank = bank
        return bank.direction(layer).clone()

    def extract_all(self, harmful: Sequence[str], harmless: Sequence[str], **kwargs) -> DirectionBank:
        """Every layer in one pass (the real API's DirectionBank)."""
        return extract_directions(self._require(), harmful, harmless, **kwargs)


class ActivationSteerer(_Loaded):
    """Seed API: `set_steering_vector(v)` then `generate(prompt, alpha)` adds alpha * v at `layer`."""

    def __init__(self, model_name: str | Model, layer: int = 15, device: str = "auto", dtype: str = "auto") -> None:
        super().__init__(model_name, device, dtype)
        self.layer = layer
        self.vector: torch.Tensor | None = None

    def set_steering_vector(self, vector: torch.Tensor | np.ndarray | Sequence[float] | str | Path) -> None:
        if isinstance(vector, (str, Path)):
            vector = DirectionBank.load(vector).direction(self.layer)
        tensor = torch.as_tensor(np.asarray(vector) if not isinstance(vector, torch.Tensor) else vector).float()
        if tensor.dim() != 1:
            raise InterventionError(f"steering vector must be 1-D [hidden], got shape {tuple(tensor.shape)}")
        if self.model is not None and tensor.shape[0] != self.model.hidden_size:
            raise InterventionError(
                f"steering vector has size {tensor.shape[0]} but the model's hidden size is {self.model.hidden_size}"
            )
        self.vector = tensor

    def generate(
        self, prompt: str | Sequence[str], alpha: float = -3.0, max_new_tokens: int = 64, mode: str = "add", **kwargs
    ) -> str | list[str]:
        model = self._require()
        model.check_layer(self.layer)
        if self.vector is None and alpha != 0:
            raise InterventionError("no steering vector set: call set_steering_vector(v) first")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        iv = Intervention.single(self.layer, self.vector, alpha, mode=mode) if self.vector is not None else None
        out = [g.response for g in generate(model, prompts, iv, max_new_tokens=max_new_tokens, **kwargs)]
        return out[0] if isinstance(prompt, str) else out
