"""The divergences D(p‖q) between the teacher p and the student q that the loss kernel can distil with.

Each divergence is one entry of `DIVERGENCES`, and everything the kernel needs of it is in that entry: over the whole
vocabulary (a live teacher) its row sums and per-token w from one chunk of both distributions, and its value from the
row sums; over buckets (a cached teacher's tokens, the student's top tokens, the tokens two vocabularies share, each
with a rest bucket) its value and w per bucket. The kernel (`kernel.py`) never names a
divergence, so a new one is a new entry here, checked against the dense reference in `reference.py`.

Every gradient is given as w = ∂D/∂log q (per token or per bucket), from which the kernel takes the gradient with
respect to the student's tempered logits a through the softmax: dD/da_v = w_v - q_v·Σ_u w_u. w is written in a
bounded form, never as a ratio of probabilities times q: forward KL's w = -p where -p/q·q would overflow once
log p - log q passes 88 (fp32) and vanish once q underflows. Adding c·q to w changes nothing (the softmax cancels it),
so "+1" terms of ∂D/∂q are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class ChunkTerms:
    """One vocabulary chunk of both tempered distributions, for one token block: log q, log p, q, p ([rows, cols])."""
    log_q: torch.Tensor
    log_p: torch.Tensor
    q: torch.Tensor
    p: torch.Tensor


@dataclass
class Buckets:
    """Both tempered distributions over buckets ([rows, B]): some tokens (a cached teacher's, the student's top ones,
    two vocabularies' shared ones), then one bucket for the rest of the vocabulary. Empty buckets hold p = 0
    (log p = -inf), likewise q."""
    log_p: torch.Tensor
    log_q: torch.Tensor
    p: torch.Tensor
    q: torch.Tensor


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_j a[i, j]·b[i, j] per row. On CUDA one batched product (one launch, no [rows × cols] temporary); on a CPU
    `linalg.vecdot`, four times faster than the batched product on a cache-sized chunk (measured, 256 × 2048)."""
    if a.is_cuda:
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
    return torch.linalg.vecdot(a, b)


@dataclass(frozen=True)
class Divergence:
    """D(p‖q) between the teacher p and the student q, as the kernel needs it.

    Over the whole vocabulary (a live teacher): `on_chunk(t, param, with_w)` gives the chunk's row sums that `value`
    needs (beyond the shared Σ p·log p, Σ p·log q, Σ q·log q, which the kernel takes itself) and, with `with_w`, w
    per token; `value(sums, param)` is D per row from the vocabulary sums. `w_total` is Σ_v w_v when it is a
    constant (forward KL: -1), which spares the kernel a sweep for it.

    Over buckets (`Buckets`): `on_buckets(b, param)` is (D per row, w per bucket); an empty bucket (p = Q = 0) has
    w = 0.

    `parameter` names the LossSpec field that is the divergence's parameter (JSD's β, the skew's α, the student's k),
    if any.

    A divergence whose w needs the whole row's sums first (AKL's per-row weights) gives `late_w(t, sums, param)` and
    `late_w_total(sums, param)` instead of w from `on_chunk`; the kernel then recomputes the chunk's terms in pass 3.
    One that needs the teacher's most likely tokens gives `on_head(b, param)`: the row values it needs from both
    distributions at the teacher's top `head_tokens` tokens (sorted, most likely first), which join the row sums.

    A divergence defined over buckets of the *student's* most likely tokens (`student_buckets`: its top `param`
    tokens and one bucket for the rest) has no whole-vocabulary form: with a live teacher the kernel forms those
    buckets from both models' logits and takes `on_buckets`. A cached teacher knows only its own top tokens, so it
    cannot serve it.
    """
    on_buckets: Callable[[Buckets, float], tuple[torch.Tensor, torch.Tensor]]
    on_chunk: Callable[[ChunkTerms, float, bool], tuple[dict[str, torch.Tensor], torch.Tensor | None]] | None = None
    value: Callable[[dict[str, torch.Tensor], float], torch.Tensor] | None = None
    student_buckets: bool = False
    w_total: float | None = None
    parameter: str | None = None
    late_w: Callable[[ChunkTerms, dict[str, torch.Tensor], float], torch.Tensor] | None = None
    late_w_total: Callable[[dict[str, torch.Tensor], float], torch.Tensor] | None = None
    on_head: Callable[[Buckets, float], dict[str, torch.Tensor]] | None = None
    head_tokens: int = 0

    def __post_init__(self):
        if (self.late_w is None) != (self.late_w_total is None) or (self.late_w and self.w_total is not None):
            raise ValueError("a divergence gives late_w with late_w_total, and then no constant w_total")
        if (self.on_head is None) != (self.head_tokens == 0):
            raise ValueError("a divergence gives on_head with head_tokens > 0")
        if (self.on_chunk is None or self.value is None) != self.student_buckets:
            raise ValueError("a divergence gives on_chunk and value, unless it is taken over the student's buckets")
        if self.student_buckets and self.parameter is None:
            raise ValueError("a divergence over the student's buckets names the parameter that counts them")


def xlogy(x: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """x·log_ratio, with 0·log(0/·) = 0 (an empty bucket adds nothing, not NaN)."""
    return torch.where(x > 0, x * log_ratio, 0.0)


def xlogy_sum(x: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    return xlogy(x, log_ratio).sum(1)


def log_mixture(t: ChunkTerms, weight_p: float) -> torch.Tensor:
    """log m, m = weight_p·p + (1 - weight_p)·q, per token of a chunk: one `lerp`, a floor and a log, where a
    `logaddexp` costs twenty times a plain kernel on a CPU (measured). The floor at fp32's smallest normal number
    keeps log m finite, so q/m and p/m stay bounded and 0·log m is 0; it changes m only where p and q are both below
    1e-38, whose terms are below 1e-36."""
    if weight_p == 0:  # a KL's endpoint: exactly log q (the floor would cut it where q underflows)
        return t.log_q
    if weight_p == 1:
        return t.log_p
    return torch.lerp(t.q, t.p, weight_p).clamp_min_(torch.finfo(t.q.dtype).tiny).log_()


def bucket_log_mixture(b: Buckets, weight_p: float) -> torch.Tensor:
    """log m over buckets, -inf where both are empty (small tensors: the exact `logaddexp`)."""
    return torch.logaddexp(b.log_p + (math.log(weight_p) if weight_p > 0 else -math.inf),
                           b.log_q + (math.log1p(-weight_p) if weight_p < 1 else -math.inf))


def where_present(log_x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """values where the bucket holds mass (log x > -inf, even if x itself underflows), else 0: a bucket that one
    side leaves empty takes no part."""
    return torch.where(log_x > -math.inf, values, 0.0)


def effective_divergence(name: str, jsd_beta: float) -> str:
    """The entry a divergence is computed with: JSD at its endpoints is the KL it equals there, not 0/0."""
    if name == "jsd" and jsd_beta == 0.0:
        return "forward_kl"
    if name == "jsd" and jsd_beta == 1.0:
        return "reverse_kl"
    return name


# ------------------------------------------------------------------------------------------------ the entries
def _forward_kl_chunk(t: ChunkTerms, param: float, with_w: bool):
    return {}, (-t.p if with_w else None)


def _reverse_kl_chunk(t: ChunkTerms, param: float, with_w: bool):
    return {"q_log_p": row_dot(t.q, t.log_p)}, (t.q * (t.log_q - t.log_p) if with_w else None)


def _reverse_kl_on_buckets(b: Buckets, param: float):
    w = xlogy(b.q, b.log_q - b.log_p)  # the terms of D are their own w
    return w.sum(1), w


def _jsd_chunk(t: ChunkTerms, beta: float, with_w: bool):
    """∂D/∂q = log(q/m)/β, so w = q·log(q/m)/β: bounded, as m ≥ (1-β)·q."""
    log_m = log_mixture(t, beta)
    log_q_over_m = t.log_q - log_m
    sums = {"kl_p_m": row_dot(t.p, t.log_p - log_m), "kl_q_m": row_dot(t.q, log_q_over_m)}
    return sums, (log_q_over_m.mul_(t.q).div_(beta) if with_w else None)


def _jsd_on_buckets(b: Buckets, beta: float):
    log_m = bucket_log_mixture(b, beta)
    value = (beta * xlogy_sum(b.p, b.log_p - log_m) + (1 - beta) * xlogy_sum(b.q, b.log_q - log_m))
    return value / (beta * (1 - beta)), xlogy(b.q, b.log_q - log_m) / beta


def _tvd_chunk(t: ChunkTerms, param: float, with_w: bool):
    gap = t.q - t.p
    return {"tvd": 0.5 * gap.abs().sum(1)}, (gap.sign_().mul_(t.q).mul_(0.5) if with_w else None)


def _skew_kl_chunk(t: ChunkTerms, alpha: float, with_w: bool):
    """KL(p‖m), m = α·p + (1-α)·q. ∂D/∂q = -(1-α)·p/m, so w = -(1-α)·p·(q/m), with q/m ≤ 1/(1-α)."""
    log_m = log_mixture(t, alpha)
    sums = {"p_log_p_over_m": row_dot(t.p, t.log_p - log_m)}
    return sums, ((t.log_q - log_m).exp_().mul_(t.p).mul_(alpha - 1) if with_w else None)


def _skew_kl_on_buckets(b: Buckets, alpha: float):
    log_m = bucket_log_mixture(b, alpha)
    q_over_m = where_present(b.log_q, (b.log_q - log_m).exp())  # an empty bucket's -inf - -inf is not kept
    return xlogy_sum(b.p, b.log_p - log_m), (alpha - 1) * b.p * q_over_m


def _skew_reverse_kl_chunk(t: ChunkTerms, alpha: float, with_w: bool):
    """KL(q‖m), m = (1-α)·p + α·q. ∂D/∂q = log(q/m) + 1 - α·q/m, so w = q·(log(q/m) - α·q/m), q/m ≤ 1/α (at α = 0,
    reverse KL's w, where q/m = q/p is unbounded but multiplies nothing)."""
    log_m = log_mixture(t, 1 - alpha)
    log_q_over_m = t.log_q - log_m
    sums = {"q_log_q_over_m": row_dot(t.q, log_q_over_m)}
    if not with_w:
        return sums, None
    if alpha > 0:
        log_q_over_m.sub_(log_q_over_m.exp().mul_(alpha))
    return sums, log_q_over_m.mul_(t.q)


def _skew_reverse_kl_on_buckets(b: Buckets, alpha: float):
    log_m = bucket_log_mixture(b, 1 - alpha)
    log_q_over_m = where_present(b.log_q, b.log_q - log_m)
    w = log_q_over_m - alpha * log_q_over_m.exp() if alpha > 0 else log_q_over_m
    return xlogy_sum(b.q, log_q_over_m), where_present(b.log_q, b.q * w)


# AKL's head: the teacher's tokens in descending probability while their cumulative mass stays within μ, and always
# its most likely one (Wu et al. 2024, as their code computes it). It is found among the teacher's top AKL_HEAD_TOKENS
# tokens, so it is exact wherever those hold more than μ of the teacher's mass, and cut at that many tokens elsewhere.
AKL_HEAD_TOKENS = 64


def akl_head(log_p_sorted: torch.Tensor, mu: float) -> torch.Tensor:
    """Which of the teacher's tokens, sorted most likely first ([rows, k]), form AKL's head."""
    head = log_p_sorted.exp().cumsum(1) <= mu
    head[:, :1] = True  # no tokens at all (a cache across tokenizers whose top-k holds no shared one): no head
    return head


def _akl_weights(s: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's share g_head / (g_head + g_tail) of the gap Σ|p - q| ([rows]), a constant for the gradient; 0 where
    the two distributions agree (both KLs are 0 there). Kept in the block's complete row sums once taken, so that
    pass 3 does not take it again per chunk."""
    if "akl_share" not in s:
        s["akl_share"] = _share(s["akl_head_gap"], s["akl_gap"])
    return s["akl_share"]


def _share(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """part / whole in [0, 1], 0 where whole is 0."""
    return (part / whole.clamp_min(torch.finfo(whole.dtype).tiny)).clamp_(0, 1)


def _akl_on_head(b: Buckets, mu: float):
    return {"akl_head_gap": torch.where(akl_head(b.log_p, mu), (b.p - b.q).abs(), 0.0).sum(1)}


def _akl_chunk(t: ChunkTerms, mu: float, with_w: bool):
    return {"q_log_p": row_dot(t.q, t.log_p), "akl_gap": (t.q - t.p).abs_().sum(1), "q": t.q.sum(1)}, None


def _akl_value(s, mu: float) -> torch.Tensor:
    head = _akl_weights(s)
    return head * (s["p_log_p"] - s["p_log_q"]) + (1 - head) * (s["q_log_q"] - s["q_log_p"])


def _akl_late_w(t: ChunkTerms, s, mu: float) -> torch.Tensor:
    """head·(-p) + (1 - head)·q·log(q/p): forward KL's w and reverse KL's, weighted per row."""
    head = _akl_weights(s)[:, None]
    return (t.log_q - t.log_p).mul_(t.q).mul_(1 - head).sub_(t.p * head)


def _akl_late_w_total(s, mu: float) -> torch.Tensor:
    head = _akl_weights(s)
    return (-head + (1 - head) * (s["q_log_q"] - s["q_log_p"])) / s["q"]


def _akl_on_buckets(b: Buckets, mu: float):
    """Over a cached teacher's buckets: the head among the cached tokens (sorted by the teacher), the rest bucket in the
    tail; equal to the live teacher's at k = V wherever the live head is exact (AKL_HEAD_TOKENS)."""
    log_p_cached, order = b.log_p[:, :-1].sort(dim=1, descending=True)
    in_head = torch.zeros_like(b.p, dtype=torch.bool)
    in_head[:, :-1] = torch.zeros_like(order, dtype=torch.bool).scatter_(1, order, akl_head(log_p_cached, mu))
    gap = (b.p - b.q).abs()
    head = _share(torch.where(in_head, gap, 0.0).sum(1), gap.sum(1))[:, None]
    forward = xlogy(b.p, b.log_p - b.log_q)
    reverse = xlogy(b.q, b.log_q - b.log_p)
    value = (head * forward + (1 - head) * reverse).sum(1)
    return value, (1 - head) * reverse - head * b.p


DIVERGENCES: dict[str, Divergence] = {
    # KL(p‖q): mode covering, the classic KD objective
    "forward_kl": Divergence(
        on_chunk=_forward_kl_chunk,
        value=lambda s, param: s["p_log_p"] - s["p_log_q"],
        on_buckets=lambda b, param: (xlogy_sum(b.p, b.log_p - b.log_q), -b.p),  # Q·(-p/Q)
        w_total=-1.0),
    # KL(q‖p): mode seeking, the usual choice on-policy
    "reverse_kl": Divergence(
        on_chunk=_reverse_kl_chunk,
        value=lambda s, param: s["q_log_q"] - s["q_log_p"],
        on_buckets=_reverse_kl_on_buckets),
    # [β·KL(p‖m) + (1-β)·KL(q‖m)] / (β(1-β)), m = β·p + (1-β)·q: forward KL as β→0, reverse KL as β→1 (the
    # endpoints are those KLs); see docs/divergences.md for TRL's and Liger's scaling
    "jsd": Divergence(
        on_chunk=_jsd_chunk,
        value=lambda s, beta: (beta * s["kl_p_m"] + (1 - beta) * s["kl_q_m"]) / (beta * (1 - beta)),
        on_buckets=_jsd_on_buckets,
        parameter="jsd_beta"),
    # total variation ½·Σ|p - q|: bounded, robust to a teacher's confident mistakes
    "tvd": Divergence(
        on_chunk=_tvd_chunk,
        value=lambda s, param: s["tvd"],
        on_buckets=lambda b, param: (0.5 * (b.q - b.p).abs().sum(1), 0.5 * b.q * torch.sign(b.q - b.p))),
    # skew KL (DistiLLM, Ko et al. 2024): KL(p ‖ α·p + (1-α)·q); forward KL at α = 0, bounded gradient for α > 0
    "skew_kl": Divergence(
        on_chunk=_skew_kl_chunk,
        value=lambda s, alpha: s["p_log_p_over_m"],
        on_buckets=_skew_kl_on_buckets,
        parameter="skew_alpha"),
    # skew reverse KL (DistiLLM): KL(q ‖ (1-α)·p + α·q); reverse KL at α = 0
    "skew_reverse_kl": Divergence(
        on_chunk=_skew_reverse_kl_chunk,
        value=lambda s, alpha: s["q_log_q_over_m"],
        on_buckets=_skew_reverse_kl_on_buckets,
        parameter="skew_alpha"),
    # adaptive KL (AKL, Wu et al. 2024): per token, forward KL weighted by the head's share of the gap Σ|p - q| and
    # reverse KL by the tail's; the head is the teacher's top tokens up to cumulative mass μ (akl_mu)
    "akl": Divergence(
        on_chunk=_akl_chunk,
        value=_akl_value,
        on_buckets=_akl_on_buckets,
        parameter="akl_mu",
        late_w=_akl_late_w,
        late_w_total=_akl_late_w_total,
        on_head=_akl_on_head,
        head_tokens=AKL_HEAD_TOKENS),
    # reverse KL between the bucketed distributions over the student's top k tokens (student_topk) plus one bucket
    # for the rest of the vocabulary: the form on-policy recipes use when the teacher only scores the student's
    # candidates (verl's reverse_kl_student_topk), with the rest bucket that keeps it a true KL, so the student
    # cannot lower it by moving mass out of its top k (without it, the truncated sum was seen to collapse)
    "reverse_kl_student_topk": Divergence(
        on_buckets=_reverse_kl_on_buckets,
        parameter="student_topk",
        student_buckets=True),
}
