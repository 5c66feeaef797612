"""The dense distillation loss: full logits and autograd, the obvious way.

It is the yardstick for the chunked kernel in `loss.py`: the tests check values and gradients against it, and the
benchmarks under `bench/` measure the kernel's time and memory against it. It is not used for training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .loss import Head, LossSpec, as_head


def dense_logits(hidden: torch.Tensor, head: torch.Tensor | Head, vocab_size: int) -> torch.Tensor:
    """The model's logits over the shared vocabulary, as its own forward computes them: softcap(scale·(h·Wᵀ + b))."""
    head = as_head(head)
    z = hidden.float() @ head.weight[:vocab_size].float().t()
    if head.bias is not None:
        z = z + head.bias[:vocab_size].float()
    z = z * head.scale
    if head.softcap is not None:
        z = torch.tanh(z / head.softcap) * head.softcap
    return z


def dense_distillation_loss(student_hidden, student_head, labels, spec: LossSpec, vocab_size: int,
                            teacher_hidden=None, teacher_head=None):
    """Same contract as `loss.distillation_loss`: summed loss and summed metrics."""
    z_s = dense_logits(student_hidden, student_head, vocab_size)
    ce = F.cross_entropy(z_s, labels, reduction="none")
    metrics = {"ce": ce.detach().double().sum(), "tokens": torch.tensor(float(labels.numel()), dtype=torch.float64)}
    if teacher_hidden is None:
        return ce.sum(), metrics

    tau, beta, c = spec.temperature, spec.jsd_beta, spec.kd_coef
    z_t = dense_logits(teacher_hidden, teacher_head, vocab_size)
    log_q = F.log_softmax(z_s / tau, dim=-1)
    log_p = F.log_softmax(z_t / tau, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    forward_kl = (p * (log_p - log_q)).sum(-1)
    reverse_kl = (q * (log_q - log_p)).sum(-1)
    divergence = spec.effective_divergence
    if divergence == "forward_kl":
        kd = forward_kl
    elif divergence == "reverse_kl":
        kd = reverse_kl
    elif divergence == "tvd":
        kd = 0.5 * (p - q).abs().sum(-1)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        kd = (beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)) / (beta * (1 - beta))
    kd = kd * tau * tau
    loss = ((1 - c) * ce + c * kd).sum()
    log_p_raw = F.log_softmax(z_t, dim=-1)
    metrics.update({
        "kd": kd.detach().double().sum(),
        "kl": forward_kl.detach().double().sum(),
        "teacher_entropy": -(p * log_p).detach().double().sum(),
        "student_entropy": -(q * log_q).detach().double().sum(),
        "top1_agreement": (z_s.argmax(-1) == z_t.argmax(-1)).double().sum(),
        "teacher_ce": -log_p_raw.gather(1, labels[:, None]).detach().double().sum(),
    })
    return loss, metrics
