"""The span term across tokenizers: at a group of several tokens on a side (`cross_tokenizer.Alignment.spans`), each
model's probability of the group's text by the chain rule, compared as a distribution over two outcomes.

A group's student tokens y_1..y_k are predicted at student rows 1..k, its teacher tokens x_1..x_m at teacher rows
1..m, each teacher-forced on its own side's tokens of the text before (the same bytes on both sides: the groups
before). With q_i = q(y_i | ·) and p_j = p(x_j | ·) the tempered conditionals (softmax(z/τ)):

    Q = Π_i q_i,  P = Π_j p_j            each side's probability of the group's bytes, written its own way
    1 - Q = Σ_i (1 - q_i)·Π_{i'<i} q_i'   the student's tokens depart from the group's first at token i

and D(P‖Q) is the run's divergence between (P, 1 - P) and (Q, 1 - Q) (`Divergence.on_buckets` on two buckets), once
per group. Each complement is summed in log space from the rows' 1 - q_i, each a log-sum-exp over every token but
the label (`label_rest`), so it stays exact where it is tiny (a span the student is sure of).

The gradient, with w_1 = ∂D/∂log Q and w_0 = ∂D/∂log(1 - Q) from the divergence, ℓ_i = log q_i and
λ_i = log(1 - q_i):

    π_i = (1 - q_i)·Π_{i'<i} q_i' / (1 - Q)      the complement's share at token i (Σ_i π_i = 1)
    W1_i = ∂D/∂ℓ_i = w_1 + w_0·Σ_{i'>i} π_i'     W0_i = ∂D/∂λ_i = w_0·π_i
    dD/da_{i,v} = -q_v·(W1_i + W0_i) + [v = y_i]·W1_i + [v ≠ y_i]·(q_v / (1 - q_i))·W0_i

at the student's tempered logits a of row i: the two-bucket gradient of `buckets.bucket_gradient` with the label as
the one bucket, every factor bounded (π ≤ 1, q_v / (1 - q_i) ≤ 1), where dD/dℓ_i alone (w_1 - w_0·Q/(1 - Q)) is
not. The teacher's side is a constant: it needs only its pass 1 at its span rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .buckets import IdPlace, buckets_from_logs, id_places, logsumexp_rows
from .kernel import KernelPlan, ModelBlock, pass1_logits


def label_rest(logits: list[torch.Tensor], lse: torch.Tensor, labels: torch.Tensor, chunks,
               inv_tau: float) -> tuple[torch.Tensor, list[IdPlace]]:
    """(log(1 - q(label)) per row, where each row's label falls in each chunk): a log-sum-exp over every token but
    the label, chunk by chunk from pass-1 logits, exact where q(label) is all but 1."""
    places = id_places(labels[:, None], chunks)
    out = None
    for z, place in zip(logits, places):
        log_x = (z if inv_tau == 1.0 else z * inv_tau) - lse[:, None]
        chunk = logsumexp_rows(log_x.masked_fill_(place.mask(), -math.inf), may_be_empty=z.shape[1] == 1)
        out = chunk if out is None else torch.logaddexp(out, chunk)
    return out, places


@dataclass
class SpanMass:
    """One side's log-probabilities of a block's groups [G]: of the span (log Q), of its complement (log(1 - Q)), and
    [G, width] the log of each token's first-departure term (1 - q_i)·Π_{i'<i} q_i', -inf past a group's end."""
    log_span: torch.Tensor
    log_rest: torch.Tensor
    first_miss: torch.Tensor


def span_mass(log_label: torch.Tensor, log_rest: torch.Tensor, group: torch.Tensor, slot: torch.Tensor, groups: int,
              width: int) -> SpanMass:
    """`SpanMass` from each row's ℓ_i and λ_i, and its group and place there."""
    ell = log_label.new_zeros(groups, width).index_put_((group, slot), log_label)
    first_miss = log_label.new_full((groups, width), -math.inf).index_put_((group, slot), log_rest)
    first_miss += torch.nn.functional.pad(ell.cumsum(1)[:, :-1], (1, 0))  # Σ_{i'<i} ℓ_i'
    return SpanMass(ell.sum(1), logsumexp_rows(first_miss, may_be_empty=True), first_miss)


