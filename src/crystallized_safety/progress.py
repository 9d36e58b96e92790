"""Progress of long work (organism builds, experiment runs) that a person can follow anywhere.

On a terminal: a rich progress bar with elapsed time and ETA. Anywhere else (a log file, CI, `nohup`):
one plain line when a phase starts, then at least one line every `interval` seconds with step k/n,
elapsed and ETA, and one when the phase ends, so a log never goes silent for long: where the work
reports no step for a whole interval, a heartbeat thread says the phase is still running.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

# progress(phase, done=0, total=None, note=""): a `Reporter`, or anything with that signature
Progress = Callable[..., None]


def silent(*_args: Any, **_kwargs: Any) -> None:
    """The progress callback for work nobody watches."""


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Reporter:
    """Callable `reporter(phase, done=0, total=None, note="")`; use as a context manager.

    A new `phase` string starts a phase. `done`/`total` count steps within it; `note` is shown beside
    (e.g. a loss). `tty=None` asks the stream whether it is a terminal.
    """

    def __init__(self, title: str, *, stream: IO[str] | None = None, tty: bool | None = None, interval: float = 60.0):
        self.title = title
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.started = time.monotonic()
        self.phase_name: str | None = None
        self.phase_started = self.started
        self.phase_first_done = 0
        self.last_line = 0.0
        self._bar: Any = None
        self._task: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._last_step: tuple[int, int | None] = (0, None)

    def __enter__(self) -> Reporter:
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self._bar.start()
            self._task = self._bar.add_task(self.title, total=None)
        else:
            self._line(f"{self.title}: started")
            self._heartbeat = threading.Thread(target=self._beat, name="progress-heartbeat", daemon=True)
            self._heartbeat.start()
        return self

    def _beat(self) -> None:
        """Log mode: a line at least every `interval` seconds, also while a phase reports no step."""
        while not self._stop.wait(min(5.0, self.interval / 4)):
            with self._lock:
                quiet = time.monotonic() - self.last_line >= self.interval
            if quiet and self.phase_name is not None:
                done, total = self._last_step
                steps = f"step {done}/{total}" if total else "no step reported yet"
                spent = _clock(time.monotonic() - self.phase_started)
                eta = self.eta(done, total)
                tail = f", eta {_clock(eta)}" if eta is not None else ", eta after the first step"
                self._line(f"{self.phase_name}: still running ({steps}), {spent} elapsed{tail}")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self.phase_name is not None:
            self._end_phase("failed" if exc_type else "done")
        if not self.tty:
            self._line(f"{self.title}: {'failed' if exc_type else 'finished'} after {_clock(self.elapsed())}")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def eta(self, done: int, total: int | None) -> float | None:
        """Seconds left in the phase, from its pace so far: steps done in this process only, so a resumed phase
        (that starts at step k > 0) is not credited with the earlier run's steps (None before the first step)."""
        moved = done - self.phase_first_done
        if not total or moved <= 0:
            return None
        return (time.monotonic() - self.phase_started) / moved * (total - done)

    def __call__(self, phase: str, done: int = 0, total: int | None = None, note: str = "") -> None:
        now = time.monotonic()
        new_phase = phase != self.phase_name
        self._last_step = (done, total)
        if new_phase:
            if self.phase_name is not None and not self.tty:
                self._end_phase("done")
            self.phase_name, self.phase_started, self.phase_first_done = phase, now, done
        if self._bar is not None:
            text = f"{phase}" + (f"  {note}" if note else "")
            self._bar.update(self._task, description=text, completed=done, total=total)
            return
        if new_phase:
            self._line(f"{phase}: started" + (f" ({total} steps)" if total else "") + (f"  {note}" if note else ""))
        elif now - self.last_line >= self.interval or (total and done >= total):
            eta = self.eta(done, total)
            steps = f"step {done}/{total}" if total else f"step {done}"
            tail = f", eta {_clock(eta)}" if eta is not None else ""
            self._line(
                f"{phase}: {steps}, {_clock(now - self.phase_started)} elapsed{tail}" + (f"  {note}" if note else "")
            )

    def _end_phase(self, how: str) -> None:
        self._line(f"{self.phase_name}: {how} in {_clock(time.monotonic() - self.phase_started)}")

    def _line(self, text: str) -> None:
        with self._lock:
            stamp = time.strftime("%H:%M:%S")
            self.stream.write(f"[{stamp} +{_clock(self.elapsed())}] {text}\n")
            self.stream.flush()
            self.last_line = time.monotonic()
