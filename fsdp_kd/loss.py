"""The distillation loss: (1 - kd_coef)·CE + kd_coef·D(teacher, student), vocabulary-chunked.

Why a hand-written kernel: at 8k tokens and a 152k vocabulary, one model's fp32 logits are ~5 GB, and autograd would
keep the softmax copies and the gradient of that tensor too. Here the logits exist only for one block of
`token_chunk` tokens at a time, and each pass over that block walks the vocabulary in `vocab_chunk` columns:

  pass 1  logits of both models, chunk by chunk, into the block's cache, with online max / sum-exp statistics
          (log-sum-exp, argmax) updated while each chunk is hot;
  pass 2  per-row reductions that need the final normalizers: KL, entropies, and for reverse KL / JSD the row
          scalar their gradient needs (forward KL's gradient needs none, so its sums ride along in pass 3);
  pass 3  the gradient of the loss with respect to the student's logits, chunk by chunk, folded straight into the
          gradients of the student's hidden states and head weight.

The gradient is produced during the forward pass (as Liger-Kernel and others do), so the logits are computed once:
four matrix products in all (two forward, two gradient), which is the floor. `backward` only scales the stored
gradients by the incoming scalar. Everything from the logits on is fp32, whatever the weights' dtype, so no logit
is rounded to bf16 before its softmax.

All returned values are *sums* over the valid tokens; the trainer divides by the global token count, which is the
only way to make gradients independent of micro-batch split and world size.

JSD(β) is normalized as [β·KL(p‖m) + (1-β)·KL(q‖m)] / (β(1-β)), m = β·p + (1-β)·q, p the teacher, q the student.
The unnormalized form tends to 0 at both ends; this one tends to forward KL(p‖q) as β→0 and to reverse KL(q‖p) as
β→1, and the endpoints are computed as exactly those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

METRIC_NAMES = ("ce", "kd", "kl", "teacher_entropy", "student_entropy", "top1_agreement", "teacher_ce")


@dataclass(frozen=True)
class LossSpec:
    kd_coef: float = 0.5
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    temperature: float = 1.0
    vocab_chunk: int = 8192
    token_chunk: int = 128

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"kd_loss must be one of {DIVERGENCES}, got {self.divergence!r}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if not 0.0 <= self.kd_coef <= 1.0:
            raise ValueError(f"kd_coef must be in [0, 1], got {self.kd_coef}")
        if self.temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.temperature}")
        if self.vocab_chunk < 1 or self.token_chunk < 1:
            raise ValueError("kd_vocab_chunk and kd_token_chunk must be >= 1")

    @property
    def effective_divergence(self) -> str:
        """JSD at its endpoints is computed as the KL it equals there, not as 0/0."""
        if self.divergence == "jsd" and self.jsd_beta == 0.0:
            return "forward_kl"
        if self.divergence == "jsd" and self.jsd_beta == 1.0:
            return "reverse_kl"
        return self.divergence


class _OnlineLogSumExp:
    """Running max and rescaled sum of exponentials over vocabulary chunks, per row."""

    def __init__(self, rows: int, device: torch.device):
        self.max = torch.full((rows,), -math.inf, device=device)
        self.sum = torch.zeros(rows, device=device)

    def update(self, chunk: torch.Tensor, chunk_max: torch.Tensor) -> None:
        new_max = torch.maximum(self.max, chunk_max)
        self.sum.mul_(torch.exp(self.max - new_max))
        self.sum.add_(torch.exp(chunk - new_max[:, None]).sum(dim=1))
        self.max = new_max

    def value(self) -> torch.Tensor:
        return self.max + torch.log(self.sum)


class _ModelBlockStats:
    """Pass-1 statistics of one model over one token block: log-sum-exp of the logits at temperature τ (and at 1,
    for the CE on the labels), the argmax, and the label's logit."""

    def __init__(self, rows: int, device: torch.device, temperature: float):
        self.tau = temperature
        self.scaled = temperature != 1.0
        self.lse = _OnlineLogSumExp(rows, device)  # of z / τ
        self.lse_raw = _OnlineLogSumExp(rows, device) if self.scaled else self.lse  # of z
        self.argmax = torch.zeros(rows, dtype=torch.long, device=device)
        self.label_logit = torch.zeros(rows, device=device)

    def consume(self, logits: torch.Tensor, labels: torch.Tensor, start: int, stop: int) -> None:
        chunk_max, chunk_idx = logits.max(dim=1)
        improved = chunk_max > self.lse_raw.max  # compared with the running max before it is updated
        self.argmax.copy_(torch.where(improved, chunk_idx + start, self.argmax))
        inside = (labels >= start) & (labels < stop)
        if inside.any():
            rows = inside.nonzero(as_tuple=True)[0]
            self.label_logit[rows] = logits[rows, labels[rows] - start]
        if self.scaled:
            self.lse_raw.update(logits, chunk_max)
            self.lse.update(logits / self.tau, chunk_max / self.tau)
        else:
            self.lse.update(logits, chunk_max)


