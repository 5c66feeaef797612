"""Bucketed distributions in the loss kernel: some tokens of each row (a cached teacher's ids, the student's top
tokens, the tokens two vocabularies share) each a bucket of its own, and one bucket for the rest of the vocabulary.

A block finds where its ids fall in each vocabulary chunk once (`id_places`), takes each model's mass on the buckets
from its pass-1 logits in one sweep (`mass_on_buckets`), and gets D between the bucketed distributions and its
gradient from `bucket_gradient`, whatever chose the buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .divergences import Buckets, row_dot
from .kernel import Gradients, KernelPlan, ModelBlock, logit_grad, push_back, push_back_labels

ID_MASKS = 0.25  # a block that places bucket ids keeps a bool per logit (`IdPlace.mask`): a quarter of fp32 logits


@dataclass
class IdPlace:
    """Where a block's bucket ids [rows, k] fall in one vocabulary chunk of `columns` columns: found once per block
    and chunk, for every sweep that needs them."""
    here: torch.Tensor  # [rows, k] whether the id is in this chunk
    local: torch.Tensor  # [rows, k] its column in the chunk, clamped into it where it is not
    columns: int

    _mask: torch.Tensor | None = None

    def mask(self) -> torch.Tensor:
        """[rows, columns] bool: the chunk's columns that hold one of the ids; made once (a quarter of the chunk's
        fp32 logits in size), for every sweep of the block."""
        if self._mask is None:
            hit = torch.zeros(self.here.shape[0], self.columns + 1, dtype=torch.bool, device=self.here.device)
            slot = torch.where(self.here, self.local, self.columns)  # the extra last column takes the misses
            self._mask = hit.scatter_(1, slot, True)[:, :-1]
        return self._mask


def id_places(ids: torch.Tensor, chunks) -> list[IdPlace]:
    places = []
    for v0, v1 in chunks:
        local = ids - v0
        clamped = local.clamp(0, v1 - v0 - 1)
        here = clamped == local
        places.append(IdPlace(here, clamped, v1 - v0))
    return places


@dataclass
class BucketMass:
    """A model's tempered distribution over buckets: the tokens `ids` [rows, k] and one bucket for the rest."""
    log_at: torch.Tensor  # [rows, k] log q at the ids
    log_rest: torch.Tensor  # [rows] the log of its mass on every other token (-inf when there is none)
    x_log_x: torch.Tensor  # [rows] Σ q·log q over the whole vocabulary


def mass_on_buckets(models: tuple[ModelBlock, ...], places: list[IdPlace], inv_tau: float,
                    known_at: tuple[torch.Tensor | None, ...] | None = None) -> tuple[list[BucketMass], torch.Tensor]:
    """Each model's `BucketMass` from its pass-1 logits, in one sweep of the chunks for all the models: the
    log-probabilities at the ids gathered from the chunk that holds each (unless `known_at` gives a model's logits
    there, as `top_tokens` does), the rest as a log-sum-exp over each chunk with the ids masked out (exact even when
    that mass is ~0, as it is at k = V), and with two models (q, p) also Σ p·log q over the whole vocabulary (else
    0). Pass 2 of a cached teacher for the student, and of a divergence over the student's buckets for both models;
    the cache's builder uses it for the teacher."""
    n, n_ids = len(models), places[0].here.shape[1]
    z_at = list(known_at or [None] * n)
    gather = [z is None for z in z_at]
    lse_rest, x_log_x, p_log_q = [None] * n, [None] * n, 0.0
    for k, place in enumerate(places):
        hit = place.mask()
        log_x = []
        for i, model in enumerate(models):
            z = model.logits[k]
            log_x.append((z if inv_tau == 1.0 else z * inv_tau) - model.lse[:, None])
            x = log_x[i].exp()
            x_log_x[i] = row_dot(x, log_x[i]) if k == 0 else x_log_x[i] + row_dot(x, log_x[i])
            if n == 2 and i == 1:
                p_log_q = p_log_q + row_dot(x, log_x[0])
            if gather[i]:  # ids outside the first chunk hold junk until their own chunk overwrites it
                at = z.gather(1, place.local)
                z_at[i] = at if k == 0 else torch.where(place.here, at, z_at[i])
        for i in range(n):  # the rest's log-probability; log x is spent
            chunk_rest = logsumexp_rows(log_x[i].masked_fill_(hit, -math.inf), may_be_empty=hit.shape[1] <= n_ids)
            lse_rest[i] = chunk_rest if k == 0 else torch.logaddexp(lse_rest[i], chunk_rest)
    masses = [BucketMass((z_at[i] if inv_tau == 1.0 else z_at[i] * inv_tau) - model.lse[:, None],
                         lse_rest[i], x_log_x[i]) for i, model in enumerate(models)]
    return masses, p_log_q


