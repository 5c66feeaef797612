"""Process-group setup and teardown, for ranks that torchrun started (or a single plain process).

nccl on CUDA, gloo on CPU. A plain `python train.py` without torchrun runs as a world of one, so the same code
path (FSDP2 included) serves a laptop and a cluster.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import os
import random
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, NoReturn

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .errors import ConfigError


@dataclass
class DistEnv:
    """Where this process is. In a job split into student and teacher ranks (`split_world`), `rank`, `world_size`
    and `mesh` are those of this rank's side, and `global_rank` its place in the whole job."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh  # 1-D over every rank of this side
    global_rank: int = -1  # -1: the same as rank (the job is not split)
    split: Split | None = None  # how the job is split, if it is: a teacher rank's own block, a student rank's first
    splits: dict[str | None, Split] = field(default_factory=dict)  # each block, by the name of the teacher it runs

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def first_on_host(self) -> bool:
        """Whether this rank does its side's once-per-node work on its host (a download): local rank 0, or in a split
        job the first rank of its side there (teacher ranks that share a node with student ranks have no local rank
        0)."""
        if self.split is None:
            return self.local_rank == 0
        hosts = self.split.hosts
        side = self.split.teachers if self.split.is_teacher(self.global_rank) else self.split.students
        return self.global_rank == next(r for r in side if hosts[r] == hosts[self.global_rank])

    def for_teacher(self, name: str) -> DistEnv:
        """This rank as teacher `name` of several sees it: its `split` that teacher's block, where it has one."""
        return dataclasses.replace(self, split=self.splits[name]) if name in self.splits else self

    def hybrid_mesh(self, shard_size: int | None) -> DeviceMesh:
        """2-D (replicate, shard) mesh for HSDP: shard within a group of `shard_size` ranks (default: one node, from
        torchrun's LOCAL_WORLD_SIZE), replicate across the groups."""
        shard = shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        if self.world_size % shard:
            raise ValueError(f"hybrid_shard: world size {self.world_size} is not a multiple of the shard group "
                             f"size {shard}; set hsdp_shard_size to a divisor")
        key = ("hybrid", shard)
        if key not in _MESHES:
            _MESHES[key] = init_device_mesh(self.device.type, (self.world_size // shard, shard),
                                            mesh_dim_names=("replicate", "shard"))
        return _MESHES[key]


_MESHES: dict = {}  # one mesh per layout per process: a mesh's process groups are collective to create
# The ranks this process's collectives run over: its side of a job split by `split_world` (so the student ranks'
# metrics, checkpoints and data never wait on the teacher ranks, nor these on those), else every rank (None).
_SIDE_GROUP: dist.ProcessGroup | None = None


# How long a rank other than 0 waits, after an error every rank finds alike, before leaving: rank 0 prints it in
# that time, and torchrun then stops the job. An error only this rank found still ends the job after the wait, named
# in torchrun's summary.
SAY_IT_ONCE_GRACE_SECONDS = 3.0
DEFAULT_TIMEOUT_MINUTES = 60.0  # long enough for rank 0 to read a large model before the others' first collective


def init_distributed(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> DistEnv:
    """Joins (or, for a plain process, creates) the default process group and a 1-D mesh over all ranks."""
    if "RANK" not in os.environ:  # a plain `python ...`: a world of one, on a free local port
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend, store=_attempt_store(rank, world, timeout), rank=rank, world_size=world,
                                timeout=timeout, device_id=device if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    _quiet_libraries()
    return DistEnv(rank, local_rank, world, device, mesh)


def _attempt_store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """torch's env:// store, namespaced by torchrun's restart count.

    After `torchrun --max-restarts` restarts the ranks, the rendezvous store can still hold the previous attempt's
    addresses; Gloo then dials a dead rank ("Connection refused") and the restart fails. A per-attempt prefix makes
    each attempt's group meet only its own ranks.
    """
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    return dist.PrefixStore(f"fsdp_kd/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _quiet_libraries() -> None:
    """N ranks × per-load progress bars drown the training log; errors still print."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int, rank: int) -> None:
    """Model init is seeded alike on every rank; dropout and other per-rank randomness differ by rank."""
    random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def run_ranked(work: Callable[[DistEnv], None], timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> int:
    """Joins the process group, runs `work(env)`, and returns the exit code: 0 after a clean teardown, an error's
    `orderly_exit_code` after the teardown that every rank reaches alike (`preemption.Preempted`), or the code
    `report_failure` gives. Callers exit right after (`exit_process`), so a failed rank leaves at once."""
    env = init_distributed(timeout_minutes)
    try:
        work(env)
    except BaseException as error:  # noqa: BLE001 - every failure must end the rank, and end it fast
        if getattr(error, "orderly_exit_code", None) is not None:  # every rank stopped here alike (a preemption)
            teardown()
            return error.orderly_exit_code
        return report_failure(error, env.rank)
    teardown()
    return 0


def report_failure(error: BaseException, rank: int) -> int:
    """One rank failed: say it once, tell torchrun, and return the exit code (2 for bad input, 1 otherwise).

    No barrier and no orderly teardown: the other ranks are blocked inside collectives that this rank will never
    join, and would hold it there until the process-group timeout. Instead this rank exits (its caller calls
    `exit_process`), torchrun sees a failed worker and stops the others within seconds, and its summary names
    this error as the root cause because it is written to torchrun's error file.

    Bad input (ConfigError) and other errors marked `same_on_every_rank` are raised alike on every rank (of its side,
    in a split job), so that side's first rank prints their one line; anything else is printed with the (global)
    rank it happened on, and its traceback.
    """
    bad_input = isinstance(error, ConfigError)
    if bad_input or getattr(error, "same_on_every_rank", False):
        line = f"error: {error}"
        if (rank if _SIDE_GROUP is None else dist.get_rank(_SIDE_GROUP)) == 0:
            print(line, file=sys.stderr, flush=True)
        else:  # let rank 0 say it before torchrun, seeing this rank gone, stops rank 0 mid-sentence
            time.sleep(SAY_IT_ONCE_GRACE_SECONDS)
        detail = line
    else:
        line = f"[rank {rank}] {type(error).__name__}: {error}"
        detail = traceback.format_exc()
        print(detail.rstrip() + "\n" + line, file=sys.stderr, flush=True)
    _write_torchrun_error_file(line, detail)
    return 2 if bad_input else 1


def _write_torchrun_error_file(message: str, detail: str) -> None:
    """The structure torchrun's `@record` writes; its failure summary prints `py_callstack` as the traceback."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json

    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": detail,
                                                                       "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass  # the error was printed; the file only improves torchrun's summary


def forget_side() -> None:
    """Drops this process's meshes and its side group (`split_world`): they belong to the run that ended."""
    global _SIDE_GROUP
    _MESHES.clear()
    _SIDE_GROUP = None


def teardown() -> None:
    """A barrier first: gloo aborts the process if a rank tears down while a peer still has work in flight."""
    if dist.is_initialized():
        gc.collect()  # drop sharded tensors that still reference the group's work before destroying it
        dist.barrier()  # every rank of the job, both sides of a split one
        forget_side()
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """Ends an entry point after `teardown`, skipping interpreter finalization.

    Gloo's C++ worker threads can still hold tensors when Python finalizes, and releasing them then aborts the
    process ("terminate called without an active exception", see pytorch/pytorch#179291); under load we saw a rank
    exit -6 after all its outputs were written. Every file is closed by now, so flushing stdio and leaving is safe.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def side_group() -> dist.ProcessGroup | None:
    """The group of this rank's side of the job (None: every rank), for collectives that take a `group`."""
    return _SIDE_GROUP


def side_size() -> int:
    """How many ranks this rank's collectives run over: its side's."""
    return dist.get_world_size(_SIDE_GROUP) if dist.is_initialized() else 1


def barrier() -> None:
    """Every rank of this side has arrived."""
    if dist.is_initialized():
        dist.barrier(group=_SIDE_GROUP)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Summed over this rank's side, in place."""
    if side_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=_SIDE_GROUP)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if side_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_SIDE_GROUP)
    return tensor


def all_gather_object(obj) -> list:
    """Every rank's `obj` (picklable) of this rank's side, in rank order; [obj] without a process group."""
    if side_size() == 1:
        return [obj]
    out = [None] * side_size()
    dist.all_gather_object(out, obj, group=_SIDE_GROUP)
    return out


@dataclass
class Split:
    """One torchrun job as two sides, seen by one teacher's block: global ranks [0, S) train the student, `teachers`
    run the teacher (the last ranks, or with several teachers on ranks of their own, `split_world`'s blocks after the
    student ranks, one per teacher). The split follows torchrun's rank order, so with whole nodes per side the teachers
    get the last nodes. Teacher rank t of the block serves the student ranks s with s % T == t; the teacher ranks run
    their forwards together (FSDP over their own mesh), so each serves as many student ranks as the others."""
    students: list[int]
    teachers: list[int]
    hosts: list[str]  # each global rank's host
    control: dist.ProcessGroup  # gloo over every rank: the small host-side messages that say what comes next
    # Over every rank, for what the student ranks send the teacher ranks on the device; what comes back uses the
    # default group. NCCL runs one group's messages between two ranks in order on one stream: in one group, a
    # student rank's queued sends of its next inputs and a teacher rank's send of hidden states would each wait for
    # the other.
    inputs: dist.ProcessGroup
    name: str | None = None  # the teacher of `teachers` the block runs; None: the run's one teacher

    def is_teacher(self, rank: int) -> bool:
        return rank in self.teachers

    def teacher_of(self, student: int) -> int:
        return self.teachers[student % len(self.teachers)]

    def served_by(self, teacher: int) -> list[int]:
        return [s for s in self.students if self.teacher_of(s) == teacher]

    def describe(self) -> str:
        def where(ranks, side):
            hosts = ", ".join(dict.fromkeys(self.hosts[r] for r in ranks))
            if len(ranks) == 1:
                return f"1 {side} rank (global rank {ranks[0]} on {hosts})"
            return f"{len(ranks)} {side} ranks (global ranks {ranks[0]}-{ranks[-1]} on {hosts})"

        return (f"{where(self.students, 'student')}, {where(self.teachers, 'teacher')}; each teacher rank serves "
                f"{len(self.students) // len(self.teachers)}")


def block_key(name: str | None) -> str:
    """The config key that gives teacher `name` its block of ranks (None: the run's one teacher)."""
    return "teacher_ranks" if name is None else f"teachers.{name}.teacher_ranks"


def plan_split(world: int, blocks: dict[str | None, int]) -> tuple[list[int], dict[str | None, list[int]]]:
    """The student ranks of a world of `world` ranks, and each teacher's block after them, in the order of `blocks`
    (teacher name -> its count of ranks). Refuses a world whose student ranks are not a positive multiple of every
    block: each teacher rank of a block serves as many student ranks as the others."""
    taken = sum(blocks.values())
    students = list(range(world - taken))
    for name, size in blocks.items():
        if not students or len(students) % size:
            key = block_key(name)
            raise ConfigError(f"key {key}: {taken} teacher ranks of {world} leave {len(students)} student ranks, "
                              f"which must be a positive multiple of {size} (each teacher rank serves as many student "
                              f"ranks as the others); change {key} or --nproc_per_node")
    bounds = list(itertools.accumulate(blocks.values(), initial=len(students)))
    return students, {name: list(range(a, b)) for name, a, b in zip(blocks, bounds, bounds[1:])}


def split_world(env: DistEnv, blocks: dict[str | None, int],
                timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> DistEnv:
    """Collective over every rank: this rank's side, as its `DistEnv` (with the `split`, and every block's in
    `splits`), for a job whose teachers run on `blocks` of ranks of their own (teacher name, None for the run's one
    teacher -> its count of ranks, `plan_split`); its collectives from now on run over its side only (`side_group`):
    the student ranks, or its own teacher's block."""
    global _SIDE_GROUP
    students, teachers = plan_split(env.world_size, blocks)
    timeout = timedelta(minutes=timeout_minutes)  # a group's own default is 30 minutes on gloo, 10 on nccl
    student_group = dist.new_group(students, timeout=timeout)
    groups = {name: dist.new_group(ranks, timeout=timeout) for name, ranks in teachers.items()}
    control, inputs = dist.new_group(backend="gloo", timeout=timeout), dist.new_group(timeout=timeout)
    hosts = all_gather_object(socket.gethostname())  # over every rank: the side group is not set yet
    splits = {name: Split(students, ranks, hosts, control, inputs, name) for name, ranks in teachers.items()}
    own = [name for name, ranks in teachers.items() if env.rank in ranks]
    side, _SIDE_GROUP, split = ((teachers[own[0]], groups[own[0]], splits[own[0]]) if own else
                                (students, student_group, next(iter(splits.values()))))
    mesh = DeviceMesh.from_group(_SIDE_GROUP, env.device.type, mesh_dim_names=("dp",))
    return DistEnv(side.index(env.rank), env.local_rank, len(side), env.device, mesh, env.rank, split, splits)
