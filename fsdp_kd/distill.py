"""The distillation step's glue between the models and the loss: which rows are trained, and where the teacher's
targets come from.

The loss and the training loop never touch a teacher model directly. They take targets from a source, whose
`targets(batch)` returns something with `distill(hidden, head, labels, spec, vocab_size)`: `LiveTeacher` runs the
sharded teacher on each micro-batch (`TeacherTargets`); `teacher_cache.CachedTeacher` reads a cache of teacher
distributions (`CachedTargets`). A server would be a third source. `distill` hands the loss a `kernel.Targets`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable

import torch

from .data import MicroBatch
from .heads import output_head
from .kernel import NO_TEACHER, Head, LiveTargets
from .loss import LossSpec, loss_against


def hidden_at_targets(lm, batch: MicroBatch) -> torch.Tensor:
    """Final (normed) hidden states at the positions that have a trainable next-token target, [N, hidden].

    The rows are picked with `index_select` on indices computed on the host, so this never syncs the device. No KV
    cache: besides its memory, HF reads packed-sample boundaries off position_ids only when there is none."""
    inputs = batch.model_inputs(lm.config._attn_implementation, lm.get_input_embeddings().weight.dtype)
    hidden = lm.base_model(**inputs, use_cache=False).last_hidden_state
    return hidden.flatten(0, 1).index_select(0, batch.target_rows)


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

    @torch.no_grad()
    def targets(self, batch: MicroBatch) -> TeacherTargets:
        return TeacherTargets(self.root(hidden_at_targets, batch), self.root.gathered_head)


def student_loss(lm, batch: MicroBatch, spec: LossSpec, vocab_size: int, targets=None):
    """(summed loss, summed metrics) of one micro-batch against a source's targets (None: plain CE). Runs inside
    the student root's forward, so the student's head is gathered by FSDP while the kernel reads it and its
    gradient is reduced by FSDP afterwards."""
    hidden = hidden_at_targets(lm, batch)
    head = output_head(lm)
    if targets is None:
        return loss_against(hidden, head, batch.target_ids, spec, vocab_size, NO_TEACHER)
    return targets.distill(hidden, head, batch.target_ids, spec, vocab_size)
