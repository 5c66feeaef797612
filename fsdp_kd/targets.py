"""What the student is scored against in one call of the loss: one `Targets` subclass per form of teacher output,
each running the kernel's passes (`kernel.py`) over one token block in its own block function.

`LiveTargets` (a teacher's hidden states and head: `distillation_block`, or `student_bucket_block` for a divergence
taken over the student's top tokens), `SparseTargets` (a cached distribution over a few ids and a rest bucket:
`bucket_block`), `NO_TEACHER` (CE only: `student_block`); `cross_vocab.CrossVocabTargets` is a teacher of another
vocabulary. Another form of teacher output is one more `Targets` subclass with its block function; the divergences it
can take come from `divergences.py`. Bucketed distributions (a cached teacher's ids, the student's top tokens, the
shared tokens of two vocabularies) all take their gradient from `buckets.bucket_gradient`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from .buckets import (ID_MASKS, bucket_gradient, buckets_from_logs, id_places, log_probs_at, mass_on_buckets,
                      top_tokens)
from .divergences import Divergence, xlogy_sum
from .kernel import (METRIC_NAMES, Gradients, Head, KernelPlan, ModelBlock, accumulate, add_w_total, pass1_logits,
                     push_back, push_back_labels)


class Targets(ABC):
    """The teacher's side of one call of the loss, over the call's rows: each kind is one subclass, whose `block`
    runs the passes of one token block of the student against it. The loss loops over token blocks calling `block`
    and never asks which kind it has."""
    models = 1  # the models whose fp32 logits a token block caches (the student, and a live teacher): sizes blocks

    def weights(self, ce_weight: float, kd_coef: float) -> tuple[float, float]:
        """(CE weight, KD weight) of the loss against these targets, given the loss's own."""
        return ce_weight, kd_coef

    def check_vocab(self, vocab_size: int) -> None:
        """Raises ValueError when the targets do not reach over the shared vocabulary."""

    def scored(self, score, hidden: torch.Tensor, labels: torch.Tensor, spec):
        """The loss over these targets' rows, `score(hidden, labels, spec, targets)`: one call here; several teachers'
        targets (`routed_teacher.RoutedTargets`) make one per teacher, over its rows."""
        return score(hidden, labels, spec, self)

    def check_divergence(self, name: str, divergence: Divergence) -> None:
        """Raises ValueError when these targets cannot give what the divergence is taken over."""

    def row_blocks(self, n: int, block_rows: int) -> list[slice]:
        """The token blocks over the call's n rows, `block_rows` each but the last: targets whose term spans rows
        (a group of several tokens) cut them elsewhere."""
        return [slice(r0, min(r0 + block_rows, n)) for r0 in range(0, n, block_rows)]

    @abstractmethod
    def block(self, plan: KernelPlan, student: ModelBlock, labels: torch.Tensor, rows: slice,
              grads: Gradients | None) -> torch.Tensor:
        """The metric sums of token block `rows`, ordered as METRIC_NAMES (its last entries left out where they are 0
        for the block: `span_tokens` without groups of several tokens); with `grads`, the block's gradient is added
        into them."""


def check_head_rows(head: Head, vocab_size: int) -> None:
    if head.weight.shape[0] < vocab_size:
        raise ValueError(f"vocab_size {vocab_size} exceeds an output head's rows")


# ---------------------------------------------------------------------------------------------------- a live teacher
@dataclass
class LiveTargets(Targets):
    """A teacher run on the same rows: its final hidden states [N, hidden] and its frozen head (no gradient), whose
    logits are computed block by block beside the student's."""
    hidden: torch.Tensor
    head: Head
    weight: torch.Tensor = field(init=False)  # the head weight in the product dtype: one cast per call, if any
    models = 2

    def __post_init__(self):
        self.weight = self.head.weight.to(self.hidden.dtype)

    def check_vocab(self, vocab_size: int) -> None:
        check_head_rows(self.head, vocab_size)

    def block(self, plan, student, labels, rows, grads):
        teacher = ModelBlock(self.head, self.weight, self.head.bias, self.hidden[rows])
        block = student_bucket_block if plan.divergence.student_buckets else distillation_block
        return block(plan, student, teacher, labels, rows, grads)


