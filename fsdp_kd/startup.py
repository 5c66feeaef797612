"""Where the seconds go between launch and the first optimizer step.

A user waiting on a 70B teacher wants to know whether start-up is the model read or the data cache; a developer
wants to see a regression in imports before it ships. One clock per process, started when the entry point is
imported, takes a lap at each start-up stage; the trainer prints the laps as one line after the first step, and
`bench/startup_bench.py` reads that line.
"""

from __future__ import annotations

import time

_PREFIX = "start-up: "


class StartupClock:
    """Named laps of wall time: each `lap(stage)` charges the seconds since the previous lap to `stage`. The clock
    stops at `finish()`: a process that starts a second run (the demo) has no second start-up to time."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.laps: list[tuple[str, float]] = []
        self.finished = False

    def lap(self, stage: str) -> None:
        if self.finished:
            return
        now = time.perf_counter()
        self.laps.append((stage, now - self._last))
        self._last = now

    def finish(self, stage: str) -> str | None:
        """The last lap, and the one-line report of all of them (None if the clock had already finished)."""
        if self.finished:
            return None
        self.lap(stage)
        self.finished = True
        return self.line()

    def line(self) -> str:
        total = sum(seconds for _, seconds in self.laps)
        return _PREFIX + f"{total:.1f}s to the first step = " + ", ".join(
            f"{stage} {seconds:.1f}s" for stage, seconds in self.laps)


def parse_line(line: str) -> dict[str, float] | None:
    """The laps of a printed `StartupClock.line()` (None for any other line), for the bench."""
    if not line.startswith(_PREFIX):
        return None
    laps = line.split(" = ", 1)[1].split(", ")
    return {stage: float(seconds.rstrip("s")) for stage, seconds in (lap.rsplit(" ", 1) for lap in laps)}


CLOCK = StartupClock()  # this process's clock: started at the first import, i.e. by the entry point
