"""The distillation step's glue between the models and the loss: which rows are trained, and where the teacher's
targets come from.

The loss and the training loop never touch a teacher model directly. A run's teacher is a source, one entry of
`TEACHER_SOURCES`, which the trainer sets up in steps (`TeacherSetup`): `live` runs the sharded teacher on each
micro-batch (`LiveTeacher`, whose targets are `TeacherTargets`), `cross_tokenizer` runs a teacher with its own
tokenizer on its own tokens of each sample (`CrossTokenizerTeacher`), `teacher_ranks` runs either of those on ranks of
its own and sends its hidden states (`teacher_ranks.RemoteTeacher`), `cache` reads stored teacher distributions in
any of the cache's modes (`teacher_cache.CachedTeacher`), and `none` is plain SFT. A source's `targets(batch)` returns
something with `distill(hidden, head, labels, spec, vocab_size)`, which hands the loss a `kernel.Targets`.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .cross_tokenizer import TeacherTokenization, TokenBytes, shared_vocabulary
from .cross_vocab import ALIGNED_METRIC_NAMES, CrossVocabTargets, VocabMap, topk_in_student_vocabulary
from .data import MicroBatch
from .errors import ConfigError
from .heads import output_head
from .kernel import Head
from .loss import LossSpec, loss_against
from .models import (ShardedCausalLM, hidden_at_targets, load_sharded, parameter_count, shard_teacher,
                     shared_vocab_size, tokenizer_or_error)
from .records import IGNORE_INDEX
from .targets import NO_TEACHER, LiveTargets
from .teacher_cache import CacheSetup
from .teacher_ranks import RemoteSetup


class TeacherSource(Protocol):
    """A run's teacher once set up: each micro-batch's targets, and how the loss's metrics read against them (a
    metric renamed, or dropped as None, where the source gives less than a live teacher). `begin(batches)` names the
    micro-batches whose targets are asked for next, in that order (a teacher on other ranks starts on them at once);
    `close()` ends the source after the last."""
    metric_names: dict[str, str | None]

    def begin(self, batches: list[MicroBatch]) -> None: ...

    def targets(self, batch: MicroBatch): ...

    def close(self) -> None: ...


class TeacherSetup(Protocol):
    """The trainer's steps for one kind of teacher source, in its order: `vocab_size` (the vocabulary the loss is
    taken over, known before the data loads), `retokenize` (for a teacher with its own tokenizer, what adds its
    tokens to each sample as the data is tokenized; else None), `check` (against the run's tokenizer and data,
    before any model loads; on this rank's `DistEnv`), `load_model` (the teacher model, for a kind that runs one; `teacher_vocab_size` is its
    head's vocabulary), `open` (the source; None for no teacher), and `describe` (its lines in the start-up
    summary)."""
    vocab_size: int
    teacher_vocab_size: int
    retokenize: TeacherTokenization | None

    def check(self, tokenizer, sources, env) -> None: ...

    def load_model(self, env, dtype: torch.dtype) -> ShardedCausalLM | None: ...

    def open(self, device: torch.device) -> TeacherSource | None: ...

    def describe(self) -> list[str]: ...


@dataclass
class TeacherTargets:
    """What the loss needs from a live teacher for one micro-batch: its hidden states at the target rows, and its
    head, gathered only while the loss runs."""
    hidden: torch.Tensor
    head: Callable[[], AbstractContextManager[Head]]

    def distill(self, hidden: torch.Tensor, head, labels: torch.Tensor, spec: LossSpec, vocab_size: int):
        with self.head() as teacher_head:
            return loss_against(hidden, head, labels, spec, vocab_size, LiveTargets(self.hidden, teacher_head))

    def in_loss_vocabulary(self, topk: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The teacher's top-k rows as a cache stores them: its vocabulary is the loss's already."""
        return topk


class ModelTeacher:
    """Targets from a frozen, sharded teacher model, computed for each micro-batch without gradients: its final
    hidden states at the rows the loss reads (`hidden_at_targets` on `teacher_batch(batch)`), made into the loss's
    targets with its head (`targets_from`). A teacher on ranks of its own (`teacher_ranks.RemoteTeacher`) runs the
    same two steps on either side of the wire."""

    def __init__(self, root: ShardedCausalLM | None):
        self.root = root

    def teacher_batch(self, batch: MicroBatch) -> MicroBatch:
        return batch

    def targets_from(self, hidden: torch.Tensor, batch: MicroBatch, head: Callable[[], AbstractContextManager[Head]]):
        raise NotImplementedError

    def begin(self, batches: list[MicroBatch]) -> None:
        pass

    @torch.no_grad()
    def targets(self, batch: MicroBatch):
        return self.targets_from(self.root(hidden_at_targets, self.teacher_batch(batch)), batch,
                                 self.root.gathered_head)

    def close(self) -> None:
        pass


