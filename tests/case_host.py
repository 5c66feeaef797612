"""Many test cases in one torchrun job: a torchrun start costs more than a tiny case.

    python -m torch.distributed.run --nproc_per_node W tests/case_host.py INBOX PARENT_PID

`conftest.torchrun` hands a host what a test would have launched (train.py, `-m fsdp_kd.cache_teacher`, `-m
fsdp_kd.export`, tests/dist_worker.py or tests/sweep_worker.py, with its arguments and working directory) as
INBOX/N.json; a case whose environment differs from the host's gets a process of its own instead (libraries read
some variables once, at import). Every rank runs case N in-process through the same entry point's `main`, with its file
descriptors 1 and 2 sent to INBOX/N.rank{r}.out and .err (so C++ and library output is caught too, as torchrun's pipes
would), then writes its exit code to INBOX/N.rank{r}.json.

Between cases the process group stays up; what a run's own teardown would have cleared (the meshes, the side group of
a split job, the start-up clock, the warnings already shown, the working directory) is reset. A case that fails on one
rank only can leave the others inside a collective: the test side then times out, kills the host and starts a new one,
so such tests (a killed rank, torchrun's own summary) still launch torchrun themselves. The host leaves when its parent
(the pytest process) is gone.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import os
import sys
import time
import warnings
from datetime import timedelta

import torch.distributed as dist

import fsdp_kd.distributed as distributed
from fsdp_kd import startup

POLL_SECONDS = 0.02
_WARNING_FILTERS = list(warnings.filters)


def _teardown_between_cases() -> None:
    """Stands in for `distributed.teardown` inside the host: the same barrier, the process group kept for the next
    case."""
    gc.collect()
    dist.barrier()
    distributed.forget_side()


def _entry(argv: list[str]):
    """(main, its argv) for a command line a test would have given torchrun."""
    if argv[:2] == ["-m", "fsdp_kd.cache_teacher"]:
        from fsdp_kd.cache_teacher import main
        return main, argv[2:]
    if argv[:2] == ["-m", "fsdp_kd.export"]:
        from fsdp_kd.export import main
        return main, argv[2:]
    script = os.path.basename(argv[0])
    if script == "train.py":
        from fsdp_kd.cli import main
        return main, argv[1:]
    if script == "dist_worker.py":
        from dist_worker import main
        return main, argv[1:]
    if script == "sweep_worker.py":
        from sweep_worker import main
        return main, argv[1:]
    raise ValueError(f"case host: no entry point for {argv[:2]}")


@contextlib.contextmanager
def _redirected(out_path: str, err_path: str):
    """File descriptors 1 and 2 (and so sys.stdout/sys.stderr, and anything C++ prints) into two files."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(out_path, "w") as out, open(err_path, "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextlib.contextmanager
def _working_directory(cwd: str | None):
    here = os.getcwd()
    os.chdir(cwd or here)
    try:
        yield
    finally:
        os.chdir(here)


def run_case(case: dict, out_path: str, err_path: str) -> int:
    startup.CLOCK.__init__()  # each case is a run of its own, with a start-up of its own to report
    warnings.filters[:] = _WARNING_FILTERS
    warnings._filters_mutated()  # a warning an earlier case showed once is shown again, as in a new process
    with _working_directory(case["cwd"]), _redirected(out_path, err_path):
        try:
            main, argv = _entry(case["argv"])
            code = main(argv)
        except BaseException as error:  # noqa: BLE001 - a case's crash is its result, not the host's end
            code = distributed.report_failure(error, dist.get_rank())
        finally:
            distributed.forget_side()
            _collect()
    return int(code or 0)


_CASES = itertools.count(1)
FULL_COLLECTION_EVERY = 16  # cases


def _collect() -> None:
    """The case's garbage (its sharded models) before the next case loads its own; then what outlives a case
    (modules, caches) is frozen, not walked again by the next one's collections. Every few cases the frozen objects
    are walked once more, so that one of them that has become garbage since (a cache cleared later) is freed too."""
    if next(_CASES) % FULL_COLLECTION_EVERY == 0:
        gc.unfreeze()
    gc.collect()
    gc.freeze()


def serve(inbox: str, parent: int) -> None:
    env = distributed.init_distributed()
    distributed.teardown = _teardown_between_cases
    distributed.SAY_IT_ONCE_GRACE_SECONDS = 0.0  # rank 0 prints before its case ends; no torchrun to race
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # dist_worker, sweep_worker, their imports
    n = 0
    while True:
        path = os.path.join(inbox, f"{n}.json")
        while not os.path.exists(path):
            if os.getppid() == 1 or not _alive(parent):
                return
            time.sleep(POLL_SECONDS)
        with open(path) as f:
            case = json.load(f)
        if case.get("stop"):
            return
        # every rank has finished the last case: one that a rank left early must not meet this one's collectives
        dist.monitored_barrier(timeout=timedelta(seconds=60))
        stem = os.path.join(inbox, f"{n}.rank{env.rank}")
        code = run_case(case, stem + ".out", stem + ".err")
        with open(stem + ".json.tmp", "w") as f:
            json.dump({"code": code}, f)
        os.replace(stem + ".json.tmp", stem + ".json")
        n += 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
    distributed.exit_process(0)
