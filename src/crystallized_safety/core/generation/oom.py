"""Out-of-memory handling shared by every batched caller: halve the batch and retry, down to one row."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

R = TypeVar("R")


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is an accelerator (or host) out-of-memory error."""
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def in_batches(n: int, size: int, run: Callable[[slice], list[R]]) -> list[R]:
    """`run(rows)` over consecutive row slices of at most `size` rows, in order; on out-of-memory the size
    halves and the same rows are retried (anything else, or OOM on a single row, is raised)."""
    results: list[R] = []
    start, size = 0, max(1, size)
    while start < n:
        rows = slice(start, min(start + size, n))
        try:
            results.extend(run(rows))
        except Exception as exc:  # noqa: BLE001 - only OOM is handled, everything else re-raised
            if not is_oom(exc) or size == 1:
                raise
            size //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start = rows.stop
    return results