class LiveTeacher(ModelTeacher):
    """The teacher with the student's tokenizer, run on the student's own micro-batch."""
    metric_names: dict[str, str | None] = {}  # the loss's own: a live teacher gives every metric

    def targets_from(self, hidden: torch.Tensor, batch: MicroBatch, head) -> TeacherTargets:
        return TeacherTargets(hidden, head)


class LiveSetup:
    """A teacher model, sharded (offloaded if asked) and run on every micro-batch; the vocabulary is the one its
    tokenizer shares with the student's."""
    retokenize = None

    def __init__(self, cfg, tokenizer):
        self.cfg, self.root = cfg, None
        self.vocab_size = shared_vocab_size(tokenizer, tokenizer_or_error(cfg.teacher_model, "teacher_model", cfg))
        self.teacher_vocab_size = self.vocab_size

    def check(self, tokenizer, sources, env) -> None:
        pass

    def load_model(self, env, dtype: torch.dtype) -> ShardedCausalLM:
        self.root = load_sharded(self.cfg.teacher_model, self.cfg, env, dtype, shard_teacher, "teacher",
                                 self.vocab_size)
        return self.root

    def open(self, device: torch.device) -> LiveTeacher:
        return LiveTeacher(self.root)

    def describe(self) -> list[str]:
        return [f"teacher {parameter_count(self.root) / 1e6:.2f}M params: frozen, FSDP2 full shard, CPU offload "
                f"{'on' if self.cfg.teacher_offload else 'off'}", *self.vocabulary_lines()]

    def vocabulary_lines(self) -> list[str]:
        return [f"shared vocabulary {self.vocab_size}"]


class NoTeacherSetup:
    """Plain SFT: the vocabulary is the student's tokenizer, nothing loads, and there is no source."""
    retokenize = None

    def __init__(self, cfg, tokenizer):
        self.vocab_size = self.teacher_vocab_size = len(tokenizer)

    def check(self, tokenizer, sources, env) -> None:
        pass

    def load_model(self, env, dtype: torch.dtype) -> None:
        return None

    def open(self, device: torch.device) -> None:
        return None

    def describe(self) -> list[str]:
        return []


@dataclass
class CrossTokenizerTargets:
    """What the loss needs from a teacher with its own tokenizer for one micro-batch: its hidden states and next
    tokens at the positions aligned with the student's target rows, which rows have one (`aligned`), and its head."""
    hidden: torch.Tensor
    labels: torch.Tensor
    aligned: torch.Tensor
    head: Callable[[], AbstractContextManager[Head]]
    setup: CrossTokenizerSetup

    def distill(self, hidden: torch.Tensor, head, labels: torch.Tensor, spec: LossSpec, vocab_size: int):
        with self.head() as teacher_head:
            targets = CrossVocabTargets(self.hidden, teacher_head, self.labels, self.setup.vocab_map(hidden.device),
                                        self.setup.cfg.uld_weight, self.setup.cfg.uld_topk, self.aligned)
            return loss_against(hidden, head, labels, spec, vocab_size, targets)

    def in_loss_vocabulary(self, topk: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The teacher's top-k rows (its vocabulary) as a cache of the student's vocabulary stores them (a micro-batch
        of masked copies alone has no rows, and `teacher_rows` no columns)."""
        if not topk:
            return topk
        return topk_in_student_vocabulary(*topk, self.aligned, self.setup.vocab_map(self.hidden.device))


class CrossTokenizerTeacher(ModelTeacher):
    """A teacher with its own tokenizer, run on its own tokens of each micro-batch's samples (`MicroBatch.teacher`,
    laid out at collate time from the stored alignment)."""
    metric_names = ALIGNED_METRIC_NAMES

    def __init__(self, root: ShardedCausalLM | None, setup: CrossTokenizerSetup):
        super().__init__(root)
        self.setup = setup

    def teacher_batch(self, batch: MicroBatch) -> MicroBatch:
        return batch.teacher

    def targets_from(self, hidden: torch.Tensor, batch: MicroBatch, head) -> CrossTokenizerTargets:
        return CrossTokenizerTargets(hidden, batch.teacher.target_ids, batch.aligned, head, self.setup)


class CrossTokenizerSetup:
    """A teacher with its own tokenizer (`cross_tokenizer: true`), run live on its own tokens: the data's samples get
    the teacher's tokens and their alignment when they are tokenized (`retokenize`), and the loss compares the two
    models where the tokenizations align one token to one (`cross_vocab`; docs/cross_tokenizer.md). The loss's
    vocabulary is the student's tokenizer, the teacher's head is read over its own."""

    def __init__(self, cfg, tokenizer):
        self.cfg, self.root, self._vocab_map = cfg, None, None
        teacher_tokenizer = tokenizer_or_error(cfg.teacher_model, "teacher_model", cfg)
        try:
            student, teacher = TokenBytes.of(tokenizer), TokenBytes.of(teacher_tokenizer)
        except (AttributeError, ValueError) as e:
            raise ConfigError(f"key cross_tokenizer: both tokenizers must be fast (tokenizer.json) to be aligned by "
                              f"bytes ({e})") from None
        self.shared = shared_vocabulary(student, teacher)
        self.retokenize = TeacherTokenization(student, teacher, teacher_tokenizer)
        self.vocab_size, self.teacher_vocab_size = len(tokenizer), len(teacher_tokenizer)
        self.aligned_share: float | None = None

    def vocab_map(self, device: torch.device) -> VocabMap:
        if self._vocab_map is None:  # once per run; its chunk layouts are found once per block shape
            self._vocab_map = VocabMap(torch.from_numpy(self.shared.student_ids).to(device),
                                       torch.from_numpy(self.shared.teacher_ids).to(device),
                                       self.vocab_size, self.teacher_vocab_size)
        return self._vocab_map

    def check(self, tokenizer, sources, env, samples: int = 1000) -> None:
        """Counts, over the first source's first samples, the trained tokens that align one to one."""
        trained = aligned = 0
        for i in range(min(samples, len(sources[0]))):
            sample = sources[0][i]
            for target, position in zip(sample.targets, sample.teacher_positions):
                trained += target != IGNORE_INDEX
                aligned += target != IGNORE_INDEX and position >= 0
        self.aligned_share = aligned / max(trained, 1)

    def load_model(self, env, dtype: torch.dtype) -> ShardedCausalLM:
        self.root = load_sharded(self.cfg.teacher_model, self.cfg, env, dtype, shard_teacher, "teacher",
                                 self.teacher_vocab_size)
        return self.root

    def open(self, device: torch.device) -> CrossTokenizerTeacher:
        return CrossTokenizerTeacher(self.root, self)

    def describe(self) -> list[str]:
        return [f"teacher {parameter_count(self.root) / 1e6:.2f}M params, its own tokenizer: frozen, FSDP2 full "
                f"shard, CPU offload {'on' if self.cfg.teacher_offload else 'off'}", *self.vocabulary_lines()]

    def vocabulary_lines(self) -> list[str]:
        return [f"cross-tokenizer: {self.shared.describe()}; {self.aligned_share:.1%} of the trained tokens of the "
                f"first source's first samples align one to one with a teacher token (the rest get the CE term alone); "
                f"KD = D over the shared tokens + {self.cfg.uld_weight:g}·ULD over {self.cfg.uld_topk} unshared"]


