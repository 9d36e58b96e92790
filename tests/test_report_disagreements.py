"""The report's judge section shows the responses the stored judge and the first-token score disagree on, the
most confident first, each way; agreeing rows and undecided rows never appear."""

from __future__ import annotations

from crystallized_safety.report.collect import judge_agreement
from crystallized_safety.report.tables import disagreement_table


def row(i: int, refusal: int | None, score: float) -> dict:
    return {"refusal": refusal, "score": score, "judge": "substring/1", "prompt": f"p{i}", "response": f"r{i}" * 150}


def test_disagreements_are_the_most_confident_each_way():
    gens = [
        row(0, 1, 2.0),  # agree: refusal
        row(1, 0, -2.0),  # agree: compliance
        row(2, 1, -0.5),  # substring refusal, score compliance (0.5 from the threshold 0)
        row(3, 1, -4.0),  # ... 4.0 from it: shown first
        row(4, 0, 3.0),  # substring compliance, score refusal
        row(5, None, 9.0),  # undecided by the stored judge: never shown
        *[row(10 + k, 1, -1.0 - k / 10) for k in range(3)],  # three more refusal/compliance, 1.0-1.2 away
    ]
    agreement, _ = judge_agreement(gens)
    shown = agreement["disagreements"]
    assert [(d["prompt"], d["stored"], d["score"]) for d in shown] == [
        ("p3", "refusal", -4.0),
        ("p12", "refusal", -1.2),
        ("p11", "refusal", -1.1),
        ("p4", "compliance", 3.0),
    ]
    assert all(len(d["response"]) == 200 for d in shown)
    table = disagreement_table("m", agreement)
    assert table is not None and [r[:2] for r in table.rows] == [
        ["refusal", "-4.00"],
        ["refusal", "-1.20"],
        ["refusal", "-1.10"],
        ["compliance", "+3.00"],
    ]
    calibrated, _ = judge_agreement(gens, {"threshold": -1.15})  # the calibrated threshold moves what disagrees
    assert [d["prompt"] for d in calibrated["disagreements"]] == ["p3", "p12", "p4"]


def test_no_disagreement_no_table():
    agreement, _ = judge_agreement([row(0, 1, 2.0), row(1, 0, -2.0)])
    assert agreement["disagreements"] == [] and disagreement_table("m", agreement) is None
