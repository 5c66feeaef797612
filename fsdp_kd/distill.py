"""The distillation step's glue between the models and the loss: which rows are trained, and where the teacher's
targets come from.

The loss and the training loop never touch a teacher model directly. A run's teacher is a source, one entry of
`TEACHER_SOURCES`, which the trainer sets up in steps (`TeacherSetup`): `live` runs the sharded teacher on each
micro-batch (`LiveTeacher`, whose targets are `TeacherTargets`), `cache` reads stored teacher distributions in any
of the cache's modes (`teacher_cache.CachedTeacher`), and `none` is plain SFT. A source's `targets(batch)` returns
something with `distill(hidden, head, labels, spec, vocab_size)`, which hands the loss a `kernel.Targets`. A teacher
running on other ranks would be one more entry, whose source's targets are the hidden states or top-k it receives.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .data import MicroBatch, uses_sliding_window
from .heads import output_head
from .kernel import NO_TEACHER, Head, LiveTargets
from .loss import LossSpec, loss_against
from .models import ShardedCausalLM, load_sharded, parameter_count, shard_teacher, shared_vocab_size, tokenizer_or_error
from .teacher_cache import CacheSetup


def hidden_at_targets(lm, batch: MicroBatch) -> torch.Tensor:
    """Final (normed) hidden states at the positions that have a trainable next-token target, [N, hidden].

    The rows are picked with `index_select` on indices computed on the host, so this never syncs the device. No KV
    cache: besides its memory, HF reads packed-sample boundaries off position_ids only when there is none."""
    inputs = batch.model_inputs(lm.config._attn_implementation, lm.get_input_embeddings().weight.dtype,
                                uses_sliding_window(lm.config))
    hidden = lm.base_model(**inputs, use_cache=False).last_hidden_state
    return hidden.flatten(0, 1).index_select(0, batch.target_rows)


class TeacherSource(Protocol):
    """A run's teacher once set up: each micro-batch's targets, and how the loss's metrics read against them (a
    metric renamed, or dropped as None, where the source gives less than a live teacher)."""
    metric_names: dict[str, str | None]

    def targets(self, batch: MicroBatch): ...


class TeacherSetup(Protocol):
    """The trainer's steps for one kind of teacher source, in its order: `vocab_size` (the vocabulary the loss is
    taken over, known before the data loads), `check` (against the run's tokenizer and data, before any model
    loads), `load_model` (the teacher model, for a kind that runs one), `open` (the source; None for no teacher),
    and `describe` (its lines in the start-up summary)."""
    vocab_size: int

    def check(self, tokenizer, sources) -> None: ...

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


class LiveTeacher:
    """Targets from the frozen, sharded teacher, computed for each micro-batch without gradients."""

    def __init__(self, root):
        self.root = root

    @property
    def metric_names(self) -> dict[str, str | None]:
        return {}  # the loss's own: a live teacher gives every metric

    @torch.no_grad()
    def targets(self, batch: MicroBatch) -> TeacherTargets:
        return TeacherTargets(self.root(hidden_at_targets, batch), self.root.gathered_head)


class LiveSetup:
    """A teacher model, sharded (offloaded if asked) and run on every micro-batch; the vocabulary is the one its
    tokenizer shares with the student's."""

    def __init__(self, cfg, tokenizer):
        self.cfg, self.root = cfg, None
        self.vocab_size = shared_vocab_size(tokenizer, tokenizer_or_error(cfg.teacher_model, "teacher_model", cfg))

    def check(self, tokenizer, sources) -> None:
        pass

    def load_model(self, env, dtype: torch.dtype) -> ShardedCausalLM:
        self.root = load_sharded(self.cfg.teacher_model, self.cfg, env, dtype, shard_teacher, "teacher",
                                 self.vocab_size)
        return self.root

    def open(self, device: torch.device) -> LiveTeacher:
        return LiveTeacher(self.root)

    def describe(self) -> list[str]:
        return [f"teacher {parameter_count(self.root) / 1e6:.2f}M params: frozen, FSDP2 full shard, CPU offload "
                f"{'on' if self.cfg.teacher_offload else 'off'}; shared vocabulary {self.vocab_size}"]


class NoTeacherSetup:
    """Plain SFT: the vocabulary is the student's tokenizer, nothing loads, and there is no source."""

    def __init__(self, cfg, tokenizer):
        self.vocab_size = len(tokenizer)

    def check(self, tokenizer, sources) -> None:
        pass

    def load_model(self, env, dtype: torch.dtype) -> None:
        return None

    def open(self, device: torch.device) -> None:
        return None

    def describe(self) -> list[str]:
        return []


TEACHER_SOURCES: dict[str, Callable[..., TeacherSetup]] = {
    "live": LiveSetup,
    "cache": CacheSetup,  # any of teacher_cache.CACHE_MODES
    "none": NoTeacherSetup,
}


def setup_teacher(cfg, tokenizer) -> TeacherSetup:
    """The run's teacher source, before anything loads: a cache when one is named (a teacher_model named beside it
    is not loaded; `teacher_cache.check_cache_fits` says why), else the live teacher_model, else none."""
    kind = "cache" if cfg.teacher_cache else "live" if cfg.teacher_model else "none"
    return TEACHER_SOURCES[kind](cfg, tokenizer)


def student_loss(lm, batch: MicroBatch, spec: LossSpec, vocab_size: int, targets=None):
    """(summed loss, summed metrics) of one micro-batch against a source's targets (None: plain CE). Runs inside
    the student root's forward, so the student's head is gathered by FSDP while the kernel reads it and its
    gradient is reduced by FSDP afterwards."""
    hidden = hidden_at_targets(lm, batch)
    head = output_head(lm)
    if targets is None:
        return loss_against(hidden, head, batch.target_ids, spec, vocab_size, NO_TEACHER)
    return targets.distill(hidden, head, batch.target_ids, spec, vocab_size)
