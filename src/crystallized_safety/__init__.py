"""crystallized-safety: map how refusal is built into open-weight LLMs.

Public API (imported lazily so that `import crystallized_safety` stays cheap and torch-free):

    from crystallized_safety import load_model, extract_directions, Intervention, generate
    from crystallized_safety import SteeringVectorExtractor, ActivationSteerer   # the seed's API
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import CrystallizedSafetyError

__version__ = "0.1.0"

_EXPORTS = {
    "Model": "core.model",
    "decoder_layers": "core.model",
    "load_model": "registry",
    "registry": "registry",
    "capture": "core.activations",
    "DirectionBank": "core.directions",
    "extract_directions": "core.directions",
    "random_direction": "core.directions",
    "orthogonal_direction": "core.directions",
    "Intervention": "core.steering",
    "steer": "core.steering",
    "layer_hooks": "core.steering",
    "Generation": "core.generation",
    "generate": "core.generation",
    "PromptSet": "prompts",
    "load_prompts": "prompts",
    "bundled": "prompts",
    "SteeringVectorExtractor": "seed_api",
    "ActivationSteerer": "seed_api",
}

__all__ = ["CrystallizedSafetyError", "__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'crystallized_safety' has no attribute '{name}'")
