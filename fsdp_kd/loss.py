"""The distillation loss: (1 - kd_coef)·CE + kd_coef·D(teacher, student), vocabulary-chunked.

Why a hand-written kernel: at 8k tokens and a 152k vocabulary, one model's fp32 logits are ~5 GB, and autograd would
keep the softmax copies and the gradient of that tensor too. Here the logits exist only for one block of token rows
at a time (the passes over a block are in `kernel.py`, the divergences in `divergences.py`), and this module chooses
the block shape (`choose_chunks`), loops over the blocks and presents the result to autograd.

The gradient is produced during the forward pass (as Liger-Kernel does), so the logits are computed once: four matrix
products in all (two forward, two gradient), which is the floor. `backward` only scales the stored gradients.

The teacher comes as `targets.Targets` (a live teacher's hidden states and head, a cached distribution, or none), which
scores each token block itself, so the loop here is the same for every kind of teacher.

All returned values are *sums* over the valid tokens; the trainer divides by the global token count, which is the
only way to make gradients independent of micro-batch split and world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .buckets import ID_MASKS
from .divergences import DIVERGENCES, effective_divergence
from .errors import require, require_choice
from .kernel import (METRIC_NAMES, Gradients, Head, KernelPlan, ModelBlock, accumulates_in_place, as_head,
                     elementwise_functions, vocab_chunks, w_source)
from .targets import NO_TEACHER, LiveTargets, SparseTargets, Targets, check_head_rows


# ---------------------------------------------------------------------------------------------------- block shape
# CPU: 1024-column chunks keep a chunk's temporaries in cache; blocks of up to 256 rows keep the head products at full
# speed (at 128 × 8192 they ran at 26-42 GFLOP/s, at 192-256 × 1024 at 59-64, 2-core EPYC, measured) while the
# block's logit caches stay within CPU_CACHE_MB
CPU_MAX_ROWS, CPU_COLUMNS, CPU_CACHE_MB = 256, 1024, 256
CUDA_MIN_ROWS = 1024
DEFAULT_CUDA_BUDGET_MB = 4096
_LIVE_CHUNK_TEMPORARIES = 8  # fp32 [rows × chunk] tensors alive at once in pass 3 (log q, log p, q, p, grad, ...)


def choose_chunks(spec: LossSpec, device: torch.device, n_tokens: int, vocab: int, n_models: float,
                  grad_temporary_per_column: int = 0) -> tuple[int, int]:
    """(token rows per block, vocabulary columns per chunk); explicit `token_chunk`/`vocab_chunk` win.

    CPU: 1024-column chunks, and as many rows (a multiple of 64, 64 to 256) as keep every model's fp32 logits of the
    block within CPU_CACHE_MB (192 rows at V = 151936 and two models). CUDA: launches dominate small blocks, so a
    block is at least 1024 rows (or every token), and the vocabulary is cut into as few equal chunks as the memory
    budget allows. The budget covers the block's fp32 logit cache of every model (rows × V each), the live chunk
    temporaries, and `grad_temporary_per_column` floats per chunk column: the fp32 [columns × H] product that the
    weight gradient needs when it cannot accumulate in place (`accumulates_in_place`; pass H then, 0 otherwise).
    """
    if device.type != "cuda":
        fitting = int(CPU_CACHE_MB * 1024**2 // (4 * n_models * vocab)) // 64 * 64
        rows, cols = max(64, min(CPU_MAX_ROWS, fitting)), CPU_COLUMNS
    else:
        budget_floats = spec.chunk_budget_mb * 1024**2 // 4
        rows = max(1, min(spec.token_chunk or CUDA_MIN_ROWS, n_tokens))
        if spec.token_chunk is None:  # shrink the block only when not even a 4096-column chunk fits
            per_row = n_models * vocab + _LIVE_CHUNK_TEMPORARIES * 4096
            rows = max(1, min(rows, int((budget_floats - grad_temporary_per_column * 4096) // per_row)))
        room = budget_floats - rows * n_models * vocab
        cols = max(4096, int(room // (rows * _LIVE_CHUNK_TEMPORARIES + grad_temporary_per_column)))
        pieces = -(-vocab // cols)
        cols = -(-vocab // pieces)  # equal chunks: the same kernels for every chunk
    return spec.token_chunk or rows, spec.vocab_chunk or cols


def _reference_scale(divergence: str, param: float, tau: float) -> float:
    """TRL's and Liger's: no τ², and JSD is β·KL(p‖m) + (1-β)·KL(q‖m) without fsdp-kd's 1/(β(1-β))."""
    return param * (1 - param) if divergence == "jsd" else 1.0