def head_values(plan: KernelPlan, student: ModelBlock, teacher: ModelBlock) -> dict[str, torch.Tensor]:
    """The row values a divergence takes from both distributions at the teacher's most likely tokens (`on_head`), to
    start the block's row sums with; none for most divergences."""
    divergence = plan.divergence
    if divergence.on_head is None:
        return {}
    z_t, ids = top_tokens(teacher, plan.chunks, divergence.head_tokens)
    log_p = (z_t if plan.inv_tau == 1.0 else z_t * plan.inv_tau) - teacher.lse[:, None]
    log_q = log_probs_at(student, plan.chunks, ids, plan.inv_tau)
    return divergence.on_head(buckets_from_logs(log_p, log_q), plan.param)


def distillation_block(plan: KernelPlan, student: ModelBlock, teacher: ModelBlock, labels, rows: slice,
                       grads: Gradients | None) -> torch.Tensor:
    """One token block of both models: passes 1-3. Returns the block's metric sums, ordered as METRIC_NAMES.
    Its logit caches die with it, before the next block allocates its own."""
    pass1_logits(student, plan.chunks, labels, plan.inv_tau)
    pass1_logits(teacher, plan.chunks, labels, plan.inv_tau)
    sums = head_values(plan, student, teacher)
    if plan.w_source != "folded":  # pass 2
        for k, (z_s, z_t) in enumerate(zip(student.logits, teacher.logits)):
            part, w = plan.sums_fn(z_s, z_t, student.lse, teacher.lse, plan.inv_tau, plan.divergence, plan.param,
                                   grads is not None and plan.w_source == "stored")
            accumulate(sums, part)
            if w is not None:  # the teacher's logits are spent (pass 1 kept its normalizers): its slot keeps w
                teacher.logits[k] = w
    if grads is not None:
        add_w_total(sums, plan.divergence, plan.param, plan.w_source)
    for k, (v0, v1) in enumerate(plan.chunks if grads is not None else ()):  # pass 3
        grad_z, part = plan.grad_fn(student.logits[k], teacher.logits[k], student.lse, student.lse_raw, teacher.lse,
                                    sums, plan.inv_tau, plan.divergence, plan.param, plan.ce_coef,
                                    plan.kd_grad_scale, plan.w_source)
        if part is not None:
            accumulate(sums, part)
        push_back(grads, student, grad_z, student.logits[k], rows, v0, v1)
    if grads is not None:
        push_back_labels(grads, student, labels, rows, plan.ce_coef)
    kd = plan.divergence.value(sums, plan.param) * plan.kd_unit
    per_row = torch.stack([student.lse_raw - student.label_logit, kd, sums["p_log_p"] - sums["p_log_q"],
                           -sums["p_log_p"], -sums["q_log_q"], (student.argmax == teacher.argmax).float(),
                           teacher.lse_raw - teacher.label_logit, torch.ones_like(kd)])
    return per_row.sum(1)


def student_bucket_block(plan: KernelPlan, student: ModelBlock, teacher: ModelBlock, labels, rows: slice,
                         grads: Gradients | None) -> torch.Tensor:
    """One token block of both models for a divergence over the student's buckets (`Divergence.student_buckets`):
    the student's top k tokens (k = the divergence's parameter) and the rest, with both models' mass on each taken
    from their pass-1 logits. The metrics other than kd are the whole-vocabulary ones, as for `distillation_block`."""
    pass1_logits(student, plan.chunks, labels, plan.inv_tau)
    pass1_logits(teacher, plan.chunks, labels, plan.inv_tau)
    top, ids = top_tokens(student, plan.chunks, int(plan.param))
    places = id_places(ids, plan.chunks)
    (q, p), p_log_q = mass_on_buckets((student, teacher), places, plan.inv_tau, known_at=(top, None))
    b = buckets_from_logs(torch.cat([p.log_at, p.log_rest[:, None]], 1),
                          torch.cat([q.log_at, q.log_rest[:, None]], 1))
    value = bucket_gradient(plan, student, places, b, labels, rows, grads)
    per_row = torch.stack([student.lse_raw - student.label_logit, value * plan.kd_unit, p.x_log_x - p_log_q,
                           -p.x_log_x, -q.x_log_x, (student.argmax == teacher.argmax).float(),
                           teacher.lse_raw - teacher.label_logit, torch.ones_like(value)])
    return per_row.sum(1)


# ---------------------------------------------------------------------------------------------------- no teacher
class NoTeacher(Targets):
    """No teacher (plain SFT): the loss is the student's CE alone, whatever kd_coef says."""

    def weights(self, ce_weight: float, kd_coef: float) -> tuple[float, float]:
        return 1.0, 0.0

    def block(self, plan, student, labels, rows, grads):
        return student_block(plan, student, labels, rows, grads)


