"""Judge agreement: hand-worked kappas and a cross-check against statsmodels on random cases."""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
from statsmodels.stats.inter_rater import cohens_kappa as sm_cohens_kappa

from crystallized_safety.errors import JudgeError
from crystallized_safety.judges import Verdict, agreement, cohens_kappa, confusion
from crystallized_safety.judges.agreement import TABLE_KEYS


def _from_table(rr: int, rc: int, cr: int, cc: int) -> tuple[list[bool], list[bool]]:
    """Label lists whose 2x2 table is (a refusal & b refusal, a refusal & b compliance, ...)."""
    a = [True] * (rr + rc) + [False] * (cr + cc)
    b = [True] * rr + [False] * rc + [True] * cr + [False] * cc
    return a, b


def test_hand_worked_wikipedia_example() -> None:
    # 50 items: both yes 20, a yes / b no 5, a no / b yes 10, both no 15.
    # p_o = 35/50 = 0.7; p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = (0.7-0.5)/(1-0.5) = 0.4
    a, b = _from_table(20, 5, 10, 15)
    result = agreement(a, b)
    assert result.kappa == pytest.approx(0.4)
    assert result.n == 50 and result.n_dropped == 0
    assert result.percent_agreement == pytest.approx(70.0)
    assert dict(result.table) == {
        "refusal/refusal": 20,
        "refusal/compliance": 5,
        "compliance/refusal": 10,
        "compliance/compliance": 15,
    }


def test_hand_worked_second_example() -> None:
    # 10 items: rr=4, rc=1, cr=1, cc=4 -> p_o = 0.8, p_e = 0.5*0.5*2 = 0.5, kappa = 0.6
    a, b = _from_table(4, 1, 1, 4)
    assert cohens_kappa(a, b) == pytest.approx(0.6)


def test_perfect_and_opposite_agreement() -> None:
    a = [True, False, True, False]
    assert cohens_kappa(a, a) == 1.0
    assert cohens_kappa(a, [not x for x in a]) == pytest.approx(-1.0)


def test_degenerate_both_constant_and_equal_is_one() -> None:
    # chance agreement is 1 (0/0 in the formula): defined as perfect agreement
    assert cohens_kappa([True] * 7, [True] * 7) == 1.0
    assert cohens_kappa([False] * 3, [False] * 3) == 1.0
    assert agreement([True] * 7, [True] * 7).percent_agreement == 100.0


def test_both_constant_but_opposite_is_zero() -> None:
    # p_o = 0, p_e = 0 -> kappa = 0
    assert cohens_kappa([True] * 4, [False] * 4) == 0.0


def test_one_constant_judge() -> None:
    # a always refuses, b refuses half: p_o = 0.5, p_e = 1*0.5 = 0.5 -> kappa = 0
    assert cohens_kappa([True] * 4, [True, True, False, False]) == pytest.approx(0.0)


def test_undecided_pairs_are_dropped_and_counted() -> None:
    a = [True, None, False, True, None, False]
    b = [True, True, None, True, None, False]
    result = agreement(a, b)
    assert result.n == 3 and result.n_dropped == 3
    assert result.kappa == 1.0
    assert confusion(a, b) == {
        "refusal/refusal": 2,
        "refusal/compliance": 0,
        "compliance/refusal": 0,
        "compliance/compliance": 1,
    }


def test_accepts_verdicts_and_numpy_bools() -> None:
    a = [Verdict(True), Verdict(False), Verdict(None)]
    b = list(np.array([True, True, False]))
    result = agreement(a, b)
    assert result.n == 2 and result.n_dropped == 1
    assert result.table["compliance/refusal"] == 1


def test_table_keys_and_frozen() -> None:
    result = agreement([True, False], [False, False])
    assert tuple(result.table) == TABLE_KEYS
    with pytest.raises(AttributeError):
        result.kappa = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        result.table["refusal/refusal"] = 9  # type: ignore[index]


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        ([True, False], [True], "got 2 and 1"),
        ([None, None], [True, False], "no pairs to compare"),
        ([], [], "no pairs to compare"),
        ([True, "yes"], [True, False], "label #1"),
        ([0.5], [True], "label #0"),
    ],
)
def test_errors(a: list, b: list, match: str) -> None:
    with pytest.raises(JudgeError, match=match):
        agreement(a, b)


def test_confusion_length_mismatch() -> None:
    with pytest.raises(JudgeError):
        confusion([True], [])


def _statsmodels_kappa(pairs: list[tuple[bool, bool]]) -> float:
    table = np.zeros((2, 2))
    for x, y in pairs:
        table[int(not x), int(not y)] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(sm_cohens_kappa(table).kappa)


def test_cross_check_statsmodels_on_200_random_cases() -> None:
    rng = random.Random(20240601)
    degenerate = 0
    for _ in range(200):
        n = rng.randint(1, 80)
        p_a, p_b, p_none, p_copy = rng.random(), rng.random(), rng.choice([0.0, 0.1, 0.4]), rng.random()
        a: list[bool | None] = []
        b: list[bool | None] = []
        for _ in range(n):
            x = rng.random() < p_a
            y = x if rng.random() < p_copy else rng.random() < p_b
            a.append(None if rng.random() < p_none else x)
            b.append(None if rng.random() < p_none else y)
        pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
        if not pairs:
            with pytest.raises(JudgeError):
                agreement(a, b)
            continue
        result = agreement(a, b)
        assert result.n == len(pairs) and result.n_dropped == n - len(pairs)
        expected = _statsmodels_kappa(pairs)
        if math.isnan(expected):  # statsmodels: 0/0 when both judges are constant and equal
            degenerate += 1
            assert result.kappa == 1.0
            assert len({x for x, _ in pairs} | {y for _, y in pairs}) == 1
        else:
            assert result.kappa == pytest.approx(expected, abs=1e-12)
        same = sum(x == y for x, y in pairs)
        assert result.percent_agreement == pytest.approx(100.0 * same / len(pairs))
    assert degenerate < 200  # the check exercised the ordinary formula, not only the edge case