# How a tool scales its KD term: D in the divergence's own units (its definition in `divergences.py`) times
# unit(effective divergence, its parameter, τ). Users bringing a kd_coef from another tool pick that tool's convention,
# so the balance of CE and KD is the one they tuned; docs/divergences.md tabulates the factors.
CONVENTIONS: dict[str, Callable[[str, float, float], float]] = {
    # τ²·D (Hinton's), with JSD normalized by β(1-β) so that it tends to the KLs at its endpoints
    "fsdp_kd": lambda divergence, param, tau: tau * tau,
    # TRL's generalized_jsd_loss (GKD, GOLD): D of the tempered softmaxes, no τ²
    "trl": _reference_scale,
    # Liger-Kernel's LigerFusedLinearJSDLoss: the same formula as TRL's
    "liger": _reference_scale,
}


@dataclass(frozen=True)
class LossSpec:
    """The loss's settings. Each field's rule is checked here, in the name of the config key it comes from
    (`config.loss_spec`), so a bad value is refused alike from a config and from code."""
    kd_coef: float = 0.5
    ce_coef: float | None = None  # the CE term's weight; None: 1 - kd_coef (0 on self-generated text, on-policy)
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    akl_mu: float = 0.5  # akl: the teacher's cumulative mass that bounds the head (Wu et al.'s μ)
    skew_alpha: float = 0.1  # skew_kl, skew_reverse_kl: α, the share in the mixture of the KL's first argument
    student_topk: int = 64  # reverse_kl_student_topk: the student's tokens that get a bucket of their own
    temperature: float = 1.0
    convention: str = "fsdp_kd"  # how the KD term is scaled (CONVENTIONS)
    vocab_chunk: int | None = None  # None: chosen per device (choose_chunks)
    token_chunk: int | None = None
    chunk_budget_mb: int = DEFAULT_CUDA_BUDGET_MB  # CUDA: scratch memory the loss may use for one token block
    compile: bool = False  # torch.compile the per-chunk elementwise work

    def __post_init__(self):
        require(0 <= self.kd_coef <= 1, "kd_coef", "in [0, 1]", self.kd_coef)
        require_choice("kd_loss", self.divergence, DIVERGENCES)
        require(0 <= self.jsd_beta <= 1, "jsd_beta", "in [0, 1]", self.jsd_beta)
        require_choice("kd_loss_convention", self.convention, CONVENTIONS)
        require(0 < self.akl_mu < 1, "akl_mu", "in (0, 1)", self.akl_mu)
        require(0 <= self.skew_alpha < 1, "skew_alpha", "in [0, 1)", self.skew_alpha)
        require(self.student_topk >= 1, "student_topk", ">= 1", self.student_topk)
        require(self.temperature > 0, "kd_temperature", "> 0", self.temperature)
        for key, value in (("kd_vocab_chunk", self.vocab_chunk), ("kd_token_chunk", self.token_chunk),
                           ("kd_chunk_budget_mb", self.chunk_budget_mb)):
            require(value is None or value >= 1, key, ">= 1", value)

    @property
    def ce_weight(self) -> float:
        return 1.0 - self.kd_coef if self.ce_coef is None else self.ce_coef

    @property
    def effective_divergence(self) -> str:
        return effective_divergence(self.divergence, self.jsd_beta)

    @property
    def divergence_param(self) -> float:
        """The value of the divergence's own parameter (JSD's β, the skew's α), 0 when it has none."""
        name = DIVERGENCES[self.effective_divergence].parameter
        return 0.0 if name is None else getattr(self, name)

    @property
    def kd_unit(self) -> float:
        """The KD term is kd_unit·D in this spec's convention."""
        return CONVENTIONS[self.convention](self.effective_divergence, self.divergence_param, self.temperature)


@dataclass
class LossJob:
    """One call of the loss but for the student's differentiable tensors (its hidden states, head weight and bias,
    which autograd must see as the Function's inputs): what is scored, against what, and where the metrics go."""
    labels: torch.Tensor
    head: Head  # the student's head as given: its scale and soft-cap
    spec: LossSpec
    vocab_size: int
    targets: Targets
    totals: torch.Tensor | None = None  # the metric sums, set by the call (a Function returns only the loss)


