"""Generation: the public `generate` (`api`), the reference engine (`reference`, plain `model.generate`), the
fast greedy engine (`fast`), the OOM policy (`oom`) and what they return (`output`)."""

from .api import generate
from .fast import FastEngine
from .output import Generation
from .reference import Decoding

__all__ = ["Decoding", "FastEngine", "Generation", "generate"]
