"""The divergences D(p‖q) between the teacher p and the student q that the loss kernel can distil with.

Each divergence is one entry of `DIVERGENCES`, and everything the kernel needs of it is in that entry: its row terms,
its value from their vocabulary sums and its gradient with respect to the student's tempered logits (a live teacher,
whole vocabulary), and its value and gradient over buckets (a cached teacher). The kernel (`kernel.py`) never names a
divergence, so a new one is a new entry here, checked against the dense reference in `reference.py`.
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
    """Both tempered distributions over the buckets of a cached teacher ([rows, B]): the cached tokens, then one
    bucket for the rest of the vocabulary. Empty buckets hold p = 0 (log p = -inf), likewise q."""
    log_p: torch.Tensor
    log_q: torch.Tensor
    p: torch.Tensor
    q: torch.Tensor


@dataclass(frozen=True)
class Divergence:
    """D(p‖q) between the teacher p and the student q, as the kernel needs it.

    Over the whole vocabulary (a live teacher): `row_terms(t, beta)` gives the elementwise terms (beyond the shared
    p·log p, p·log q, q·log q) whose vocabulary sums the divergence needs; `value(sums, beta)` is D per row from those
    sums; `grad(t, sums, beta)` is dD/da per element, a = z_student / τ. `grad_needs_sums` is False when the gradient
    uses no row sums, which lets pass 2 ride along in pass 3.

    Over buckets (a cached teacher): `on_buckets(b, beta)` is (D per row, w per bucket), w = ∂D/∂log Q = Q·∂D/∂Q up
    to a multiple of Q (which the softmax cancels); the kernel turns w into dD/da through the softmax and the rest
    bucket (`bucket_block`). w is written in a bounded form, never as a ratio of probabilities times Q: forward KL's
    -p/Q·Q overflows once log p - log Q passes 88 (fp32) and vanishes once Q underflows, where w = -p does neither.
    An empty bucket (p = Q = 0) has w = 0.
    """
    row_terms: Callable[[ChunkTerms, float], dict[str, torch.Tensor]]
    value: Callable[[dict[str, torch.Tensor], float], torch.Tensor]
    grad: Callable[[ChunkTerms, dict[str, torch.Tensor], float], torch.Tensor]
    on_buckets: Callable[[Buckets, float], tuple[torch.Tensor, torch.Tensor]]
    grad_needs_sums: bool = True


def _log_mixture(t: ChunkTerms, beta: float) -> torch.Tensor:
    """log m, m = β·p + (1-β)·q."""
    return torch.logaddexp(t.log_p + math.log(beta), t.log_q + math.log1p(-beta))


def _jsd_terms(t: ChunkTerms, beta: float) -> dict[str, torch.Tensor]:
    log_m = _log_mixture(t, beta)
    return {"kl_p_m": t.p * (t.log_p - log_m), "kl_q_m": t.q * (t.log_q - log_m)}


def _jsd_grad(t: ChunkTerms, sums, beta: float) -> torch.Tensor:
    return t.q * (t.log_q - _log_mixture(t, beta) - sums["kl_q_m"][:, None]) / beta


def xlogy(x: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """x·log_ratio, with 0·log(0/·) = 0 (an empty bucket adds nothing, not NaN)."""
    return torch.where(x > 0, x * log_ratio, 0.0)


def xlogy_sum(x: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    return xlogy(x, log_ratio).sum(1)


def _jsd_on_buckets(b: Buckets, beta: float):
    """∂D/∂Q = log(Q/m)/β, so w = Q·log(Q/m)/β: bounded, as m ≥ (1-β)·Q."""
    log_m = torch.logaddexp(b.log_p + math.log(beta), b.log_q + math.log1p(-beta))
    value = (beta * xlogy_sum(b.p, b.log_p - log_m) + (1 - beta) * xlogy_sum(b.q, b.log_q - log_m))
    return value / (beta * (1 - beta)), xlogy(b.q, b.log_q - log_m) / beta


DIVERGENCES: dict[str, Divergence] = {
    # KL(p‖q): mode covering, the classic KD objective
    "forward_kl": Divergence(
        row_terms=lambda t, beta: {},
        value=lambda s, beta: s["p_log_p"] - s["p_log_q"],
        grad=lambda t, s, beta: t.q - t.p,
        on_buckets=lambda b, beta: (xlogy_sum(b.p, b.log_p - b.log_q), -b.p),  # Q·(-p/Q)
        grad_needs_sums=False),
    # KL(q‖p): mode seeking, the usual choice on-policy
    "reverse_kl": Divergence(
        row_terms=lambda t, beta: {"q_log_p": t.q * t.log_p},  # summed by the kernel
        value=lambda s, beta: s["q_log_q"] - s["q_log_p"],
        grad=lambda t, s, beta: t.q * (t.log_q - t.log_p - (s["q_log_q"] - s["q_log_p"])[:, None]),
        on_buckets=lambda b, beta: (xlogy_sum(b.q, b.log_q - b.log_p), xlogy(b.q, b.log_q - b.log_p))),
    # [β·KL(p‖m) + (1-β)·KL(q‖m)] / (β(1-β)): forward KL as β→0, reverse KL as β→1 (the endpoints are those KLs)
    "jsd": Divergence(
        row_terms=_jsd_terms,
        value=lambda s, beta: (beta * s["kl_p_m"] + (1 - beta) * s["kl_q_m"]) / (beta * (1 - beta)),
        grad=_jsd_grad,
        on_buckets=_jsd_on_buckets),
    # total variation ½·Σ|p - q|: bounded, robust to a teacher's confident mistakes
    "tvd": Divergence(
        row_terms=lambda t, beta: {"tvd": 0.5 * (t.q - t.p).abs(), "sign_q": torch.sign(t.q - t.p) * t.q},
        value=lambda s, beta: s["tvd"],
        grad=lambda t, s, beta: 0.5 * t.q * (torch.sign(t.q - t.p) - s["sign_q"][:, None]),
        on_buckets=lambda b, beta: (0.5 * (b.q - b.p).abs().sum(1), 0.5 * b.q * torch.sign(b.q - b.p))),
}
