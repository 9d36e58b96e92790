"""Standard JSON out of everything the tool writes: NaN and infinities (which Python's json would print as
the non-standard `NaN` / `Infinity`) become null, so every consumer can parse what we emit. And JSONL in
(`objects`): one object per line, each problem one line naming the file and the line."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
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


def objects(text: str, where: str, error: type[Exception], what: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line of a JSONL text (split on newlines only: U+2028 may sit inside a
    string); a line that is not a JSON object raises `error`, one line saying what each line needs (`what`)."""
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where} line {number} is not valid JSON ({exc.msg}): write one object per line") from None
        if not isinstance(record, dict):
            raise error(f"{where} line {number} is not a JSON object: each line needs {what}")
        yield number, record