def teacher_span_mass(pieces, chunks, inv_tau: float, group: torch.Tensor, slot: torch.Tensor, groups: int,
                      width: int) -> SpanMass:
    """The teacher's `SpanMass` of a block's groups from its span rows, given as (ModelBlock, labels) pieces, each
    with its logits alive only while it is read."""
    ells, rests = [], []
    for model, labels in pieces:
        pass1_logits(model, chunks, labels, inv_tau)
        rest, _ = label_rest(model.logits, model.lse, labels, chunks, inv_tau)
        ells.append(model.label_logit * inv_tau - model.lse)
        rests.append(rest)
        model.logits.clear()
    return span_mass(torch.cat(ells), torch.cat(rests), group, slot, groups, width)


@dataclass
class SpanTerm:
    """The span term of one token block, for the student's pass 3: its rows (local), their tempered log-sum-exp,
    λ_i, W1_i and W0_i, where each label falls per chunk, and Σ_g kd_unit·D_g."""
    rows: torch.Tensor
    lse: torch.Tensor
    log_rest: torch.Tensor
    w_label: torch.Tensor
    w_rest: torch.Tensor
    places: list[IdPlace]
    value: torch.Tensor

    def add_rest(self, part: torch.Tensor, k: int, z: torch.Tensor, inv_tau: float) -> None:
        """(q_v / (1 - q_i))·W0_i at every token but the label, added into a chunk's w of the block's rows."""
        z_rows = z.index_select(0, self.rows)
        log_x = (z_rows if inv_tau == 1.0 else z_rows * inv_tau) - (self.lse + self.log_rest)[:, None]
        share = log_x.masked_fill_(self.places[k].mask(), -math.inf).exp_()
        part.index_add_(0, self.rows, share.mul_(self.w_rest[:, None]))

    def add_totals(self, w_total: torch.Tensor) -> torch.Tensor:
        """Σ_B w_B of the span rows (W1_i + W0_i) added to the block's [rows, 1]."""
        return w_total.index_add(0, self.rows, (self.w_label + self.w_rest)[:, None])

    def label_weights(self, rows: int, kd_scale: float) -> torch.Tensor:
        """[rows] the one-hot term's weight at each row's label: kd_scale·W1_i on the span rows."""
        return self.w_label.new_zeros(rows).index_add_(0, self.rows, self.w_label * kd_scale)


def student_span_term(plan: KernelPlan, student: ModelBlock, labels: torch.Tensor, span, teacher: SpanMass,
                      weight: float) -> SpanTerm:
    """The span term of a block whose student pass 1 has run, against the teacher's `SpanMass` of its groups
    (`span`: the block's `data.SpanBlock`), `weight` times D."""
    rows, inv_tau = span.rows, plan.inv_tau
    lse = student.lse[rows]
    log_rest, places = label_rest([z.index_select(0, rows) for z in student.logits], lse, labels[rows], plan.chunks,
                                  inv_tau)
    q = span_mass(student.label_logit[rows] * inv_tau - lse, log_rest, span.group, span.slot, span.groups,
                  span.width)
    b = buckets_from_logs(torch.stack([teacher.log_span, teacher.log_rest], 1),
                          torch.stack([q.log_span, q.log_rest], 1))
    value, w = plan.divergence.on_buckets(b, plan.param)
    if weight != 1.0:
        value, w = value * weight, w * weight
    log_complement = torch.where(q.log_rest > -math.inf, q.log_rest, 0.0)  # a row of -inf only: no share anywhere
    share = (q.first_miss - log_complement[:, None]).exp()
    after = share.flip(1).cumsum(1).flip(1) - share  # Σ_{i'>i} π_i'
    w_label = (w[:, :1] + w[:, 1:] * after)[span.group, span.slot]
    w_rest = (w[:, 1:] * share)[span.group, span.slot]
    return SpanTerm(rows, lse, log_rest, w_label, w_rest, places, value.sum() * plan.kd_unit)
