"""Where packs run: in this process (`local`) or on a Ray cluster (`ray`), behind one interface (`base`)."""

from __future__ import annotations

from ...errors import CrystallizedSafetyError
from .base import Executor


def resolve_executor(name: str, address: str | None = None, workers: int | None = None) -> Executor:
    if name == "local":
        from .local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from .ray import RayExecutor

        return RayExecutor(address=address, workers=workers)
    raise CrystallizedSafetyError(f"unknown executor '{name}': use local or ray")
