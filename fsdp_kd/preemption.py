"""Preemption: a stop signal (SIGTERM, and `preempt_signal`) asks the run to stop at a step boundary, save, and exit.

Schedulers stop a job with SIGTERM (SLURM can send another signal ahead with `--signal`), then SIGKILL after a grace
period. The handler only remembers the signal (Python runs it between bytecodes, in the main thread); the ranks agree
on it inside what the step already reduces (`trainer.Trainer.train_step`), so stopping costs no collective and no
host sync per step. Every rank then ends alike: `Preempted` is raised on all of them, and `distributed.run_ranked`
tears down in order and returns `PREEMPTED_EXIT_CODE`.

When a step and a save take longer than the grace period (`preempt_grace_s`), waiting for the step's end would get the
job killed before it saved; such runs also agree at each micro-batch boundary, on a Gloo group of their own (host
messages, never a device sync), and drop the step in progress when what is left of it and the save would not fit.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from .distributed import side_group

# sysexits' EX_TEMPFAIL, "a temporary failure; the user is invited to retry": the run saved and stopped, and the same
# command with --load_checkpoint goes on. Not 143 (128 + SIGTERM), which a shell also shows for a process SIGTERM
# killed before it saved anything: a job script can tell the two apart.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """Every rank agreed to stop on a signal: raised alike on every rank, after what was to be saved is on disk.
    `distributed.run_ranked` ends such an error (one with an `orderly_exit_code`) with a teardown and that code."""
    same_on_every_rank = True
    orderly_exit_code = PREEMPTED_EXIT_CODE


# What `preempt_signal` takes: the signals schedulers send ahead of a stop (SLURM's --signal, a wrapper's trap).
# SIGTERM alone is the default; any of these is handled beside it.
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT")


class StopSignals:
    """Remembers the first stop signal this process gets while `installed`, and when; says how much of the grace
    period is left. Without `installed` (a Trainer driven by a test or a bench) it never hears one."""

    def __init__(self, extra: str = "SIGTERM", grace_s: float = 60.0):
        self.signals = list(dict.fromkeys([signal.SIGTERM, signal.Signals[extra]]))
        self.grace_s = grace_s
        self.received: str | None = None  # the signal's name
        self.at = 0.0  # time.monotonic() when it came

    def _handler(self, signum, frame) -> None:
        if self.received is None:
            self.received, self.at = signal.Signals(signum).name, time.monotonic()

    @contextmanager
    def installed(self):
        """The handlers for the length of one run, then the ones before them back (a process that runs several, as
        the test case host does, stays as it was). Only the main thread may set handlers; elsewhere nothing is
        installed."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handler) for s in self.signals}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @property
    def flag(self) -> float:
        """1.0 once a signal came: what each rank adds to the step's reduced counts."""
        return 0.0 if self.received is None else 1.0

    def seconds_left(self) -> float:
        """Of the grace period since the signal (all of it before one came)."""
        return self.grace_s - (time.monotonic() - self.at if self.received else 0.0)


def no_signal(device: torch.device) -> torch.Tensor:
    """What a teacher in this process says of stop signals on ranks of its own (`Teacher.signalled`): none, as a [1]
    device tensor (a fill, not a copy) that the step's counts take in."""
    return torch.zeros(1, dtype=torch.float64, device=device)


class MidStepCheck:
    """For runs whose step and save outlast the grace period: at each micro-batch boundary the ranks agree, over a
    Gloo group made for it (collective, so made at a step boundary every rank agrees on), whether one of them must
    stop now: it got a signal and what is left of the step plus a save would not fit in what is left of the grace."""

    def __init__(self, timeout_minutes: float):
        side = side_group()
        self.group = None
        if dist.is_initialized():
            self.group = dist.new_group(None if side is None else dist.get_process_group_ranks(side), backend="gloo",
                                        use_local_synchronization=True, timeout=timedelta(minutes=timeout_minutes))

    def must_stop(self, stop: StopSignals, seconds_needed: float) -> bool:
        late = torch.tensor([float(stop.received is not None and seconds_needed > stop.seconds_left())])
        if self.group is not None:
            dist.all_reduce(late, group=self.group)
        return bool(late.item())  # a host tensor: no device is waited for