def logsumexp_rows(a: torch.Tensor, may_be_empty: bool) -> torch.Tensor:
    """log Σ exp per row of finite values or -inf: `torch.logsumexp` without its guards against +inf and NaN, which
    cost four kernels more per call. A row of -inf only (possible where the masked ids can cover a whole chunk row,
    `may_be_empty`, known from the shapes) gives -inf."""
    row_max = a.amax(dim=1)
    if may_be_empty:
        row_max.clamp_min_(torch.finfo(a.dtype).min)  # then exp(-inf - min) sums to 0, and log 0 = -inf
    return (a - row_max[:, None]).exp_().sum(dim=1).log_().add_(row_max)


def log_probs_at(model: ModelBlock, chunks, ids: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """A model's tempered log-probabilities at `ids` [rows, k], gathered from the pass-1 chunk that holds each."""
    z_at = torch.zeros(ids.shape, device=ids.device)
    for z, place in zip(model.logits, id_places(ids, chunks)):
        z_at = torch.where(place.here, z.gather(1, place.local), z_at)
    return (z_at if inv_tau == 1.0 else z_at * inv_tau) - model.lse[:, None]


def top_tokens(model: ModelBlock, chunks, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, ids) of each row's k largest pass-1 logits ([rows, k], largest first), merged chunk by chunk."""
    best = best_ids = None
    for z, (v0, _) in zip(model.logits, chunks):
        values, ids = z.topk(min(k, z.shape[1]), dim=1)
        best, best_ids = merge_top(best, best_ids, values, ids if v0 == 0 else ids + v0, k)
    return best, best_ids


def merge_top(best: torch.Tensor | None, best_ids: torch.Tensor | None, values: torch.Tensor, ids: torch.Tensor,
              k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of the running candidates and a chunk's ([rows, ·] values and their ids), largest first."""
    if best is None:
        return values, ids
    best, order = torch.cat([best, values], 1).topk(min(k, best.shape[1] + values.shape[1]), dim=1)
    return best, torch.cat([best_ids, ids], 1).gather(1, order)


def buckets_from_logs(log_p: torch.Tensor, log_q: torch.Tensor) -> Buckets:
    return Buckets(log_p, log_q, log_p.exp(), log_q.exp())


def bucket_gradient(plan: KernelPlan, student: ModelBlock, places: list[IdPlace], b: Buckets, labels, rows: slice,
                    grads: Gradients | None, kd_rows: torch.Tensor | None = None) -> torch.Tensor:
    """D per row between the bucketed distributions `b` (the tokens of `places` [rows, k], then the rest bucket),
    and with `grads` its gradient added to them, from the student's pass-1 logits.

    With w = ∂D/∂log Q per bucket (`Divergence.on_buckets`; w_r the rest's) and Q_r the student's rest mass, the
    gradient with respect to the tempered logits is
        dD/da_v = -q_v·Σ_B w_B  +  [v in the rest]·(q_v / Q_r)·w_r  +  [v in ids]·w_v,
    two dense terms (the softmax, and the rest's own softmax q_v / Q_r = exp(log q_v - log Q_r) ≤ 1, each times a
    per-row constant) and a sparse term scattered into the chunk that holds each id. Every factor is bounded, so the
    gradient is finite and keeps its pull at any logit gap: a token the student has all but ruled out (q_v = 0 in
    fp32) still gets -w_v = p_v under forward KL. The ids are constants of the gradient (a choice of buckets).
    Rows outside `kd_rows` (where given) get D = 0 and no KD gradient, whatever their buckets hold."""
    value, w = plan.divergence.on_buckets(b, plan.param)
    if kd_rows is not None:
        value, w = value.masked_fill(~kd_rows, 0.0), w.masked_fill(~kd_rows[:, None], 0.0)
    kd_scale = plan.kd_grad_scale
    # Σ_B Q_B is 1 but for the rounding of the student's log-sum-exp; dividing by it cancels that rounding, which the
    # softmax term would otherwise multiply by Σ w (reverse KL's D, large where the two models disagree)
    w_total = w.sum(1, keepdim=True) / b.q.sum(1, keepdim=True)
    if kd_rows is not None:  # a row without a teacher may hold no student mass in its buckets at all: 0/0
        w_total = torch.where(kd_rows[:, None], w_total, 0.0)
    w_rest, w_ids = w[:, -1:], w[:, :-1] * kd_scale
    log_q_rest = b.log_q[:, -1:]
    log_rest = torch.where(log_q_rest > -math.inf, log_q_rest, 0.0)  # a row without a rest never reads it
    for k, (v0, v1) in enumerate(plan.chunks if grads is not None else ()):
        z, place = student.logits[k], places[k]
        log_q = (z if plan.inv_tau == 1.0 else z * plan.inv_tau) - student.lse[:, None]
        q = log_q.exp()
        rest_share = log_q.masked_fill_(place.mask(), -math.inf).sub_(log_rest).exp_()  # q_v / Q_r, 0 on the ids
        grad_z = logit_grad(z, q, student.lse_raw, rest_share.mul_(w_rest), w_total, plan.inv_tau, plan.ce_coef,
                            kd_scale)
        grad_z.scatter_add_(1, place.local, w_ids * place.here)  # each id once, in the chunk that holds it
        push_back(grads, student, grad_z, z, rows, v0, v1)
    if grads is not None:
        push_back_labels(grads, student, labels, rows, plan.ce_coef)
    return value