NO_TEACHER = NoTeacher()


def student_block(plan: KernelPlan, student: ModelBlock, labels, rows: slice, grads: Gradients | None):
    """One token block without a teacher: CE only. Returns the block's metric sums."""
    pass1_logits(student, plan.chunks, labels, plan.inv_tau)
    for k, (v0, v1) in enumerate(plan.chunks if grads is not None else ()):
        probs = torch.exp(student.logits[k] - student.lse_raw[:, None])
        push_back(grads, student, probs, student.logits[k], rows, v0, v1)
    if grads is not None:
        push_back_labels(grads, student, labels, rows, 1.0)
    ce = (student.lse_raw - student.label_logit).sum()
    return torch.cat([ce[None], ce.new_zeros(len(METRIC_NAMES) - 1)])


# ---------------------------------------------------------------------------------------------------- a cached teacher
@dataclass
class SparseTargets(Targets):
    """A cached teacher distribution per target row, at the run's temperature: `ids` [N, k] token ids, `log_p`
    [N, k] their log-probabilities (-inf on an empty slot), `log_rest` [N] the log of the mass on every other token
    (-inf when there is none: a sampled cache, or k = V). No two non-empty slots of a row hold the same id, and an
    empty slot repeats a non-empty slot's id. The divergence is taken between the bucketed distributions
    (`bucket_block`). `kd_rows` [N] bool, where given, marks the rows that have a teacher distribution at all; the
    others get the CE term alone (a cache across tokenizers: rows with no aligned teacher token)."""
    ids: torch.Tensor
    log_p: torch.Tensor
    log_rest: torch.Tensor
    kd_rows: torch.Tensor | None = None
    models = 1 + ID_MASKS  # the student's logits and the ids' masks

    def check_divergence(self, name: str, divergence: Divergence) -> None:
        if divergence.student_buckets:
            raise ValueError(f"{name} needs the teacher's probability at the student's most likely tokens, which a "
                             "cached teacher has only where they are among its own cached ones; train it with a "
                             "live teacher")

    def __getitem__(self, rows: slice) -> SparseTargets:
        return SparseTargets(self.ids[rows], self.log_p[rows], self.log_rest[rows],
                             None if self.kd_rows is None else self.kd_rows[rows])

    def block(self, plan, student, labels, rows, grads):
        return bucket_block(plan, student, self[rows], labels, rows, grads)


def bucket_block(plan: KernelPlan, student: ModelBlock, cached: SparseTargets, labels, rows: slice,
                 grads: Gradients | None) -> torch.Tensor:
    """One token block against a cached teacher: D between the bucketed distributions, the k cached tokens plus one
    bucket for the rest (the student's rest is its mass off the cached ids, a masked log-sum-exp). Returns the
    block's metric sums, ordered as METRIC_NAMES.
    Only the student's head is multiplied: the teacher side is [rows, k] numbers read from disk."""
    pass1_logits(student, plan.chunks, labels, plan.inv_tau)
    places = id_places(cached.ids, plan.chunks)
    (q,), _ = mass_on_buckets((student,), places, plan.inv_tau)
    log_q_cached = q.log_at.masked_fill(cached.log_p == -math.inf, -math.inf)  # empty slots are no bucket
    b = buckets_from_logs(torch.cat([cached.log_p, cached.log_rest[:, None]], 1),
                          torch.cat([log_q_cached, q.log_rest[:, None]], 1))
    value = bucket_gradient(plan, student, places, b, labels, rows, grads, cached.kd_rows)
    is_label = cached.ids == labels[:, None]
    teacher_log_p_label = torch.where(is_label.any(1), torch.where(is_label, cached.log_p, -math.inf).amax(1),
                                      cached.log_rest)
    teacher_top = cached.ids.gather(1, cached.log_p.argmax(1, keepdim=True))[:, 0]
    per_row = torch.stack([student.lse_raw - student.label_logit, value * plan.kd_unit,
                           xlogy_sum(b.p, b.log_p - b.log_q), -xlogy_sum(b.p, b.log_p), -q.x_log_x,
                           (student.argmax == teacher_top).float(), -teacher_log_p_label, torch.ones_like(value)])
    if cached.kd_rows is not None:  # a row without a teacher has the CE term alone (and counts in no kd_tokens)
        per_row[1:].masked_fill_(~cached.kd_rows[None], 0.0)
    return per_row.sum(1)
