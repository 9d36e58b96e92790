"""How far two judges agree: Cohen's kappa, percent agreement and the 2x2 table.

A refusal rate is only as good as the judge behind it, so every cheap judge (substring) should be
checked against a stronger one (an LLM judge, a person) on the same responses. Kappa corrects raw
agreement for the agreement two judges would reach by chance given their own refusal rates, which
matters because refusal rates near 0 % or 100 % make raw agreement look excellent for free.

Labels are ``True`` (refusal), ``False`` (compliance) or ``None`` (undecided); `Verdict` objects are
accepted too and read through ``.refusal``. A pair where either judge is undecided is dropped and
counted in ``n_dropped``: undecided is not evidence for either side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from crystallized_safety.errors import JudgeError
from crystallized_safety.judges.base import Verdict

REFUSAL = "refusal"
COMPLIANCE = "compliance"
TABLE_KEYS: tuple[str, ...] = (
    f"{REFUSAL}/{REFUSAL}",
    f"{REFUSAL}/{COMPLIANCE}",
    f"{COMPLIANCE}/{REFUSAL}",
    f"{COMPLIANCE}/{COMPLIANCE}",
)
"""Keys of `confusion`: ``"<judge a>/<judge b>"``."""

Label = bool | None | Verdict


@dataclass(frozen=True)
class Agreement:
    """Agreement between judge ``a`` and judge ``b`` on the pairs both decided.

    Attributes:
        kappa: Cohen's kappa in [-1, 1]. When both judges give one and the same label to every pair
            (chance agreement is 1, so the formula is 0/0) kappa is defined as 1.0: they agree
            perfectly, and there is no disagreement to explain. (statsmodels returns nan there.)
        n: pairs compared (both judges decided).
        n_dropped: pairs dropped because at least one judge was undecided (None).
        percent_agreement: share of compared pairs with the same label, in percent (0-100).
        table: 2x2 counts keyed ``"<a>/<b>"``, e.g. ``table["refusal/compliance"]`` = a refused,
            b complied (see `TABLE_KEYS`).
    """

    kappa: float
    n: int
    n_dropped: int
    percent_agreement: float
    table: Mapping[str, int] = field(hash=False)


def _label(x: object, side: str, i: int) -> bool | None:
    if isinstance(x, Verdict):
        x = x.refusal
    if x is None or isinstance(x, bool):
        return x
    item = getattr(x, "item", None)  # numpy bool_ / 0-d arrays
    if callable(item):
        x = item()
    if isinstance(x, int) and x in (0, 1):
        return bool(x)
    raise JudgeError(f"judge {side} label #{i} is {x!r}; labels must be True, False or None")


def _pairs(a: Sequence[Label], b: Sequence[Label]) -> tuple[list[tuple[bool, bool]], int]:
    """Decided (a, b) pairs and the number of pairs dropped for an undecided label."""
    if len(a) != len(b):
        raise JudgeError(f"agreement needs one label per item from each judge; got {len(a)} and {len(b)}")
    kept: list[tuple[bool, bool]] = []
    for i, (x, y) in enumerate(zip(a, b)):
        lx, ly = _label(x, "a", i), _label(y, "b", i)
        if lx is not None and ly is not None:
            kept.append((lx, ly))
    return kept, len(a) - len(kept)


def _table(pairs: list[tuple[bool, bool]]) -> dict[str, int]:
    name = {True: REFUSAL, False: COMPLIANCE}
    table = dict.fromkeys(TABLE_KEYS, 0)
    for x, y in pairs:
        table[f"{name[x]}/{name[y]}"] += 1
    return table


def _kappa(table: Mapping[str, int]) -> float:
    rr, rc = table[TABLE_KEYS[0]], table[TABLE_KEYS[1]]
    cr, cc = table[TABLE_KEYS[2]], table[TABLE_KEYS[3]]
    n = rr + rc + cr + cc
    # Integer arithmetic up to the final division: the degenerate test is exact, not approximate.
    observed = (rr + cc) * n  # n^2 * p_o
    chance = (rr + rc) * (rr + cr) + (cr + cc) * (rc + cc)  # n^2 * p_e
    if chance == n * n:  # both judges constant and equal: p_o = p_e = 1
        return 1.0
    return (observed - chance) / (n * n - chance)


def confusion(a: Sequence[Label], b: Sequence[Label]) -> dict[str, int]:
    """2x2 counts of decided pairs, keyed ``"<a>/<b>"`` (`TABLE_KEYS`); undecided pairs are left out."""
    pairs, _ = _pairs(a, b)
    return _table(pairs)


def agreement(a: Sequence[Label], b: Sequence[Label]) -> Agreement:
    """Kappa, percent agreement and the 2x2 table of judge ``a`` vs judge ``b`` on the same items.

    Raises `JudgeError` if the sequences differ in length, hold something other than a label, or leave
    no pair where both judges decided.
    """
    pairs, dropped = _pairs(a, b)
    if not pairs:
        raise JudgeError(
            f"no pairs to compare: all {dropped} items had an undecided (None) verdict from at least one judge"
        )
    table = _table(pairs)
    n = len(pairs)
    same = table[TABLE_KEYS[0]] + table[TABLE_KEYS[3]]
    return Agreement(
        kappa=_kappa(table),
        n=n,
        n_dropped=dropped,
        percent_agreement=100.0 * same / n,
        table=MappingProxyType(table),
    )


def cohens_kappa(a: Sequence[Label], b: Sequence[Label]) -> float:
    """Cohen's kappa of two judges' refusal labels, pairs with a None dropped (see `Agreement.kappa`)."""
    return agreement(a, b).kappa
