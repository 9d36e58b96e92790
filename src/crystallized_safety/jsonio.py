"""Standard JSON out of everything the tool writes: NaN and infinities (which Python's json would print as
the non-standard `NaN` / `Infinity`) become null, so every consumer can parse what we emit."""

from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float (also numpy / torch scalars that behave as floats) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` that never writes NaN / Infinity (they become null)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
