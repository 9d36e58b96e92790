"""Progress in logs: a line per phase, at least one per interval with step k/n, elapsed and ETA."""

from __future__ import annotations

import io

import pytest

from crystallized_safety import progress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    return c


def lines(stream):
    return [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()]


def test_log_lines_per_phase_and_per_interval_with_eta(clock):
    out = io.StringIO()
    with progress.Reporter("build", stream=out, tty=False, interval=60) as rep:
        rep("distilling")
        clock.now += 30
        rep("training", 0, 10)
        for step in range(1, 11):
            clock.now += 20  # 20 s a step
            rep("training", step, 10, f"loss {1 / step:.2f}")
    got = lines(out)
    assert got[0] == "build: started"
    assert got[1] == "distilling: started"
    assert got[2] == "distilling: done in 0:30"
    assert got[3] == "training: started (10 steps)"
    # a line at least every 60 s: after steps 3 (60 s since the last line), 6 and 9, and at the end
    assert got[4] == "training: step 3/10, 1:00 elapsed, eta 2:20  loss 0.33"
    assert got[5] == "training: step 6/10, 2:00 elapsed, eta 1:20  loss 0.17"
    assert got[6] == "training: step 9/10, 3:00 elapsed, eta 0:20  loss 0.11"
    assert got[7] == "training: step 10/10, 3:20 elapsed, eta 0:00  loss 0.10"
    assert got[8] == "training: done in 3:20"
    assert got[9] == "build: finished after 3:50"
    assert len(got) == 10


def test_failure_is_said(clock):
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with progress.Reporter("build", stream=out, tty=False) as rep:
            rep("training", 1, 5)
            raise RuntimeError("boom")
    assert lines(out)[-2:] == ["training: failed in 0:00", "build: failed after 0:00"]


def test_terminal_gets_a_bar_not_log_lines(clock):
    out = io.StringIO()
    with progress.Reporter("build", stream=out, tty=True) as rep:
        rep("training", 1, 5, "loss 0.5")
    assert "training: started" not in out.getvalue()


def test_heartbeat_when_a_phase_reports_no_step():
    """A phase that reports nothing for longer than the interval still gets a line (real time, short interval)."""
    import time

    out = io.StringIO()
    with progress.Reporter("build", stream=out, tty=False, interval=0.2) as rep:
        rep("measuring", 3, 10)
        time.sleep(1)  # the heartbeat checks every min(5 s, interval / 4) = 0.05 s here
    got = lines(out)
    beats = [line for line in got if line.startswith("measuring: still running (step 3/10)")]
    assert beats, got


def test_resumed_phase_eta_counts_only_this_process_steps(clock):
    """A phase resumed at step 90/100 must not be credited with the earlier run's 90 steps: 10 s a step here."""
    out = io.StringIO()
    with progress.Reporter("run", stream=out, tty=False, interval=60) as rep:
        rep("damage", 90, 100)
        for step in range(91, 97):
            clock.now += 10
            rep("damage", step, 100)
    got = lines(out)
    assert "damage: step 96/100, 1:00 elapsed, eta 0:40" in got, got


def test_heartbeat_says_eta_once_a_step_is_done(clock):
    rep = progress.Reporter("run", stream=io.StringIO(), tty=False)
    rep("chunks", 0, 10)
    clock.now += 30
    rep("chunks", 2, 10)
    assert rep.eta(2, 10) == 120  # 15 s a step, 8 left
    assert rep.eta(0, 10) is None and rep.eta(5, None) is None