class _RowSums:
    """Per-row sums over the vocabulary of p·log p, p·log q, q·log q (and what reverse KL and JSD need)."""

    def __init__(self, rows: int, device: torch.device, divergence: str, beta: float):
        self.divergence_name, self.beta = divergence, beta
        zeros = lambda: torch.zeros(rows, device=device)  # noqa: E731
        self.p_log_p, self.p_log_q, self.q_log_q = zeros(), zeros(), zeros()
        self.q_log_p = zeros() if divergence == "reverse_kl" else None
        self.kl_q_m = zeros() if divergence == "jsd" else None
        self.kl_p_m = zeros() if divergence == "jsd" else None

    def log_m(self, log_q, log_p):
        return torch.logaddexp(log_p + math.log(self.beta), log_q + math.log1p(-self.beta))

    def add(self, log_q, log_p, q, p) -> None:
        self.p_log_p += (p * log_p).sum(1)
        self.p_log_q += (p * log_q).sum(1)
        self.q_log_q += (q * log_q).sum(1)
        if self.q_log_p is not None:
            self.q_log_p += (q * log_p).sum(1)
        if self.kl_q_m is not None:
            log_m = self.log_m(log_q, log_p)
            self.kl_q_m += (q * (log_q - log_m)).sum(1)
            self.kl_p_m += (p * (log_p - log_m)).sum(1)

    def forward_kl(self):
        return self.p_log_p - self.p_log_q

    def reverse_kl(self):
        return self.q_log_q - self.q_log_p

    def divergence(self):
        if self.divergence_name == "forward_kl":
            return self.forward_kl()
        if self.divergence_name == "reverse_kl":
            return self.reverse_kl()
        b = self.beta
        return (b * self.kl_p_m + (1 - b) * self.kl_q_m) / (b * (1 - b))