def model_teacher(cfg, tokenizer) -> LiveSetup | CrossTokenizerSetup:
    """The teacher_model, with the student's tokenizer or (cross_tokenizer) its own: what runs on this rank, or on
    the teacher ranks."""
    return TEACHER_SOURCES["cross_tokenizer" if cfg.cross_tokenizer else "live"](cfg, tokenizer)


TEACHER_SOURCES: dict[str, Callable[..., TeacherSetup]] = {
    "live": LiveSetup,
    "cross_tokenizer": CrossTokenizerSetup,
    "teacher_ranks": lambda cfg, tokenizer: RemoteSetup(cfg, model_teacher(cfg, tokenizer)),
    "cache": CacheSetup,  # any of teacher_cache.CACHE_MODES
    "none": NoTeacherSetup,
}


def setup_teacher(cfg, tokenizer) -> TeacherSetup:
    """The run's teacher source, before anything loads: a cache when one is named (a teacher_model named beside it
    is not loaded; `teacher_cache.check_cache_fits` says why), else the teacher_model (on ranks of its own with
    teacher_ranks; on its own tokens with cross_tokenizer), else none."""
    if not cfg.teacher_model and not cfg.teacher_cache:
        return TEACHER_SOURCES["none"](cfg, tokenizer)
    if cfg.teacher_cache:
        return TEACHER_SOURCES["cache"](cfg, tokenizer)
    if cfg.teacher_ranks:
        return TEACHER_SOURCES["teacher_ranks"](cfg, tokenizer)
    return model_teacher(cfg, tokenizer)


def run_student(root: ShardedCausalLM, batch: MicroBatch, spec: LossSpec, vocab_size: int, targets=None):
    """`student_loss` as the student root's forward. The targets ride in the function, not among the forward's
    arguments: FSDP casts every floating tensor among those to the compute dtype (`MixedPrecisionPolicy`'s
    cast_forward_inputs), which under bf16 would round a cache's log-probabilities (or stored hidden states) before
    the softmax they stand for."""
    return root(functools.partial(student_loss, targets=targets), batch, spec, vocab_size)


def student_loss(lm, batch: MicroBatch, spec: LossSpec, vocab_size: int, targets=None):
    """(summed loss, summed metrics) of one micro-batch against a source's targets (None: plain CE). Runs inside
    the student root's forward, so the student's head is gathered by FSDP while the kernel reads it and its
    gradient is reduced by FSDP afterwards."""
    hidden = hidden_at_targets(lm, batch)
    head = output_head(lm)
    if targets is None:
        return loss_against(hidden, head, batch.target_ids, spec, vocab_size, NO_TEACHER)
    return targets.distill(hidden, head, batch.target_ids, spec, vocab_size)
