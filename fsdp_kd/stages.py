"""One line per stage of a multi-run recipe (the demo), with each stage's own output kept in a log file.

A recipe that runs several trainings prints, on the terminal, one line per stage: a progress bar while it runs (on a
terminal; elsewhere only the finished line), then what it took and its headline figure. Everything the stage itself
prints (start-up summaries, step lines, progress bars of the libraries) goes to `<log_dir>/<name>.log` instead, so
the terminal reads like a result and the log is still there to read. A stage that fails leaves its log and says
where it is.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

BAR_WIDTH = 24


class Stage:
    """One running stage: `update(done, total)` moves its bar; `result` is shown at the end of its line."""

    def __init__(self, label: str, shown: bool, out):
        self.label, self.shown, self.out = label, shown, out
        self.started = time.perf_counter()
        self.done, self.total = 0, 0
        self.result = ""
        self._live = shown and out.isatty()

    def update(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if self._live:
            self.out.write("\r" + self._line())
            self.out.flush()

    def _line(self) -> str:
        seconds = time.perf_counter() - self.started
        if self.total:
            filled = round(BAR_WIDTH * self.done / self.total)
            bar = f" {'█' * filled}{'·' * (BAR_WIDTH - filled)} {self.done}/{self.total}"
        else:
            bar = ""
        return f"{self.label:<42}{bar} {seconds:5.0f}s" + (f"  {self.result}" if self.result else "")

    def finish(self) -> None:
        if self.shown:
            self.out.write(("\r" if self._live else "") + self._line() + "\n")
            self.out.flush()


class Stages:
    """Numbered stages whose output goes to per-stage logs under `log_dir`; only `shown` (rank 0) prints lines."""

    def __init__(self, count: int, log_dir: str, shown: bool):
        self.count, self.log_dir, self.shown = count, log_dir, shown
        self.index = 0
        self.out = sys.stdout  # the terminal: stage output is redirected away from it below
        os.makedirs(log_dir, exist_ok=True)

    def log_path(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.log")

    @contextlib.contextmanager
    def run(self, label: str, name: str):
        """Runs the body as stage `label`, its stdout and stderr going to `<log_dir>/<name>.log` (this rank's)."""
        self.index += 1
        stage = Stage(f"[{self.index}/{self.count}] {label}", self.shown, self.out)
        stage.update(0, 0)
        path = self.log_path(name) if self.shown else os.devnull
        with open(path, "a") as log:
            try:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    yield stage
            except BaseException:
                if self.shown:
                    self.out.write(f"\n{stage.label} failed; its log: {path}\n")
                raise
        stage.finish()
