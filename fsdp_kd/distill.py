"""The distillation step's glue between a model and the loss: a model's hidden states at the rows that are trained,
and the student's loss there against the teacher's targets for the micro-batch (`teacher.Teacher.targets`)."""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext

import torch

from .data import MicroBatch, uses_sliding_window
from .heads import output_head
from .targets import NO_TEACHER, Targets
from .loss import LossSpec, loss_against

PLAIN_CE: AbstractContextManager[Targets] = nullcontext(NO_TEACHER)  # no teacher: the student's CE alone


def hidden_at_targets(lm, batch: MicroBatch) -> torch.Tensor:
    """Final (normed) hidden states at the positions that have a trainable next-token target, [N, hidden].

    The rows are picked with `index_select` on indices computed on the host, so this never syncs the device. No KV
    cache: besides its memory, HF reads packed-sample boundaries off position_ids only when there is none."""
    inputs = batch.model_inputs(lm.config._attn_implementation, lm.get_input_embeddings().weight.dtype,
                                uses_sliding_window(lm.config))
    hidden = lm.base_model(**inputs, use_cache=False).last_hidden_state
    return hidden.flatten(0, 1).index_select(0, batch.target_rows)


def run_student(root, batch: MicroBatch, spec: LossSpec, vocab_size: int,
                targets: AbstractContextManager[Targets] = PLAIN_CE):
    """`student_loss` as the student root's forward. The targets ride in the function, not among the forward's
    arguments: FSDP casts every floating tensor among those to the compute dtype (`MixedPrecisionPolicy`'s
    cast_forward_inputs), which under bf16 would round a cache's log-probabilities (or stored hidden states) before
    the softmax they stand for."""
    return root(functools.partial(student_loss, targets=targets), batch, spec, vocab_size)


def student_loss(lm, batch: MicroBatch, spec: LossSpec, vocab_size: int,
                 targets: AbstractContextManager[Targets] = PLAIN_CE):
    """(summed loss, summed metrics) of one micro-batch against the teacher's targets, entered only once the
    student's hidden states are computed (a teacher's head is gathered just for the loss). Runs inside the student
    root's forward, so the student's head is gathered by FSDP while the kernel reads it and its gradient is reduced by
    FSDP afterwards."""
    hidden = hidden_at_targets(lm, batch)
    head = output_head(lm)
    with targets as teacher:
        return teacher.scored(lambda rows, labels, rows_spec, rows_targets: loss_against(
            rows, head, labels, rows_spec, vocab_size, rows_targets), hidden, batch.target_ids, spec)
