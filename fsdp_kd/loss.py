"""The distillation loss: (1 - kd_coef)·CE + kd_coef·D(teacher, student), vocabulary-chunked.

Why a hand-written kernel: at 8k tokens and a 152k vocabulary, one model's fp32 logits are ~5 GB, and autograd would
keep the softmax copies and the gradient of that tensor too. Here the logits exist only for one block of token rows
at a time, and each pass over that block walks the vocabulary in chunks:

  pass 1  logits of both models, chunk by chunk, into the block's cache, with each chunk's log-sum-exp and argmax
          folded into the row's running ones;
  pass 2  per-row sums over the vocabulary that need the final normalizers: KL, entropies, and whatever the
          divergence's gradient needs (a divergence whose gradient needs no sums, like forward KL, has them folded
          into pass 3 instead of paying for a separate sweep);
  pass 3  the gradient with respect to the student's logits, chunk by chunk, pushed back through the head straight
          into the gradients of the hidden states and head weight (and bias).

The gradient is produced during the forward pass (as Liger-Kernel does), so the logits are computed once: four matrix
products in all (two forward, two gradient), which is the floor. `backward` only scales the stored gradients.

What makes it fit a GPU:
  - no host syncs: the label's logit and the one-hot term of the CE gradient use the label rows of the head
    (`W[y]`, `index_add_`) once per block, never a `nonzero` or `.any()` per chunk;
  - few launches: the block shape is chosen per device (`choose_chunks`); on CUDA a block is ≥ 1024 rows over a few
    large vocabulary chunks, sized by a memory budget, so a 1k-token micro-batch costs a few hundred launches;
  - tensor cores: with bf16 inputs the head products run in bf16 with fp32 output on CUDA, and the gradient products
    take the gradient in bf16; logits, softmax statistics, row sums and gradient accumulation stay fp32, so no logit
    is rounded to bf16 before its softmax;
  - no gradient work without a gradient: evaluation (grad mode off) runs passes 1 and 2 only.

Each divergence is one entry of `DIVERGENCES`: its row terms, its value from their sums, and its gradient with respect
to the student's tempered logits. Each model's head is a `Head`: weight, optional bias, logit scale and soft-cap, so
the kernel reproduces the model's own logits.

All returned values are *sums* over the valid tokens; the trainer divides by the global token count, which is the
only way to make gradients independent of micro-batch split and world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

METRIC_NAMES = ("ce", "kd", "kl", "teacher_entropy", "student_entropy", "top1_agreement", "teacher_ce")


# ---------------------------------------------------------------------------------------------------- divergences
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


def _xlogy(x: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """x·log_ratio, with 0·log(0/·) = 0 (an empty bucket adds nothing, not NaN)."""
    return torch.where(x > 0, x * log_ratio, 0.0)


def _xlogy_sum(x: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    return _xlogy(x, log_ratio).sum(1)


def _jsd_on_buckets(b: Buckets, beta: float):
    """∂D/∂Q = log(Q/m)/β, so w = Q·log(Q/m)/β: bounded, as m ≥ (1-β)·Q."""
    log_m = torch.logaddexp(b.log_p + math.log(beta), b.log_q + math.log1p(-beta))
    value = (beta * _xlogy_sum(b.p, b.log_p - log_m) + (1 - beta) * _xlogy_sum(b.q, b.log_q - log_m))
    return value / (beta * (1 - beta)), _xlogy(b.q, b.log_q - log_m) / beta


DIVERGENCES: dict[str, Divergence] = {
    # KL(p‖q): mode covering, the classic KD objective
    "forward_kl": Divergence(
        row_terms=lambda t, beta: {},
        value=lambda s, beta: s["p_log_p"] - s["p_log_q"],
        grad=lambda t, s, beta: t.q - t.p,
        on_buckets=lambda b, beta: (_xlogy_sum(b.p, b.log_p - b.log_q), -b.p),  # Q·(-p/Q)
        grad_needs_sums=False),
    # KL(q‖p): mode seeking, the usual choice on-policy
    "reverse_kl": Divergence(
        row_terms=lambda t, beta: {"q_log_p": t.q * t.log_p},  # summed by the kernel
        value=lambda s, beta: s["q_log_q"] - s["q_log_p"],
        grad=lambda t, s, beta: t.q * (t.log_q - t.log_p - (s["q_log_q"] - s["q_log_p"])[:, None]),
        on_buckets=lambda b, beta: (_xlogy_sum(b.q, b.log_q - b.log_p), _xlogy(b.q, b.log_q - b.log_p))),
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
SHARED_SUMS = ("p_log_p", "p_log_q", "q_log_q")  # KL and both entropies, logged for every divergence


# ---------------------------------------------------------------------------------------------------- the spec
CPU_CHUNKS = (128, 8192)  # (token rows, vocabulary columns): the fastest on a 2-core CPU (docs/benchmarks.md)
CUDA_MIN_ROWS = 1024
DEFAULT_CUDA_BUDGET_MB = 4096
_LIVE_CHUNK_TEMPORARIES = 8  # fp32 [rows × chunk] tensors alive at once in pass 3 (log q, log p, q, p, grad, ...)


@dataclass(frozen=True)
class LossSpec:
    kd_coef: float = 0.5
    ce_coef: float | None = None  # the CE term's weight; None: 1 - kd_coef (0 on self-generated text, on-policy)
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    temperature: float = 1.0
    vocab_chunk: int | None = None  # None: chosen per device (choose_chunks)
    token_chunk: int | None = None
    chunk_budget_mb: int = DEFAULT_CUDA_BUDGET_MB  # CUDA: scratch memory the loss may use for one token block
    compile: bool = False  # torch.compile the per-chunk elementwise work

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"kd_loss must be one of {tuple(DIVERGENCES)}, got {self.divergence!r}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if not 0.0 <= self.kd_coef <= 1.0:
            raise ValueError(f"kd_coef must be in [0, 1], got {self.kd_coef}")
        if self.temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.temperature}")
        if (self.vocab_chunk is not None and self.vocab_chunk < 1) or (
                self.token_chunk is not None and self.token_chunk < 1) or self.chunk_budget_mb < 1:
            raise ValueError("kd_vocab_chunk, kd_token_chunk and kd_chunk_budget_mb must be >= 1")

    @property
    def ce_weight(self) -> float:
        return 1.0 - self.kd_coef if self.ce_coef is None else self.ce_coef

    @property
    def effective_divergence(self) -> str:
        """JSD at its endpoints is computed as the KL it equals there, not as 0/0."""
        if self.divergence == "jsd" and self.jsd_beta == 0.0:
            return "forward_kl"
        if self.divergence == "jsd" and self.jsd_beta == 1.0:
            return "reverse_kl"
        return self.divergence


def choose_chunks(spec: LossSpec, device: torch.device, n_tokens: int, vocab: int, n_models: int) -> tuple[int, int]:
    """(token rows per block, vocabulary columns per chunk); explicit `token_chunk`/`vocab_chunk` win.

    CPU: small blocks keep each chunk in cache. CUDA: launches dominate small blocks, so a block is at least 1024 rows
    (or every token), and the vocabulary is cut into as few equal chunks as the memory budget allows. The budget
    covers the block's fp32 logit cache of every model (rows × V each) plus the live chunk temporaries.
    """
    if device.type != "cuda":
        rows, cols = CPU_CHUNKS
    else:
        budget_floats = spec.chunk_budget_mb * 1024**2 // 4
        rows = max(1, min(spec.token_chunk or CUDA_MIN_ROWS, n_tokens))
        if spec.token_chunk is None:  # shrink the block only when not even a 4096-column chunk fits
            rows = max(1, min(rows, budget_floats // (n_models * vocab + _LIVE_CHUNK_TEMPORARIES * 4096)))
        room = budget_floats // rows - n_models * vocab
        cols = max(4096, room // _LIVE_CHUNK_TEMPORARIES)
        pieces = -(-vocab // cols)
        cols = -(-vocab // pieces)  # equal chunks: the same kernels for every chunk
    return spec.token_chunk or rows, spec.vocab_chunk or cols


def vocab_chunks(vocab_size: int, cols: int) -> list[tuple[int, int]]:
    """[v0, v1) column ranges of at most `cols` covering the vocabulary."""
    return [(v0, min(v0 + cols, vocab_size)) for v0 in range(0, vocab_size, cols)]


# ---------------------------------------------------------------------------------------------------- heads
@dataclass
class Head:
    """What a model does after its last hidden state: z = softcap(scale · (h·Wᵀ + b)).

    softcap(x) = cap · tanh(x / cap) (Gemma-2/3 `final_logit_softcapping`); scale is Cohere's `logit_scale` or
    1/Granite's `logits_scaling`; b is a head bias (Phi-1/2). A plain Linear head is Head(weight).
    """
    weight: torch.Tensor  # [rows ≥ vocab, hidden]
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def finish(self, raw: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Raw products (fp32) → the model's logits, in place."""
        if bias is not None:
            raw.add_(bias.float())
        if self.scale != 1.0:
            raw.mul_(self.scale)
        if self.softcap is not None:
            raw.div_(self.softcap).tanh_().mul_(self.softcap)
        return raw

    def chain(self, grad_z: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """dL/dz → dL/d(h·Wᵀ + b), in place on grad_z: the derivative of `finish` at its output z."""
        if self.softcap is not None:
            grad_z.mul_(1 - (z / self.softcap).square())
        if self.scale != 1.0:
            grad_z.mul_(self.scale)
        return grad_z


def as_head(head: torch.Tensor | Head) -> Head:
    return head if isinstance(head, Head) else Head(head)


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 output. bf16/fp16 inputs on CUDA run on tensor cores with fp32 accumulation and output
    (`out_dtype`); elsewhere the inputs are widened first, which computes the same exact products and fp32 sums."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda and _CUDA_OUT_DTYPE.get("ok", True):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without mm(out_dtype=): widen instead, from now on
            _CUDA_OUT_DTYPE["ok"] = False
    return torch.mm(a.float(), b.float())


_CUDA_OUT_DTYPE: dict[str, bool] = {}


# ---------------------------------------------------------------------------------------------------- the passes
@dataclass
class ModelBlock:
    """One model over one token block: its logits chunk by chunk (the cache), log-sum-exp of z/τ and of z, the
    argmax, and the label's logit. Filled by pass 1."""
    head: Head
    weight: torch.Tensor  # the head weight in the product dtype, cast once per call
    bias: torch.Tensor | None
    hidden: torch.Tensor  # [rows, hidden] in the product dtype
    logits: list[torch.Tensor] = field(default_factory=list)
    lse: torch.Tensor | None = None  # of z/τ
    lse_raw: torch.Tensor | None = None  # of z (the CE's normalizer); `lse` itself when τ = 1
    argmax: torch.Tensor | None = None
    label_logit: torch.Tensor | None = None


def logsumexp_given_max(z: torch.Tensor, z_max: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """log Σ exp(z/τ) per row, reusing the row max that the argmax already produced (torch.logsumexp would take it
    again, and guard against infinities that finite logits never have)."""
    shifted = z - z_max[:, None]
    if inv_tau != 1.0:
        shifted.mul_(inv_tau)
    return shifted.exp_().sum(dim=1).log_().add_(z_max * inv_tau)


def pass1_logits(model: ModelBlock, chunks, labels: torch.Tensor, inv_tau: float) -> None:
    """Logits chunk by chunk, with running log-sum-exp (at τ and at 1) and argmax; the label logit from W[y]."""
    for v0, v1 in chunks:
        z = model.head.finish(matmul_fp32(model.hidden, model.weight[v0:v1].t()),
                              None if model.bias is None else model.bias[v0:v1])
        model.logits.append(z)
        chunk_max, chunk_arg = z.max(dim=1)
        chunk_lse_raw = logsumexp_given_max(z, chunk_max, 1.0)
        chunk_lse = chunk_lse_raw if inv_tau == 1.0 else logsumexp_given_max(z, chunk_max, inv_tau)
        if model.lse is None:
            model.argmax, model.lse, model.lse_raw = chunk_arg, chunk_lse, chunk_lse_raw
            running_max = chunk_max
            continue
        # the first chunk that reaches the running max keeps the argmax, as torch.argmax would
        model.argmax = torch.where(chunk_max > running_max, chunk_arg + v0, model.argmax)
        running_max = torch.maximum(running_max, chunk_max)
        model.lse = torch.logaddexp(model.lse, chunk_lse)
        model.lse_raw = model.lse if inv_tau == 1.0 else torch.logaddexp(model.lse_raw, chunk_lse_raw)
    label_raw = (model.hidden.float() * model.weight[labels].float()).sum(1)
    model.label_logit = model.head.finish(label_raw, None if model.bias is None else model.bias[labels])


def chunk_terms(z_s: torch.Tensor, z_t: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor,
                inv_tau: float) -> ChunkTerms:
    """Both tempered distributions over one chunk, from the logits and the normalizers of z/τ."""
    log_q = (z_s if inv_tau == 1.0 else z_s * inv_tau) - lse_s[:, None]
    log_p = (z_t if inv_tau == 1.0 else z_t * inv_tau) - lse_t[:, None]
    return ChunkTerms(log_q, log_p, log_q.exp(), log_p.exp())


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_j a[i, j]·b[i, j] per row as one batched product: one kernel and no [rows × cols] temporary, where
    `(a * b).sum(1)` is two kernels and writes the product out (twice as slow on a CPU, measured)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def chunk_row_sums(t: ChunkTerms, divergence: Divergence, beta: float) -> dict[str, torch.Tensor]:
    """The vocabulary sums of one chunk: the shared ones and the divergence's own."""
    sums = {"p_log_p": row_dot(t.p, t.log_p), "p_log_q": row_dot(t.p, t.log_q), "q_log_q": row_dot(t.q, t.log_q)}
    sums.update({name: term.sum(1) for name, term in divergence.row_terms(t, beta).items()})
    return sums


def sums_of_chunk(z_s, z_t, lse_s, lse_t, inv_tau: float, divergence: Divergence, beta: float):
    """Pass 2's elementwise work on one chunk."""
    return chunk_row_sums(chunk_terms(z_s, z_t, lse_s, lse_t, inv_tau), divergence, beta)


def logit_grad_of_chunk(z_s, z_t, lse_s, lse_raw_s, lse_t, sums, inv_tau: float, divergence: Divergence,
                        beta: float, ce_coef: float, kd_coef: float, with_sums: bool):
    """Pass 3's elementwise work on one chunk: dL/dz_student except the CE's one-hot term,
    w·softmax(z) + c·τ·dD/da (w the CE's weight, 1-c unless set; a = z/τ, so d(τ²·D)/dz = τ·dD/da), and the chunk's
    row sums when pass 2 was folded in (`with_sums`; then `sums` is None and the divergence's gradient needs none)."""
    t = chunk_terms(z_s, z_t, lse_s, lse_t, inv_tau)
    student_probs = t.q if inv_tau == 1.0 else torch.exp(z_s - lse_raw_s[:, None])
    grad = torch.add(student_probs * ce_coef, divergence.grad(t, sums, beta), alpha=kd_coef / inv_tau)
    return grad, (chunk_row_sums(t, divergence, beta) if with_sums else None)


def _accumulate(total: dict | None, part: dict) -> dict:
    return part if total is None else {name: total[name] + part[name] for name in part}


_COMPILED: dict[str, Callable] = {}


def elementwise_functions(compiled: bool) -> tuple[Callable, Callable]:
    """(pass 2's, pass 3's) per-chunk functions; compiled, each is a few fused kernels instead of a dozen."""
    if not compiled:
        return sums_of_chunk, logit_grad_of_chunk
    if not _COMPILED:
        _COMPILED["sums"] = torch.compile(sums_of_chunk, dynamic=True)
        _COMPILED["grad"] = torch.compile(logit_grad_of_chunk, dynamic=True)
    return _COMPILED["sums"], _COMPILED["grad"]


@dataclass
class Gradients:
    """fp32 accumulators for the student's hidden states, head weight and head bias."""
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        out.addmm_(a, b)
    else:
        out.add_(matmul_fp32(a, b))


def push_back(grads: Gradients, student: ModelBlock, grad_z: torch.Tensor, z: torch.Tensor, rows: slice,
              v0: int, v1: int) -> None:
    """One chunk's dL/dz through the head into the hidden-state, weight and bias gradients: the two gradient
    products, with dL/dz in the product dtype (bf16 on tensor cores) and fp32 accumulation."""
    g = student.head.chain(grad_z, z)
    if grads.bias is not None:
        grads.bias[v0:v1].add_(g.sum(0))
    g = g.to(student.hidden.dtype)
    _add_product(grads.hidden[rows], g, student.weight[v0:v1])
    _add_product(grads.weight[v0:v1], g.t(), student.hidden)


def push_back_labels(grads: Gradients, student: ModelBlock, labels: torch.Tensor, rows: slice, ce_weight: float):
    """The CE's one-hot term, -(1-c) at each row's label, through the head: rows W[y] and `index_add_`, so no
    chunk has to find which labels it holds (a `nonzero`, a host sync, per chunk)."""
    coef = student.head.chain(torch.full_like(student.label_logit, -ce_weight), student.label_logit)
    grads.hidden[rows].add_(coef[:, None] * student.weight[labels].float())
    grads.weight.index_add_(0, labels, coef[:, None] * student.hidden.float())
    if grads.bias is not None:
        grads.bias.index_add_(0, labels, coef)


# ---------------------------------------------------------------------------------------------------- the kernel
def _cast_once(head: Head, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight in the product dtype (one cast per call, only when it differs), and its bias."""
    return head.weight.to(dtype), head.bias


@dataclass(frozen=True)
class KernelPlan:
    """Everything a token block needs to know, decided once per call from the spec and the shapes."""
    chunks: list[tuple[int, int]]
    ce_coef: float
    kd_coef: float
    tau: float
    beta: float
    divergence: Divergence
    fold_sums_into_grad: bool  # pass 2 rides along in pass 3 (training with a divergence whose grad needs no sums)
    sums_fn: Callable
    grad_fn: Callable

    @property
    def inv_tau(self) -> float:
        return 1.0 / self.tau


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


def distillation_block(plan: KernelPlan, student: ModelBlock, teacher: ModelBlock, labels, rows: slice,
                       grads: Gradients | None) -> torch.Tensor:
    """One token block of both models: passes 1-3. Returns the block's metric sums, ordered as METRIC_NAMES.
    Its logit caches die with it, before the next block allocates its own."""
    pass1_logits(student, plan.chunks, labels, plan.inv_tau)
    pass1_logits(teacher, plan.chunks, labels, plan.inv_tau)
    sums = None
    if not plan.fold_sums_into_grad:  # pass 2
        for z_s, z_t in zip(student.logits, teacher.logits):
            sums = _accumulate(sums, plan.sums_fn(z_s, z_t, student.lse, teacher.lse, plan.inv_tau, plan.divergence,
                                                  plan.beta))
    for k, (v0, v1) in enumerate(plan.chunks if grads is not None else ()):  # pass 3
        grad_z, chunk_sums = plan.grad_fn(student.logits[k], teacher.logits[k], student.lse, student.lse_raw,
                                          teacher.lse, sums, plan.inv_tau, plan.divergence, plan.beta, plan.ce_coef,
                                          plan.kd_coef,
                                          plan.fold_sums_into_grad)
        if plan.fold_sums_into_grad:
            sums = _accumulate(sums, chunk_sums)
        push_back(grads, student, grad_z, student.logits[k], rows, v0, v1)
    if grads is not None:
        push_back_labels(grads, student, labels, rows, plan.ce_coef)
    kd = plan.divergence.value(sums, plan.beta) * plan.tau**2
    per_row = torch.stack([student.lse_raw - student.label_logit, kd, sums["p_log_p"] - sums["p_log_q"],
                           -sums["p_log_p"], -sums["q_log_q"], (student.argmax == teacher.argmax).float(),
                           teacher.lse_raw - teacher.label_logit])
    return per_row.sum(1)


@dataclass
class SparseTargets:
    """A cached teacher distribution per target row, at the run's temperature: `ids` [N, k] token ids, `log_p`
    [N, k] their log-probabilities (-inf on an empty slot), `log_rest` [N] the log of the mass on every other token
    (-inf when there is none: a sampled cache, or k = V). No two non-empty slots of a row hold the same id."""
    ids: torch.Tensor
    log_p: torch.Tensor
    log_rest: torch.Tensor

    def __getitem__(self, rows: slice) -> "SparseTargets":
        return SparseTargets(self.ids[rows], self.log_p[rows], self.log_rest[rows])


def mass_on_buckets(model: ModelBlock, chunks, ids: torch.Tensor, inv_tau: float):
    """A model's tempered distribution over the buckets `ids` [rows, k] + the rest, from its pass-1 logits: log q at
    the ids (gathered from the chunk that holds each), the log of its mass on all other tokens (a log-sum-exp over
    each chunk with the ids masked out, exact even when that mass is ~0, as it is at k = V), and Σ q·log q over the
    whole vocabulary. Pass 2 of a cached teacher for the student; the cache's builder uses it for the teacher."""
    a_cached = torch.zeros(ids.shape, device=ids.device)
    lse_rest = torch.full(ids.shape[:1], -math.inf, device=ids.device)
    q_log_q = torch.zeros(ids.shape[:1], device=ids.device)
    for z, (v0, v1) in zip(model.logits, chunks):
        here, local = _in_chunk(ids, v0, v1)
        a = z if inv_tau == 1.0 else z * inv_tau
        a_cached = torch.where(here, a.gather(1, local), a_cached)
        lse_rest = torch.logaddexp(lse_rest, torch.logsumexp(_rest_only(a, ids, v0, v1), dim=1))
        log_q = a - model.lse[:, None]
        q_log_q += row_dot(log_q.exp(), log_q)
    return a_cached - model.lse[:, None], lse_rest - model.lse, q_log_q


def _in_chunk(ids: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(which ids fall in columns [v0, v1), their column in the chunk, clamped into it where they do not)."""
    return (ids >= v0) & (ids < v1), (ids - v0).clamp(0, v1 - v0 - 1)


def _rest_only(a: torch.Tensor, ids: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
    """A chunk's tempered logits or log-probabilities (columns [v0, v1)) with the cached ids' columns at -inf: the
    rest bucket's tokens."""
    here, local = _in_chunk(ids, v0, v1)
    hit = torch.zeros(a.shape[0], v1 - v0 + 1, dtype=torch.bool, device=a.device)
    hit.scatter_(1, torch.where(here, local, v1 - v0), True)  # the extra last column takes the misses
    return a.masked_fill(hit[:, :-1], -math.inf)


def bucket_block(plan: KernelPlan, student: ModelBlock, cached: SparseTargets, labels, rows: slice,
                 grads: Gradients | None) -> torch.Tensor:
    """One token block against a cached teacher: D between the bucketed distributions, the k cached tokens plus one
    bucket for the rest (the student's rest is 1 - Σ_k q). Returns the block's metric sums, ordered as METRIC_NAMES.

    With w = ∂D/∂log Q per bucket (`Divergence.on_buckets`; w_r the rest's) and Q_r the student's rest mass, the
    gradient with respect to the tempered logits is
        dD/da_v = -q_v·Σ_B w_B  +  [v in the rest]·(q_v / Q_r)·w_r  +  [v cached]·w_v,
    two dense terms (the softmax, and the rest's own softmax q_v / Q_r = exp(log q_v - log Q_r) ≤ 1, each times a
    per-row constant) and a sparse term scattered into the chunk that holds each cached id. Every
    factor is bounded, so the gradient is finite and keeps its pull at any logit gap: a token the student has all but
    ruled out (q_v = 0 in fp32) still gets -w_v = p_v under forward KL. Only the student's head is multiplied: the
    teacher side is [rows, k] numbers read from disk."""
    pass1_logits(student, plan.chunks, labels, plan.inv_tau)
    log_q_cached, log_q_rest, q_log_q = mass_on_buckets(student, plan.chunks, cached.ids, plan.inv_tau)
    log_q_cached = log_q_cached.masked_fill(cached.log_p == -math.inf, -math.inf)  # empty slots are no bucket
    log_p = torch.cat([cached.log_p, cached.log_rest[:, None]], 1)
    log_q = torch.cat([log_q_cached, log_q_rest[:, None]], 1)
    b = Buckets(log_p, log_q, log_p.exp(), log_q.exp())
    value, w = plan.divergence.on_buckets(b, plan.beta)
    kd_scale = plan.kd_coef / plan.inv_tau  # d(τ²·D)/dz = τ·dD/da
    # Σ_B Q_B is 1 but for the rounding of the student's log-sum-exp; dividing by it cancels that rounding, which the
    # softmax term would otherwise multiply by Σ w (reverse KL's D, large where the two models disagree)
    minus_total = -w.sum(1, keepdim=True) / b.q.sum(1, keepdim=True)
    w_rest, w_cached = w[:, -1:], w[:, :-1] * kd_scale
    log_rest = torch.where(log_q_rest > -math.inf, log_q_rest, 0.0)[:, None]  # a row without a rest never reads it
    for k, (v0, v1) in enumerate(plan.chunks if grads is not None else ()):
        z = student.logits[k]
        log_q = (z if plan.inv_tau == 1.0 else z * plan.inv_tau) - student.lse[:, None]
        q = log_q.exp()
        probs = q if plan.inv_tau == 1.0 else torch.exp(z - student.lse_raw[:, None])
        rest_share = _rest_only(log_q, cached.ids, v0, v1).sub_(log_rest).exp_()  # q_v / Q_r, 0 on the cached ids
        kd_grad = torch.addcmul(q * minus_total, rest_share, w_rest)
        grad_z = torch.add(probs * plan.ce_coef, kd_grad, alpha=kd_scale)
        here, local = _in_chunk(cached.ids, v0, v1)
        grad_z.scatter_add_(1, local, torch.where(here, w_cached, 0.0))
        push_back(grads, student, grad_z, z, rows, v0, v1)
    if grads is not None:
        push_back_labels(grads, student, labels, rows, plan.ce_coef)
    is_label = cached.ids == labels[:, None]
    teacher_log_p_label = torch.where(is_label.any(1), torch.where(is_label, cached.log_p, -math.inf).amax(1),
                                      cached.log_rest)
    teacher_top = cached.ids.gather(1, cached.log_p.argmax(1, keepdim=True))[:, 0]
    per_row = torch.stack([student.lse_raw - student.label_logit, value * plan.tau**2,
                           _xlogy_sum(b.p, b.log_p - b.log_q), -_xlogy_sum(b.p, b.log_p), -q_log_q,
                           (student.argmax == teacher_top).float(), -teacher_log_p_label])
    return per_row.sum(1)


def chunked_loss(h_s: torch.Tensor, s_head: Head, labels: torch.Tensor, spec: LossSpec, vocab_size: int,
                 h_t: torch.Tensor | None, t_head: Head | None, with_grad: bool, cached: SparseTargets | None = None):
    """(summed loss, summed metrics [len(METRIC_NAMES)] fp64, Gradients or None). The teacher is live (`h_t`,
    `t_head`), cached (`cached`), or absent."""
    device, n = h_s.device, h_s.shape[0]
    has_teacher = h_t is not None or cached is not None
    divergence = DIVERGENCES[spec.effective_divergence]
    block_rows, cols = choose_chunks(spec, device, n, vocab_size, 2 if h_t is not None else 1)
    sums_fn, grad_fn = elementwise_functions(spec.compile)
    plan = KernelPlan(chunks=vocab_chunks(vocab_size, cols),
                      ce_coef=spec.ce_weight if has_teacher else 1.0, kd_coef=spec.kd_coef if has_teacher else 0.0,
                      tau=spec.temperature, beta=spec.jsd_beta,
                      divergence=divergence,
                      fold_sums_into_grad=with_grad and not divergence.grad_needs_sums and h_t is not None,
                      sums_fn=sums_fn, grad_fn=grad_fn)
    s_weight, s_bias = _cast_once(s_head, h_s.dtype)
    t_weight, t_bias = _cast_once(t_head, h_t.dtype) if h_t is not None else (None, None)
    grads = None
    if with_grad:
        grads = Gradients(torch.zeros(n, h_s.shape[1], device=device),
                          torch.zeros(s_head.weight.shape, device=device),
                          None if s_bias is None else torch.zeros(s_bias.shape, device=device))
    totals = torch.zeros(len(METRIC_NAMES), dtype=torch.float64, device=device)
    for r0 in range(0, n, block_rows):
        rows = slice(r0, min(r0 + block_rows, n))
        student = ModelBlock(s_head, s_weight, s_bias, h_s[rows])
        teacher = ModelBlock(t_head, t_weight, t_bias, h_t[rows]) if h_t is not None else None
        if teacher is not None:
            totals += distillation_block(plan, student, teacher, labels[rows], rows, grads)
        elif cached is not None:
            totals += bucket_block(plan, student, cached[rows], labels[rows], rows, grads)
        else:
            totals += student_block(plan, student, labels[rows], rows, grads)
        del student, teacher  # the block's logit caches, before the next block allocates its own
    loss = plan.ce_coef * totals[0] + plan.kd_coef * totals[1]
    return loss, totals, grads


class _ChunkedDistillationLoss(torch.autograd.Function):
    """Autograd's view of the kernel: the gradients come out of the forward; backward scales them."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, heads, spec, vocab_size, metrics_out, cached):
        s_head, t_head = heads
        s_head = Head(w_s, b_s, s_head.scale, s_head.softcap)
        t_head = None if t_head is None else Head(w_t, b_t, t_head.scale, t_head.softcap)
        loss, totals, grads = chunked_loss(h_s, s_head, labels, spec, vocab_size, h_t, t_head, with_grad=True,
                                           cached=cached)
        metrics_out["totals"] = totals
        ctx.save_for_backward(grads.hidden, grads.weight, *(() if grads.bias is None else (grads.bias,)))
        ctx.dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        return loss.float()

    @staticmethod
    def backward(ctx, grad_loss):
        saved = ctx.saved_tensors
        grad_b = saved[2].mul_(grad_loss).to(ctx.dtypes[2]) if len(saved) == 3 else None
        return (saved[0].mul_(grad_loss).to(ctx.dtypes[0]), saved[1].mul_(grad_loss).to(ctx.dtypes[1]), grad_b,
                None, None, None, None, None, None, None, None, None)


def distillation_loss(student_hidden: torch.Tensor, student_head: torch.Tensor | Head, labels: torch.Tensor,
                      spec: LossSpec, vocab_size: int, teacher_hidden: torch.Tensor | None = None,
                      teacher_head: torch.Tensor | Head | None = None, cached_teacher: SparseTargets | None = None,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed loss over the given rows, and summed metrics (detached, fp64, on the device).

    The teacher is live (its hidden states at the same rows and its head), cached (`cached_teacher`: its
    distribution as stored, see `SparseTargets`; the divergence is then taken between the bucketed distributions),
    or absent.

    `student_hidden`/`teacher_hidden` hold only the rows that have a valid next-token label (already shifted), so
    prompt and padding rows are never projected. `vocab_size` is the shared tokenizer range that both
    distributions are taken over; padded head rows beyond it are ignored. Without a teacher the loss is plain CE.
    A head is a weight tensor or a `Head`. Gradient work happens only when grad mode is on and the student's
    hidden states or head need a gradient: evaluation under `torch.no_grad()` runs the forward passes alone.
    """
    s_head = as_head(student_head)
    t_head = None if teacher_head is None else as_head(teacher_head)
    if s_head.weight.shape[0] < vocab_size or (t_head is not None and t_head.weight.shape[0] < vocab_size):
        raise ValueError(f"vocab_size {vocab_size} exceeds an output head's rows")
    trainable = [student_hidden, s_head.weight] + ([] if s_head.bias is None else [s_head.bias])
    if torch.is_grad_enabled() and any(t.requires_grad for t in trainable):
        out: dict[str, torch.Tensor] = {}
        loss = _ChunkedDistillationLoss.apply(
            student_hidden, s_head.weight, s_head.bias, teacher_hidden, None if t_head is None else t_head.weight,
            None if t_head is None else t_head.bias, labels, (s_head, t_head), spec, vocab_size, out, cached_teacher)
        totals = out["totals"]
    else:
        loss, totals, _ = chunked_loss(student_hidden, s_head, labels, spec, vocab_size, teacher_hidden, t_head,
                                       with_grad=False, cached=cached_teacher)
        loss = loss.float()
    metrics = dict(zip(METRIC_NAMES, totals.unbind()))
    metrics["tokens"] = torch.full((), float(labels.numel()), dtype=torch.float64, device=labels.device)  # no copy
    return loss, metrics
