"""A teacher with another vocabulary, as one more `targets.Targets` entry: the loss at positions where the two
tokenizations align one token to one token (`cross_tokenizer.align`), and at groups of several tokens on a side
the span term (`span_term`: each model's chain-rule probability of the group's text), folded into the same passes.

At such a position the teacher's p is over its vocabulary V_t and the student's q over V_s. The two are compared in
two parts (docs/cross_tokenizer.md has the formulas with every term defined):

  exact part  the tokens that spell the same bytes in both vocabularies (`cross_tokenizer.shared_vocabulary`, m
              pairs) are buckets of their own, and every other token of a side falls in that side's rest bucket:
              P_j = p(t_j), Q_j = q(s_j), P_r = 1 - Σ_j P_j, Q_r = 1 - Σ_j Q_j. The run's divergence D(P‖Q) is taken
              between these (m + 1)-bucket distributions (`Divergence.on_buckets`), exactly as for a cached teacher;
  ULD part    the tokens without a counterpart have no common index, so they are compared by rank (Boizard et al.
              2024): ULD = Σ_{i<k} |p̃_(i) - q̃_(i)| over each side's k most likely such tokens, sorted (`uld_topk`;
              the full sort is the same sum with k = V, and the tail beyond k is left out).

With `prefix_buckets`, a side's token without a counterpart whose bytes start with a shared token's bytes joins
that token's bucket (the longest such: `prefix_joins`) rather than the rest: P_j and Q_j are then each side's
probability that the text goes on with token j's bytes, not that its next token is exactly token j; ULD is over the
tokens that join no bucket. Exact where the other side's tokens are single characters (the demo's teacher).

KD = D(P‖Q) + uld_weight·ULD. With the same tokenizer on both sides every token is shared, both rest buckets and
the ULD part are empty, and the loss is today's live KD (tested to fp32 rounding).

Everything is chunked as for a live teacher: each model's logits exist one token block at a time, over its own
vocabulary's chunks. The shared columns are the same for every row, so a chunk's shared columns are a fixed index
list (`SharedColumns`), found once per block shape on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .divergences import row_dot, xlogy_sum
from .buckets import IdPlace, buckets_from_logs, id_places, logsumexp_rows, merge_top
from .kernel import (Gradients, Head, KernelPlan, ModelBlock, logit_grad, pass1_logits, push_back, push_back_labels,
                     vocab_chunks)
from .span_term import SpanMass, student_span_term, teacher_span_mass
from .targets import Targets, check_head_rows

if TYPE_CHECKING:
    from .data import SpanBlock, Spans


# The live KD metrics across tokenizers: sums over the rows aligned one to one (per trained token, as every metric),
# the KL over the shared tokens' buckets, the entropies over each whole vocabulary, the top-1 through the id map.
ALIGNED_METRIC_NAMES = {"kl": "kl_shared_buckets", "teacher_entropy": "teacher_entropy_aligned",
                        "student_entropy": "student_entropy_aligned", "top1_agreement": "top1_agreement_aligned",
                        "teacher_ce": "teacher_ce_aligned", "span_tokens": "kd_span_tokens"}


def renormalized_side(shared: int, student_size: int, teacher_size: int) -> str | None:
    """`VocabMap.renormalized` from the sizes alone."""
    student_all, teacher_all = shared == student_size, shared == teacher_size
    if student_all == teacher_all:
        return None
    return "teacher" if student_all else "student"


def prefix_joins(spelled, regular, own_ids: np.ndarray) -> np.ndarray:
    """[tokens] for each token of a vocabulary (what each spells, and whether it is a regular token: `cross_tokenizer.
    TokenBytes`) without a counterpart, the shared bucket it joins under `prefix_buckets`: that of the longest
    shared token (`own_ids`, this side's ids, bucket j at j) whose bytes its bytes start with; -1 for a shared token,
    a special one, or one that starts with no shared token's bytes."""
    bucket_of = {spelled[i]: j for j, i in enumerate(own_ids.tolist())}
    joins = np.full(len(spelled), -1, dtype=np.int64)
    shared = set(own_ids.tolist())
    for i, (text, is_regular) in enumerate(zip(spelled, regular)):
        if i in shared or not is_regular:
            continue
        joins[i] = next((bucket_of[text[:n]] for n in range(len(text) - 1, 0, -1) if text[:n] in bucket_of), -1)
    return joins


def bucket_logsumexp(log_x: torch.Tensor, bucket: torch.Tensor, buckets: int) -> torch.Tensor:
    """[rows, buckets] the log of each bucket's mass from log-masses [rows, n] and each column's bucket [n]; -inf
    where a bucket has no column."""
    shape = (log_x.shape[0], buckets)
    top = log_x.new_full(shape, -math.inf).scatter_reduce_(1, bucket.expand_as(log_x), log_x, "amax")
    shift = torch.where(top > -math.inf, top, 0.0)
    total = log_x.new_zeros(shape).index_add_(1, bucket, (log_x - shift.index_select(1, bucket)).exp())
    return total.log_() + shift


@dataclass
class SharedColumns:
    """One vocabulary chunk of one side: which of its columns are in a shared bucket (`local`, as indices into the
    chunk: the shared tokens, then under `prefix_buckets` the tokens that join one) and which bucket each is in
    (`bucket`), and the same as a column mask."""
    local: torch.Tensor  # [m_c] long
    bucket: torch.Tensor  # [m_c] long
    mask: torch.Tensor  # [columns] bool
    all_shared: bool  # every column of the chunk is shared: its rest is empty


@dataclass
class VocabMap:
    """The shared vocabulary on a device: `student_ids[j]` and `teacher_ids[j]` spell the same bytes. With
    `student_joins` / `teacher_joins` ([size], `prefix_joins`), a side's tokens without a counterpart that join a
    shared bucket."""
    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_size: int
    teacher_size: int
    student_joins: np.ndarray | None = None
    teacher_joins: np.ndarray | None = None
    student_to_teacher: torch.Tensor = field(init=False)  # [student_size] the teacher's id, or -1
    teacher_to_student: torch.Tensor = field(init=False)  # [teacher_size] the student's id, or -1
    _columns: dict = field(default_factory=dict, init=False)
    _joined: dict = field(default_factory=dict, init=False)  # per side, how many tokens join a shared bucket

    def __post_init__(self):
        device = self.student_ids.device
        self.student_to_teacher = torch.full((self.student_size,), -1, dtype=torch.long, device=device)
        self.student_to_teacher[self.student_ids] = self.teacher_ids
        self.teacher_to_student = torch.full((self.teacher_size,), -1, dtype=torch.long, device=device)
        self.teacher_to_student[self.teacher_ids] = self.student_ids
        self._joined = {side: 0 if joins is None else int((joins >= 0).sum())
                        for side, joins in (("student", self.student_joins), ("teacher", self.teacher_joins))}

    @property
    def shared(self) -> int:
        return len(self.student_ids)

    @property
    def renormalized(self) -> str | None:
        """The side compared over the shared tokens alone, renormalized, when the other side's every token is shared:
        that side has no rest bucket, so mass in the first side's rest would have no counterpart (an infinite
        forward or reverse KL). "teacher" when the student's vocabulary is all shared (a student a subset of its
        teacher by spelling), "student" when the teacher's is; None when both or neither are."""
        # a side whose every token is in a shared bucket has no rest, as when every token is shared
        return renormalized_side(self.shared, self.student_size - self.joined("student"),
                                 self.teacher_size - self.joined("teacher"))

    def joined(self, side: str) -> int:
        """How many of a side's tokens without a counterpart join a shared bucket (`prefix_buckets`)."""
        return self._joined[side]

    def columns(self, side: str, chunks) -> list[SharedColumns]:
        """Per chunk of `side`'s vocabulary, its shared columns; found on the host once per chunk layout."""
        key = (side, tuple(chunks))
        if key not in self._columns:
            ids = (self.student_ids if side == "student" else self.teacher_ids).cpu().numpy()
            size = self.student_size if side == "student" else self.teacher_size
            if len(np.unique(ids)) != len(ids) or (len(ids) and not 0 <= ids.min() <= ids.max() < size):
                raise ValueError(f"the {side}'s shared ids must be distinct ids below {size}")
            device = self.student_ids.device
            joins = self.student_joins if side == "student" else self.teacher_joins
            joins = np.full(size, -1, dtype=np.int64) if joins is None else joins
            per_chunk = []
            for v0, v1 in chunks:
                buckets = np.flatnonzero((ids >= v0) & (ids < v1))
                joining = np.flatnonzero(joins[v0:v1] >= 0)
                local = torch.from_numpy(np.concatenate([ids[buckets] - v0, joining])).to(device)
                mask = torch.zeros(v1 - v0, dtype=torch.bool, device=device)
                mask[local] = True
                bucket = torch.from_numpy(np.concatenate([buckets, joins[v0:v1][joining]])).to(device)
                per_chunk.append(SharedColumns(local, bucket, mask, len(local) == v1 - v0))
            self._columns[key] = per_chunk
        return self._columns[key]


@dataclass
class SideMass:
    """One side's tempered distribution at a block's rows: over the shared buckets, its rest, its entropy term, and
    its k most likely tokens without a counterpart (sorted, with their ids)."""
    log_shared: torch.Tensor  # [rows, m]
    log_rest: torch.Tensor  # [rows]
    x_log_x: torch.Tensor  # [rows]
    top_log: torch.Tensor  # [rows, k] most likely first; -inf where the side has fewer such tokens
    top_ids: torch.Tensor  # [rows, k]


def side_mass(model: ModelBlock, chunks, columns: list[SharedColumns], shared: int, k: int, inv_tau: float,
              joined: bool = False) -> SideMass:
    """`SideMass` from a model's pass-1 logits, in one sweep of its chunks; `joined`: some bucket holds several
    tokens (`prefix_buckets`), so each is a log-sum-exp over its tokens."""
    rows = model.lse.shape[0]
    log_shared = (torch.full((rows, shared), -math.inf, device=model.lse.device) if joined else
                  torch.empty(rows, shared, device=model.lse.device))
    x_log_x = lse_rest = top_log = top_ids = None
    for z, (v0, v1), cols in zip(model.logits, chunks, columns):
        log_x = (z if inv_tau == 1.0 else z * inv_tau) - model.lse[:, None]
        term = row_dot(log_x.exp(), log_x)
        x_log_x = term if x_log_x is None else x_log_x + term
        if joined:
            log_shared = torch.logaddexp(log_shared, bucket_logsumexp(log_x.index_select(1, cols.local), cols.bucket,
                                                                      shared))
        else:
            log_shared.index_copy_(1, cols.bucket, log_x.index_select(1, cols.local))
        log_x.masked_fill_(cols.mask, -math.inf)  # now only the tokens without a counterpart
        chunk_rest = logsumexp_rows(log_x, may_be_empty=cols.all_shared)
        lse_rest = chunk_rest if lse_rest is None else torch.logaddexp(lse_rest, chunk_rest)
        values, ids = log_x.topk(min(k, v1 - v0), dim=1)
        top_log, top_ids = merge_top(top_log, top_ids, values, ids + v0, k)
    return SideMass(log_shared, lse_rest, x_log_x, top_log, top_ids)


def _buckets(side: SideMass, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-masses [rows, m + 1] over the shared buckets then the rest, and with `renormalize` log S [rows, 1] =
    log Σ_shared): as they are, or renormalized over the shared tokens with an empty rest (`VocabMap.renormalized`)."""
    if not renormalize:
        return torch.cat([side.log_shared, side.log_rest[:, None]], 1), None
    log_s = logsumexp_rows(side.log_shared, may_be_empty=False)[:, None]
    empty = torch.full_like(log_s, -math.inf)
    return torch.cat([side.log_shared - log_s, empty], 1), log_s


def uld(p: SideMass, q: SideMass) -> tuple[torch.Tensor, torch.Tensor]:
    """(ULD per row, w = ∂ULD/∂log q at the student's ranked tokens): Σ_i |p̃_(i) - q̃_(i)| over ranks, the shorter
    side padded with zeros; w_i = q̃_(i)·sign(q̃_(i) - p̃_(i)), the ranking a constant of the gradient."""
    k = max(p.top_log.shape[1], q.top_log.shape[1])
    p_sorted = torch.nn.functional.pad(p.top_log.exp(), (0, k - p.top_log.shape[1]))
    q_sorted = torch.nn.functional.pad(q.top_log.exp(), (0, k - q.top_log.shape[1]))
    gap = q_sorted - p_sorted
    return gap.abs().sum(1), (q_sorted * gap.sign())[:, :q.top_log.shape[1]]


def cross_vocab_block(plan: KernelPlan, student: ModelBlock, teacher: ModelBlock, targets: CrossVocabTargets,
                      labels, teacher_labels, rows: slice, grads: Gradients | None,
                      span: tuple[SpanBlock, SpanMass] | None = None) -> torch.Tensor:
    """One token block against a teacher of another vocabulary; returns the block's metric sums (METRIC_NAMES).
    With `span` (the block's groups of several tokens and the teacher's `SpanMass` of them) the span term of
    `span_term` is added, its gradient folded into the same passes: W1_i + W0_i into the softmax term's Σw,
    (q_v / (1 - q_i))·W0_i into the dense term, W1_i into the label's one-hot weight.

    With w the exact part's ∂D/∂log Q per bucket and u the ULD part's ∂ULD/∂log q at the student's ranked tokens,
    the gradient with respect to the student's tempered logits is
        -q_v·(Σ_B w_B + λ·Σ_i u_i) + [v in B]·(q_v / Q_B)·w_B + [v in no B]·(q_v / Q_r)·w_r + λ·[v ranked]·u_v,
    each factor bounded, as in `buckets.bucket_gradient` (q_v / Q_B is 1 where B holds token v alone, as without
    `prefix_buckets`). When the student is renormalized over the shared tokens
    (`VocabMap.renormalized`: Q_j = q_j / S, S = Σ_shared q, no rest), the exact part's softmax term is over the shared
    tokens alone: -[v shared]·(q_v / S)·Σ_B w_B in place of the first and third terms' w parts."""
    vmap, inv_tau = targets.vocab_map, plan.inv_tau
    t_chunks = vocab_chunks(vmap.teacher_size, plan.chunks[0][1] - plan.chunks[0][0])
    pass1_logits(student, plan.chunks, labels, inv_tau)
    pass1_logits(teacher, t_chunks, teacher_labels, inv_tau)
    term = None if span is None else student_span_term(plan, student, labels, *span, targets.span_weight)
    s_cols, t_cols = vmap.columns("student", plan.chunks), vmap.columns("teacher", t_chunks)
    joined = vmap.joined("student") > 0
    q = side_mass(student, plan.chunks, s_cols, vmap.shared, targets.uld_topk, inv_tau, joined)
    p = side_mass(teacher, t_chunks, t_cols, vmap.shared, targets.uld_topk, inv_tau, vmap.joined("teacher") > 0)
    renormalize_q = vmap.renormalized == "student"
    log_p, _ = _buckets(p, vmap.renormalized == "teacher")
    log_q, log_s = _buckets(q, renormalize_q)
    b = buckets_from_logs(log_p, log_q)
    value, w = plan.divergence.on_buckets(b, plan.param)
    uld_value, u = uld(p, q)
    aligned = None if targets.aligned is None else targets.aligned[rows][:, None] > 0
    if aligned is not None:  # a row without an aligned teacher token gets the CE term alone: no KD gradient there
        w, u = w.masked_fill(~aligned, 0.0), u.masked_fill(~aligned, 0.0)
    lam, kd_scale = targets.uld_weight, plan.kd_grad_scale
    if grads is not None:
        exact_total = w.sum(1, keepdim=True) / b.q.sum(1, keepdim=True)
        w_total = lam * u.sum(1, keepdim=True) + (0.0 if renormalize_q else exact_total)
        if term is not None:
            w_total = term.add_totals(w_total)
        w_rest, w_shared = w[:, -1:], w[:, :-1] * kd_scale
        log_rest = torch.where(b.log_q[:, -1:] > -math.inf, b.log_q[:, -1:], 0.0)  # no rest: never read
        u_places: list[IdPlace] = id_places(q.top_ids, plan.chunks)
        u = u * (lam * kd_scale)
        for k, (v0, v1) in enumerate(plan.chunks):
            z, cols = student.logits[k], s_cols[k]
            log_q_v = (z if inv_tau == 1.0 else z * inv_tau) - student.lse[:, None]
            q_chunk = log_q_v.exp()
            # a bucket's w at its tokens, each times its share of the bucket (q_v / Q_B: 1 for a bucket of one token)
            w_members = w_shared.index_select(1, cols.bucket)
            if joined:
                w_members *= (log_q_v.index_select(1, cols.local) - q.log_shared.index_select(1, cols.bucket)).exp()
            if renormalize_q:  # -(q_v / S)·Σ_B w_B on the shared tokens
                part = log_q_v.masked_fill_(~cols.mask, -math.inf).sub_(log_s).exp_().mul_(-exact_total)
            else:  # (q_v / Q_r)·w_r off them
                part = log_q_v.masked_fill_(cols.mask, -math.inf).sub_(log_rest).exp_().mul_(w_rest)
            if term is not None:
                term.add_rest(part, k, z, inv_tau)
            grad_z = logit_grad(z, q_chunk, student.lse_raw, part, w_total, inv_tau, plan.ce_coef, kd_scale)
            grad_z.index_add_(1, cols.local, w_members)
            grad_z.scatter_add_(1, u_places[k].local, u * u_places[k].here)
            push_back(grads, student, grad_z, z, rows, v0, v1)
        push_back_labels(grads, student, labels, rows, plan.ce_coef,
                         None if term is None else term.label_weights(len(labels), kd_scale))
    top1 = vmap.student_to_teacher[student.argmax] == teacher.argmax
    per_row = torch.stack([student.lse_raw - student.label_logit, (value + lam * uld_value) * plan.kd_unit,
                           xlogy_sum(b.p, b.log_p - b.log_q), -p.x_log_x, -q.x_log_x, top1.float(),
                           teacher.lse_raw - teacher.label_logit, torch.ones_like(value)])
    if aligned is not None:  # ... and no KD metrics (nor a kd_tokens count): those are sums over the aligned rows
        per_row[1:].masked_fill_(~aligned.T, 0.0)
    sums = per_row.sum(1)
    if term is not None:  # the groups' D, once per group, and their rows (`span_tokens`, a host count: the layout's)
        sums[1] += term.value
        sums = torch.cat([sums, sums.new_full((1,), len(term.rows))])
    return sums


@dataclass
class CrossVocabTargets(Targets):
    """A teacher of another vocabulary, run on its own tokens: its final hidden states at the positions aligned one
    to one with the call's rows [N, hidden_t], its next token there (`labels`, for its CE metric), its head, and the
    vocabularies' shared tokens. `uld_weight` (λ) weighs the ULD part over each side's `uld_topk` most likely tokens
    without a counterpart. A row whose token has no one-to-one counterpart (`aligned` 0) gets no bucket term, and its
    hidden state and label only need to be a valid teacher row's; where it is in a group of several tokens
    (`spans`, `data.Spans`) it gets the span term (`span_term`), from the teacher's rows after the first N in
    `hidden` and `labels` (the positions predicting the group's teacher tokens), and else the CE term alone."""
    hidden: torch.Tensor
    head: Head
    labels: torch.Tensor
    vocab_map: VocabMap
    uld_weight: float = 1.0
    uld_topk: int = 64
    aligned: torch.Tensor | None = None  # [N] 0.0 where a row has no aligned teacher token (None: every row has)
    spans: Spans | None = None
    span_weight: float = 1.0  # the span term's weight
    weight: torch.Tensor = field(init=False)
    rows: int = field(init=False)  # N: the teacher's rows aligned with the call's, before its span rows

    def __post_init__(self):
        self.weight = self.head.weight.to(self.hidden.dtype)
        self.rows = self.hidden.shape[0] - (0 if self.spans is None else self.spans.teacher_rows)

    @property
    def models(self) -> float:
        """What a token block keeps, in the student's logits' worth (which `choose_chunks` sizes blocks by): its own
        logits, the teacher's over its vocabulary, and the [rows × shared] bucket tensors alive at the peak (both
        sides' log-probabilities, the bucketed log and linear copies, the divergence's temporaries and w: about
        nine)."""
        vmap = self.vocab_map
        return 1 + (vmap.teacher_size + 9 * vmap.shared) / vmap.student_size

    def check_vocab(self, vocab_size: int) -> None:
        if vocab_size != self.vocab_map.student_size:
            raise ValueError(f"the vocabulary map is for a student vocabulary of {self.vocab_map.student_size}, "
                             f"not {vocab_size}")
        check_head_rows(self.head, self.vocab_map.teacher_size)

    def check_divergence(self, name, divergence) -> None:
        if divergence.student_buckets:
            raise ValueError(f"{name} takes its buckets from the student's own top tokens, which have no counterpart "
                             "in another vocabulary; use one of the whole-vocabulary divergences (forward_kl, ...)")

    def row_blocks(self, n: int, block_rows: int) -> list[slice]:
        return super().row_blocks(n, block_rows) if self.spans is None else self.spans.row_blocks(n, block_rows)

    def block(self, plan, student, labels, rows, grads):
        span = None if self.spans is None else self.spans.block(rows)
        if span is not None:  # the teacher's side of the groups first, before the block's logits exist
            span = span, self._teacher_span_mass(plan, span, rows.stop - rows.start)
        teacher = ModelBlock(self.head, self.weight, self.head.bias, self.hidden[rows])
        return cross_vocab_block(plan, student, teacher, self, labels, self.labels[rows], rows, grads, span)

    def _teacher_span_mass(self, plan, span: SpanBlock, piece: int) -> SpanMass:
        """The teacher's `SpanMass` of a block's groups, from its span rows in pieces of at most `piece` rows (the
        block's size: one piece's logits at a time)."""
        t_chunks = vocab_chunks(self.vocab_map.teacher_size, plan.chunks[0][1] - plan.chunks[0][0])
        first, last = self.rows + span.teacher.start, self.rows + span.teacher.stop
        pieces = ((ModelBlock(self.head, self.weight, self.head.bias, self.hidden[r0:min(r0 + piece, last)]),
                   self.labels[r0:min(r0 + piece, last)]) for r0 in range(first, last, piece))
        return teacher_span_mass(pieces, t_chunks, plan.inv_tau, span.teacher_group, span.teacher_slot, span.groups,
                                 span.teacher_width)


def topk_in_student_vocabulary(ids: torch.Tensor, log_p: torch.Tensor, log_rest: torch.Tensor,
                               aligned: torch.Tensor, vocab_map: VocabMap) -> tuple[torch.Tensor, ...]:
    """A teacher's top-k rows (`teacher_cache.teacher_topk`, in its vocabulary) as a top-k cache of the student's
    vocabulary stores them: the shared tokens under their student ids, every unshared one folded into the rest
    bucket, and no distribution at all (every slot and the rest -inf) on a row without an aligned teacher token.

    Trained from, these rows give the exact part of the cross-tokenizer loss over the teacher's top-k: its shared
    tokens each a bucket, the rest one bucket. A row whose top-k holds no shared token would have the rest alone on
    both sides, where every divergence is 0; it is stored as no distribution too. An empty slot repeats the row's
    first non-empty id, as `targets.SparseTargets` asks."""
    student_ids = vocab_map.teacher_to_student[ids]
    unshared = student_ids < 0
    folded = logsumexp_rows(log_p.masked_fill(~unshared, -math.inf), may_be_empty=True)
    log_rest = torch.logaddexp(log_rest, folded)
    log_p = log_p.masked_fill(unshared, -math.inf)
    has = (log_p > -math.inf).any(1) & (aligned > 0)
    student_ids = torch.where(unshared, student_ids.gather(1, log_p.argmax(1, keepdim=True)), student_ids)
    return (student_ids.clamp_min(0), log_p.masked_fill(~has[:, None], -math.inf),
            log_rest.masked_fill(~has, -math.inf))
