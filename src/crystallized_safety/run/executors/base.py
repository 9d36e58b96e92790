"""The executor interface: where packs run is the executor's business, results go to one sink."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from ...core.model import Model
from ...store import GenerationRow
from ..chunks import Pack
from ..worker import ModelContext

ResultSink = Callable[[Pack, list[list[GenerationRow]], float, str], None]  # pack, rows, seconds, worker


class Executor(Protocol):
    name: str

    def run(self, load: Callable[[], Model], ctx: ModelContext, packs: Sequence[Pack], sink: ResultSink) -> None:
        """Run every pack and hand each result to `sink` as it completes. `load()` gives the driver's model;
        a remote executor opens its own from `ctx` (model name, device, dtype)."""
        ...