def _fp32_rows(weight: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return weight[start:stop].float()


def _fused_forward_backward(h_s, w_s, h_t, w_t, labels, spec: LossSpec, vocab_size: int, with_grad: bool):
    """Returns (loss_sum, metric sums, grad of h_s, grad of w_s); the gradients are None without `with_grad`."""
    device = h_s.device
    n_tokens, hidden_s = h_s.shape
    has_teacher = h_t is not None
    c = spec.kd_coef if has_teacher else 0.0
    tau = spec.temperature
    divergence = spec.effective_divergence
    beta = spec.jsd_beta

    grad_h = torch.zeros(n_tokens, hidden_s, dtype=torch.float32, device=device) if with_grad else None
    grad_w = torch.zeros(w_s.shape[0], hidden_s, dtype=torch.float32, device=device) if with_grad else None
    sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in METRIC_NAMES}
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    chunks = [(v0, min(v0 + spec.vocab_chunk, vocab_size)) for v0 in range(0, vocab_size, spec.vocab_chunk)]
    block_rows = min(spec.token_chunk, max(n_tokens, 1))
    # One cache per model for one token block, stored chunk by chunk so each chunk is contiguous.
    s_cache = [torch.empty(block_rows, v1 - v0, device=device) for v0, v1 in chunks]
    t_cache = [torch.empty(block_rows, v1 - v0, device=device) for v0, v1 in chunks] if has_teacher else None

    for t0 in range(0, n_tokens, block_rows):
        t1 = min(t0 + block_rows, n_tokens)
        rows = t1 - t0
        hs = h_s[t0:t1].float()
        ht = h_t[t0:t1].float() if has_teacher else None
        y = labels[t0:t1]
        student = _ModelBlockStats(rows, device, tau)
        teacher = _ModelBlockStats(rows, device, tau) if has_teacher else None
        scaled = student.scaled

        # Pass 1: logits into the cache; online log-sum-exp and argmax.
        for k, (v0, v1) in enumerate(chunks):
            student.consume(torch.mm(hs, _fp32_rows(w_s, v0, v1).t(), out=s_cache[k][:rows]), y, v0, v1)
            if has_teacher:
                teacher.consume(torch.mm(ht, _fp32_rows(w_t, v0, v1).t(), out=t_cache[k][:rows]), y, v0, v1)

        lse_s = student.lse.value()
        lse_s_raw = student.lse_raw.value()
        ce = lse_s_raw - student.label_logit
        sums["ce"] += ce.sum()

        lse_t = teacher.lse.value() if has_teacher else None

        def log_probs(k):
            log_q = s_cache[k][:rows] / tau - lse_s[:, None] if scaled else s_cache[k][:rows] - lse_s[:, None]
            if not has_teacher:
                return log_q, None
            log_p = t_cache[k][:rows] / tau - lse_t[:, None] if scaled else t_cache[k][:rows] - lse_t[:, None]
            return log_q, log_p

        # Pass 2: row sums over the vocabulary. Forward KL's gradient needs none of them, so with a gradient to
        # compute they are folded into pass 3 instead of paying for a separate sweep.
        row = _RowSums(rows, device, divergence, beta) if has_teacher else None
        fused = with_grad and divergence == "forward_kl"
        if has_teacher and not fused:
            for k in range(len(chunks)):
                log_q, log_p = log_probs(k)
                row.add(log_q, log_p, log_q.exp(), log_p.exp())

        # Pass 3: d loss / d z_s per chunk, folded into the gradients of h_s and w_s.
        reverse_kl = row.reverse_kl()[:, None] if divergence == "reverse_kl" and has_teacher else None
        for k, (v0, v1) in enumerate(chunks if with_grad else ()):
            log_q, log_p = log_probs(k)
            q = log_q.exp()
            grad = torch.exp(s_cache[k][:rows] - lse_s_raw[:, None]) if scaled else q.clone()
            grad.mul_(1 - c)  # CE part: (1-c)·(softmax(z_s) - onehot)
            if has_teacher:
                p = log_p.exp()
                if fused:
                    row.add(log_q, log_p, q, p)
                if divergence == "forward_kl":
                    d_kd = q - p
                elif divergence == "reverse_kl":
                    d_kd = q * (log_q - log_p - reverse_kl)
                else:
                    d_kd = q * (log_q - row.log_m(log_q, log_p) - row.kl_q_m[:, None]) / beta
                grad.add_(d_kd, alpha=c * tau)  # d(τ²·D)/dz_s = τ·dD/da
            inside = (y >= v0) & (y < v1)
            if inside.any():
                hit = inside.nonzero(as_tuple=True)[0]
                grad[hit, y[hit] - v0] -= 1 - c
            grad_h[t0:t1].addmm_(grad, _fp32_rows(w_s, v0, v1))
            grad_w[v0:v1].addmm_(grad.t(), hs)

        kd = row.divergence() * tau * tau if has_teacher else torch.zeros_like(ce)
        if has_teacher:
            sums["kd"] += kd.sum()
            sums["kl"] += row.forward_kl().sum()
            sums["teacher_entropy"] -= row.p_log_p.sum()
            sums["student_entropy"] -= row.q_log_q.sum()
            sums["top1_agreement"] += (student.argmax == teacher.argmax).sum()
            sums["teacher_ce"] += (teacher.lse_raw.value() - teacher.label_logit).sum()
        loss_sum += (1 - c) * ce.sum() + c * kd.sum()

    return loss_sum, sums, grad_h, grad_w


class _ChunkedDistillationLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, spec, vocab_size, metrics_out):
        with_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, sums, grad_h, grad_w = _fused_forward_backward(h_s, w_s, h_t, w_t, labels, spec, vocab_size, with_grad)
        metrics_out.update(sums)
        if with_grad:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h_s.dtype, w_s.dtype)
        return loss.float()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h.mul_(grad_loss).to(h_dtype), grad_w.mul_(grad_loss).to(w_dtype),
                None, None, None, None, None, None)


def distillation_loss(student_hidden: torch.Tensor, student_head: torch.Tensor, labels: torch.Tensor,
                      spec: LossSpec, vocab_size: int, teacher_hidden: torch.Tensor | None = None,
                      teacher_head: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed loss over the given rows, and summed metrics (detached, fp64).

    `student_hidden`/`teacher_hidden` hold only the rows that have a valid next-token label (already shifted), so
    prompt and padding rows are never projected. `vocab_size` is the shared tokenizer range that both
    distributions are taken over; padded head rows beyond it are ignored. Without a teacher the loss is plain CE.
    """
    if student_head.shape[0] < vocab_size or (teacher_head is not None and teacher_head.shape[0] < vocab_size):
        raise ValueError(f"vocab_size {vocab_size} exceeds an output head's rows")
    metrics: dict[str, torch.Tensor] = {}
    loss = _ChunkedDistillationLoss.apply(student_hidden, student_head, teacher_hidden, teacher_head,
                                          labels, spec, vocab_size, metrics)
    metrics["tokens"] = torch.tensor(float(labels.numel()), dtype=torch.float64, device=labels.device)
    return loss, metrics