def chunked_loss(h_s: torch.Tensor, s_head: Head, job: LossJob, with_grad: bool):
    """(summed loss, summed metrics [len(METRIC_NAMES)] fp64, Gradients or None): the token blocks in turn, each
    scored by the targets."""
    device, n, spec, targets = h_s.device, h_s.shape[0], job.spec, job.targets
    divergence = DIVERGENCES[spec.effective_divergence]
    temporary = 0 if not with_grad or accumulates_in_place(device, h_s.dtype) else h_s.shape[1]
    # a divergence over the student's buckets keeps a byte per student logit more for the block: its id masks
    cached = targets.models + (ID_MASKS if divergence.student_buckets else 0.0)
    block_rows, cols = choose_chunks(spec, device, n, job.vocab_size, cached, temporary)
    sums_fn, grad_fn = elementwise_functions(spec.compile)
    ce_coef, kd_coef = targets.weights(spec.ce_weight, spec.kd_coef)
    plan = KernelPlan(chunks=vocab_chunks(job.vocab_size, cols), ce_coef=ce_coef, kd_coef=kd_coef,
                      tau=spec.temperature, kd_unit=spec.kd_unit, param=spec.divergence_param, divergence=divergence,
                      w_source=w_source(divergence, with_grad),
                      sums_fn=sums_fn, grad_fn=grad_fn)
    s_weight = s_head.weight.to(h_s.dtype)  # the product dtype: one cast per call, if any
    grads = None
    if with_grad:
        grads = Gradients(torch.zeros(n, h_s.shape[1], device=device),
                          torch.zeros(s_head.weight.shape, device=device),
                          None if s_head.bias is None else torch.zeros(s_head.bias.shape, device=device))
    totals = torch.zeros(len(METRIC_NAMES), dtype=torch.float64, device=device)
    for rows in targets.row_blocks(n, block_rows):
        student = ModelBlock(s_head, s_weight, s_head.bias, h_s[rows])
        block = targets.block(plan, student, job.labels[rows], rows, grads)
        totals[:block.numel()] += block  # a block may leave out the last entries (`Targets.block`)
        del student  # the block's logit caches, before the next block allocates its own
    loss = plan.ce_coef * totals[0] + plan.kd_coef * totals[1]
    return loss, totals, grads


class _ChunkedDistillationLoss(torch.autograd.Function):
    """Autograd's view of the kernel: the gradients come out of the forward; backward scales them."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, job: LossJob):
        s_head = Head(w_s, b_s, job.head.scale, job.head.softcap)
        loss, job.totals, grads = chunked_loss(h_s, s_head, job, with_grad=True)
        ctx.save_for_backward(grads.hidden, grads.weight, *(() if grads.bias is None else (grads.bias,)))
        ctx.dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        return loss.float()

    @staticmethod
    def backward(ctx, grad_loss):
        saved = ctx.saved_tensors
        grad_b = saved[2].mul_(grad_loss).to(ctx.dtypes[2]) if len(saved) == 3 else None
        return saved[0].mul_(grad_loss).to(ctx.dtypes[0]), saved[1].mul_(grad_loss).to(ctx.dtypes[1]), grad_b, None


def loss_against(student_hidden: torch.Tensor, student_head: torch.Tensor | Head, labels: torch.Tensor,
                 spec: LossSpec, vocab_size: int, targets: Targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed loss over the given rows, and summed metrics (detached, fp64, on the device), against the teacher's
    `targets` for the same rows.

    `student_hidden` holds only the rows that have a valid next-token label (already shifted), so prompt and padding
    rows are never projected. `vocab_size` is the shared tokenizer range that both distributions are taken over;
    padded head rows beyond it are ignored. A head is a weight tensor or a `Head`. Gradient work happens only when
    grad mode is on and the student's hidden states or head need a gradient: evaluation under `torch.no_grad()` runs
    the forward passes alone.
    """
    s_head = as_head(student_head)
    check_head_rows(s_head, vocab_size)
    targets.check_vocab(vocab_size)
    targets.check_divergence(spec.effective_divergence, DIVERGENCES[spec.effective_divergence])
    job = LossJob(labels, s_head, spec, vocab_size, targets)
    trainable = [student_hidden, s_head.weight] + ([] if s_head.bias is None else [s_head.bias])
    if torch.is_grad_enabled() and any(t.requires_grad for t in trainable):
        loss = _ChunkedDistillationLoss.apply(student_hidden, s_head.weight, s_head.bias, job)
    else:
        loss, job.totals, _ = chunked_loss(student_hidden, s_head, job, with_grad=False)
        loss = loss.float()
    metrics = dict(zip(METRIC_NAMES, job.totals.unbind()))
    metrics["tokens"] = torch.full((), float(labels.numel()), dtype=torch.float64, device=labels.device)  # no copy
    return loss, metrics


def distillation_loss(student_hidden: torch.Tensor, student_head: torch.Tensor | Head, labels: torch.Tensor,
                      spec: LossSpec, vocab_size: int, teacher_hidden: torch.Tensor | None = None,
                      teacher_head: torch.Tensor | Head | None = None, cached_teacher: SparseTargets | None = None,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`loss_against` with the teacher named as the tests and benchmarks name it: live (its hidden states at the
    same rows, `teacher_hidden`, and its head), cached (`cached_teacher`: its distribution as stored, see
    `SparseTargets`; the divergence is then taken between the bucketed distributions), or absent (plain CE)."""
    if teacher_hidden is not None:
        targets = LiveTargets(teacher_hidden, as_head(teacher_head))
    else:
        targets = NO_TEACHER if cached_teacher is None else cached_teacher
    return loss_against(student_hidden, student_head, labels, spec, vocab_size, targets)
