"""A run's teacher: what the run asks of it (`Teacher`), one class per kind, chosen by one lookup in `TEACHERS`.

The kinds: `live` runs the sharded teacher_model on each micro-batch, `cross_tokenizer` runs a teacher with its own
tokenizer on its own tokens of each sample, `privileged` runs one on its own rendering of each sample with context the
student does not see (all three `teacher_model`), `teacher_ranks` runs either of those on ranks of
its own and sends its hidden states (`teacher_ranks.RemoteTeacher`), `cache` reads stored teacher distributions in any
of the cache's modes, top-k, sampled or hidden states (`teacher_cache.CachedTeacher`, each mode one entry of
`CACHE_MODES`), and `none` is plain SFT. The loss and the training loop never ask which kind they have.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

import torch

from .cross_tokenizer import TeacherTokenization
from .data import MicroBatch
from .distill import PLAIN_CE
from .kernel import METRIC_NAMES
from .privileged import TeacherContext
from .targets import Targets
from .teacher_cache import CachedTeacher
from .teacher_model import MODEL_TEACHERS, model_kind
from .teacher_ranks import RemoteTeacher
from .preemption import no_signal


class Teacher(Protocol):
    """What a run asks of its teacher, in the run's order.

    Made from the config and the student's tokenizer (`from_config`), before the data loads: `vocab_size` is the
    vocabulary the loss is taken over, `teacher_vocab_size` the teacher head's, and `retokenize` (for a teacher with
    its own tokenizer) what adds its tokens to each sample as the data is tokenized, else None. `check` runs against
    the run's tokenizer and data before any model loads, and refuses what this kind cannot teach (a cache built for
    other data, a kd_loss it cannot train). `load` loads what it runs on this rank (in the compute `dtype`) and
    `verify` checks a loaded model's head; `describe` gives its lines of the start-up summary. Then, for each step
    or evaluation, `begin(batches)` names the micro-batches whose targets are asked for next, in that order (a teacher
    on other ranks starts on them at once), and `targets(batch)` gives one's targets, as a context manager entered
    while the loss runs (a teacher's head is gathered only then). `metric_names` says how the loss's metrics read
    against this kind (a metric renamed, or dropped as None, where it gives less than a live teacher); `distills`
    whether the loss has a KD term at all; `metric_groups`, empty but for several teachers
    (`routed_teacher.RoutedTeachers`), each one's name and metric names. `signalled(device)` is how many of the
    teacher's own ranks got a stop signal while serving the step's micro-batches, on the device (a teacher on ranks
    of its own; the others say none, `preemption.no_signal`): the step's counts take it in. `close(preempted)` ends it
    after a run that finished, or that a stop signal stopped (a teacher on ranks of its own then stops with the same
    exit code)."""
    vocab_size: int
    teacher_vocab_size: int
    retokenize: TeacherTokenization | None
    metric_names: dict[str, str | None]
    metric_groups: dict[str, dict[str, str | None]]
    distills: bool

    @classmethod
    def from_config(cls, cfg, tokenizer) -> Teacher: ...

    def check(self, tokenizer, sources, env) -> None: ...

    def load(self, env, dtype: torch.dtype) -> None: ...

    def verify(self, device: torch.device) -> None: ...

    def describe(self) -> list[str]: ...

    def begin(self, batches: list[MicroBatch]) -> None: ...

    def targets(self, batch: MicroBatch) -> AbstractContextManager[Targets]: ...

    def signalled(self, device: torch.device) -> torch.Tensor: ...

    def close(self, preempted: bool = False) -> None: ...


class NoTeacher:
    """Plain SFT: the vocabulary is the student's tokenizer, nothing loads, and the loss is the CE alone, so the CE
    is its one metric."""
    retokenize = None
    distills = False
    metric_names: dict[str, str | None] = {name: None for name in METRIC_NAMES if name != "ce"}
    metric_groups: dict[str, dict[str, str | None]] = {}

    def __init__(self, vocab_size: int):
        self.vocab_size = self.teacher_vocab_size = vocab_size

    @classmethod
    def from_config(cls, cfg, tokenizer) -> NoTeacher:
        return cls(len(tokenizer))

    def check(self, tokenizer, sources, env) -> None:
        pass

    def load(self, env, dtype: torch.dtype) -> None:
        pass

    def verify(self, device: torch.device) -> None:
        pass

    def describe(self) -> list[str]:
        return []

    def begin(self, batches: list[MicroBatch]) -> None:
        pass

    def targets(self, batch: MicroBatch) -> AbstractContextManager[Targets]:
        return PLAIN_CE

    def signalled(self, device: torch.device) -> torch.Tensor:
        return no_signal(device)

    def close(self, preempted: bool = False) -> None:
        pass


TEACHERS: dict[str, type[Teacher]] = {
    **MODEL_TEACHERS,  # live, cross_tokenizer, privileged
    "teacher_ranks": RemoteTeacher,
    "cache": CachedTeacher,  # any of teacher_cache.CACHE_MODES
    "none": NoTeacher,
}


def teacher_kind(cfg) -> str:
    """The `TEACHERS` entry a config names: a cache when one is named (a teacher_model named beside it is not
    loaded; `teacher_cache.check_cache_fits` says why), else the teacher_model (on ranks of its own with
    teacher_ranks; with its own tokenizer with cross_tokenizer; with context of its own with teacher_context_key or
    teacher_system_prompt), else none."""
    if cfg.teacher_cache:
        return "cache"
    if not cfg.teacher_model:
        return "none"
    return "teacher_ranks" if cfg.teacher_ranks else model_kind(cfg.cross_tokenizer, bool(TeacherContext.of(cfg)))


def open_teacher(cfg, tokenizer) -> Teacher:
    """The run's teacher, before anything loads."""
    return TEACHERS[teacher_kind(cfg)].from_config(cfg, tokenizer)
