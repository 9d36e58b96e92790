"""One validation layer for the numbers and output paths a user gives, shared by the CLI's options and the spec's
fields, so that both accept and refuse exactly the same values with the same one-line message.

Why one layer: the same value used to be accepted in one place and refused in another (an alpha the CLI refused
passed a spec, then failed after a minute of work), and sampling values reached transformers unchecked (a
75-line traceback). Everything here is plain Python (no torch), so it runs before any heavy import or model load.

Output rule (every command that writes an artifact: extract, select, vectors export|import, export-model): an
existing output is never overwritten; the path must be new and writable, which is checked before the work, and a
write that still fails later is one line too.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from numbers import Real
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

from .errors import CrystallizedSafetyError

SEED_MAX = 2**32 - 1  # numpy's and most tools' seed range; control-direction seeds derived from it fit in int64
MAX_NEW_TOKENS = 4096  # longer answers say nothing more about refusal; the server's default max_tokens too
MAX_PROMPT_CHARS = 500_000  # ~128k tokens at ~4 characters a token: no model here reads a longer prompt
ALPHA_LIMITS = {"absolute": 1e6, "relative": 1e3}  # |alpha| beyond these only makes non-finite activations
TEMPERATURE_MAX = 2.0  # as the server (and the OpenAI API) bound it
T = TypeVar("T")


class InvalidValue(CrystallizedSafetyError):
    """A number or an output path outside what the tool can use; the message names the value and the fix."""


def is_int(value: object, low: int | None = None, high: int | None = None) -> TypeGuard[int]:
    """Whether `value` is an int within [low, high]: never a bool (YAML's `yes` is not 1), never a float. The one
    test behind every integer check; each caller keeps its own error type and message."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (low is None or value >= low)
        and (high is None or value <= high)
    )


def is_positive_int(value: object) -> TypeGuard[int]:
    """Whether `value` is an int >= 1 (a count, a batch size, a token budget); never a bool."""
    return is_int(value, low=1)


def is_real(value: object, *, finite: bool = False) -> TypeGuard[float]:
    """Whether `value` is a real number (int, float, numpy scalar: what `float()` takes exactly), never a bool;
    `finite`: and not NaN or inf (nor an int beyond the float range, such as JSON's 1 followed by 400 zeros)."""
    if not isinstance(value, Real) or isinstance(value, bool):
        return False
    try:
        return not finite or math.isfinite(float(value))
    except OverflowError:
        return False


def integer(value: object, what: str, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int within [low, high]; booleans and floats are refused (YAML's `yes` is not 1)."""
    if not is_int(value):
        raise InvalidValue(f"{what} must be an integer, got {str(value)[:40]!r}")
    if not is_int(value, low, high):
        bounds = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
        raise InvalidValue(f"{what} must be an integer {bounds}, got {str(value)[:40]}")
    return value


def positive_int(value: object, what: str) -> int:
    """An int >= 1 (counts, batch sizes, token budgets)."""
    return integer(value, what, low=1)


def finite(
    value: object,
    what: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
) -> float:
    """`value` as a finite float within [low, high] (`low_open`: (low, high]); NaN and inf are always refused."""
    if not is_real(value, finite=True):
        raise InvalidValue(f"{what} must be a finite number, got {str(value)[:40]}")
    number = float(value)
    if (low is not None and (number < low or (low_open and number == low))) or (high is not None and number > high):
        left = "(" if low_open else "["
        bounds = f"{left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"
        raise InvalidValue(f"{what} must be in {bounds}, got {number:g}")
    return number


def seed(value: object, what: str = "seed") -> int:
    """A seed in [0, SEED_MAX]: larger ones overflow the int64 seeds derived from them (a late traceback)."""
    return integer(value, what, 0, SEED_MAX)


def max_new_tokens(value: object, what: str = "max_new_tokens") -> int:
    return integer(value, what, 1, MAX_NEW_TOKENS)


def alpha(value: object, unit: str, what: str = "alpha") -> float:
    """A steering strength: finite and within the limit of its unit (absolute or relative)."""
    if unit not in ALPHA_LIMITS:
        raise InvalidValue(f"unknown alpha unit '{unit}': use absolute or relative")
    number = finite(value, what)
    limit = ALPHA_LIMITS[unit]
    if abs(number) > limit:
        raise InvalidValue(f"{what} {number:g} is out of range for {unit} alphas: use |{what}| <= {limit:g}")
    return number


def alphas(values: Iterable[object], unit: str, what: str = "alphas") -> list[float]:
    return [alpha(v, unit, what) for v in values]


def sampling(temperature: float, top_p: float, seed_value: int) -> None:
    """Sampling settings transformers accepts: temperature in (0, 2], top_p in (0, 1], a seed in range."""
    finite(temperature, "--temperature", 0.0, TEMPERATURE_MAX, low_open=True)
    finite(top_p, "--top-p", 0.0, 1.0, low_open=True)
    seed(seed_value, "--seed")


def prompt_lengths(texts: Iterable[str], what: str = "prompt") -> None:
    """No prompt beyond MAX_PROMPT_CHARS: refused before the model loads (its own context is checked after)."""
    for i, text in enumerate(texts):
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidValue(
                f"{what} {i + 1} is {len(text):,} characters, beyond the {MAX_PROMPT_CHARS:,} any model here reads: "
                "shorten it"
            )


def new_output(path: Path, what: str = "--out", *, directory: bool = False) -> Path:
    """Check, before any work, that `path` can be created: it does not exist (outputs are never overwritten),
    its parent is a directory (missing parents are created for files), and a file or directory can be made
    there (a probe, removed at once: permissions, read-only media, /proc)."""
    if path.exists() or path.is_symlink():
        kind = "a directory" if path.is_dir() else "a file"
        raise InvalidValue(f"{what} '{path}' exists ({kind}): pass a new path (outputs are never overwritten)")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InvalidValue(f"cannot write {what} '{path}': '{ancestor}' is a file, not a directory")
    if directory and ancestor != path.parent:
        raise InvalidValue(f"cannot write {what} '{path}': directory '{path.parent}' does not exist")
    try:
        if directory:
            path.mkdir()
            path.rmdir()
        elif ancestor == path.parent:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            path.unlink()
        else:
            tempfile.TemporaryFile(dir=ancestor).close()
    except OSError as exc:
        raise InvalidValue(f"cannot write {what} '{path}': {exc.strerror or exc}") from None
    return path


@contextmanager
def writing(path: Path, what: str = "--out") -> Iterator[None]:
    """A write that fails after the work (disk full, media gone) as one line instead of a traceback."""
    try:
        yield
    except OSError as exc:
        raise InvalidValue(f"cannot write {what} '{path}': {exc.strerror or exc}") from None


def for_pydantic(check: Callable[..., T], *args: Any) -> T:
    """Run a check inside a pydantic field validator: its InvalidValue becomes the ValueError pydantic reports with
    the field's location (`spec: generation.max_new_tokens: ...`), the message the CLI gives for the same value."""
    try:
        return check(*args)
    except InvalidValue as exc:
        raise ValueError(str(exc)) from None
