"""The loss kernel's passes over one token block of one or two models, and the head they compute logits through.

Per block of token rows the logits exist only for that block, and each pass walks the vocabulary in chunks:

  pass 1  logits of both models, chunk by chunk, into the block's cache, with each chunk's log-sum-exp and argmax
          folded into the row's running ones;
  pass 2  per-row sums over the vocabulary that need the final normalizers (KL, entropies, the divergence's own) and,
          when training, w = ∂D/∂log q per token, which takes the spent teacher logits' place in the cache, with its
          row sum Σw (a divergence whose Σw is a constant, like forward KL's -1, has pass 2 folded into pass 3
          instead of paying for a separate sweep; one whose w needs the row's sums first, like AKL's weights, has w
          recomputed in pass 3: `w_source`);
  pass 3  the gradient with respect to the student's logits, c_ce·softmax + (c_kd·unit/τ)·(w - q·Σw), chunk by chunk,
          pushed back through the head straight into the gradients of the hidden states and head weight (and bias).

What makes it fit a GPU:
  - no host syncs: the label's logit and the one-hot term of the CE gradient use the label rows of the head
    (`W[y]`, `index_add_`) once per block, never a `nonzero` or `.any()` per chunk;
  - few launches: the block shape is chosen per device (`loss.choose_chunks`); on CUDA a block is ≥ 1024 rows over a
    few large vocabulary chunks, sized by a memory budget, so a 1k-token micro-batch costs a few hundred launches;
  - tensor cores: with bf16 inputs the head products run in bf16 with fp32 output on CUDA, and the gradient products
    take the gradient in bf16; logits, softmax statistics, row sums and gradient accumulation stay fp32, so no logit
    is rounded to bf16 before its softmax;
  - no gradient work without a gradient: evaluation (grad mode off) runs passes 1 and 2 only.

Each model's head is a `Head`: weight, optional bias, logit scale and soft-cap, so the kernel reproduces the model's
own logits. Which passes a block runs depends on what the student is scored against: `targets.py` holds one `Targets`
entry per form of teacher output, each with its block function built from the passes here (and, for bucketed
distributions, from `buckets.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .divergences import ChunkTerms, Divergence, row_dot

# the metric sums every block returns, in this order; the loss returns them by name. "kd_tokens" counts the rows that
# get a per-token KD term (a row the block masks from it, e.g. one without an aligned teacher token, counts 0), and
# "span_tokens" the rows taught through a group of several tokens instead (across tokenizers: `span_term`)
METRIC_NAMES = ("ce", "kd", "kl", "teacher_entropy", "student_entropy", "top1_agreement", "teacher_ce", "kd_tokens",
                "span_tokens")


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
    if a.is_cuda and fp32_output_products(a.device, a.dtype).mm:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def accumulates_in_place(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `_add_product` adds a product of `dtype` inputs into an fp32 accumulator with no temporary."""
    return dtype == torch.float32 or (device.type == "cuda" and fp32_output_products(device, dtype).addmm)


@dataclass(frozen=True)
class _Fp32Output:
    mm: bool  # torch.mm(a, b, out_dtype=float32) works
    addmm: bool  # torch.addmm(acc, a, b, out_dtype=float32, out=acc) works, accumulating in place


_PROBED: dict[tuple[torch.device, torch.dtype], _Fp32Output] = {}


def fp32_output_products(device: torch.device, dtype: torch.dtype) -> _Fp32Output:
    """What this torch and device can do with low-precision inputs and fp32 output, probed once per (device, dtype)
    on 16×16 inputs and checked against the widened product. The hot path then never catches an exception: a
    transient out-of-memory error there is raised as what it is, instead of silently switching every later product
    to the slower widened path. Only "not supported" answers count as no; an out-of-memory error is raised."""
    key = (device, dtype)
    if key not in _PROBED:
        generator = torch.Generator().manual_seed(0)
        a, b = (torch.randn(16, 16, generator=generator).to(device=device, dtype=dtype) for _ in range(2))
        expected = a.float() @ b.float()

        def works(product, want: torch.Tensor) -> bool:
            try:
                return bool(torch.allclose(product(), want, rtol=1e-3, atol=1e-3))
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, TypeError, NotImplementedError):  # no such overload, or not on this backend
                return False

        def accumulate():  # must add to what the accumulator holds, into that very tensor
            acc = expected.clone()
            out = torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return acc if out.data_ptr() == acc.data_ptr() else torch.full_like(acc, math.nan)

        _PROBED[key] = _Fp32Output(mm=works(lambda: torch.mm(a, b, out_dtype=torch.float32), expected),
                                   addmm=works(accumulate, 2 * expected))
    return _PROBED[key]


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

def vocab_chunks(vocab_size: int, cols: int) -> list[tuple[int, int]]:
    """[v0, v1) column ranges of at most `cols` covering the vocabulary."""
    return [(v0, min(v0 + cols, vocab_size)) for v0 in range(0, vocab_size, cols)]




def logsumexp_given_max(z: torch.Tensor, z_max: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """log Σ exp(z/τ) per row, reusing the row max that the argmax already produced (torch.logsumexp would take it
    again, and guard against infinities that finite logits never have)."""
    shifted = z - z_max[:, None]
    if inv_tau != 1.0:
        shifted.mul_(inv_tau)
    return shifted.exp_().sum(dim=1).log_().add_(z_max if inv_tau == 1.0 else z_max * inv_tau)


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


def chunk_row_sums(t: ChunkTerms, divergence: Divergence, param: float, with_w: bool):
    """(the vocabulary sums of one chunk, w per token or None): the shared sums, the divergence's own, and with
    `with_w` its w = ∂D/∂log q with the row sums "w" and "q" (unless the divergence's Σ w is a constant)."""
    sums, w = divergence.on_chunk(t, param, with_w)
    sums.update(p_log_p=row_dot(t.p, t.log_p), p_log_q=row_dot(t.p, t.log_q), q_log_q=row_dot(t.q, t.log_q))
    if w is not None and divergence.w_total is None:
        sums.update(w=w.sum(1), q=t.q.sum(1))
    return sums, w


def sums_of_chunk(z_s, z_t, lse_s, lse_t, inv_tau: float, divergence: Divergence, param: float, with_w: bool):
    """Pass 2's elementwise work on one chunk: its row sums, and w per token for pass 3 when training."""
    return chunk_row_sums(chunk_terms(z_s, z_t, lse_s, lse_t, inv_tau), divergence, param, with_w)


def logit_grad(z_s: torch.Tensor, q: torch.Tensor, lse_raw_s: torch.Tensor, w: torch.Tensor, w_total,
               inv_tau: float, ce_coef: float, kd_scale: float) -> torch.Tensor:
    """dL/dz_student over one chunk except the CE's one-hot term: c_ce·softmax(z) + kd_scale·(w - q·Σw), where q is
    the tempered softmax (consumed), w = ∂D/∂log q, `w_total` = Σw per row ([rows, 1]) or a constant, and kd_scale
    the KD term's weight times dD/da → dD/dz (`KernelPlan.kd_grad_scale`). At τ = 1 the CE's softmax is q itself:
    three kernels."""
    if inv_tau == 1.0:
        return q.mul_(ce_coef - kd_scale * w_total).add_(w, alpha=kd_scale)
    probs = torch.exp(z_s - lse_raw_s[:, None])
    return probs.mul_(ce_coef).add_(w, alpha=kd_scale).sub_(q.mul_(kd_scale * w_total))


def w_source(divergence: Divergence, with_grad: bool) -> str:
    """Where pass 3 finds w: "folded" (Σw is a constant, so pass 2 rides along in pass 3), "stored" (pass 2 left w in
    the spent teacher logits' slot), "late" (w needs the row sums: recomputed from both models' logits in pass 3)."""
    if with_grad and divergence.w_total is not None:
        return "folded"
    return "late" if divergence.late_w is not None else "stored"


def logit_grad_of_chunk(z_s, z_t_or_w, lse_s, lse_raw_s, lse_t, sums, inv_tau: float, divergence: Divergence,
                        param: float, ce_coef: float, kd_scale: float, source: str):
    """Pass 3's elementwise work on one chunk: (dL/dz_student but the one-hot term, the chunk's row sums or None).
    `z_t_or_w` is the teacher's logits, or the w that pass 2 left in its slot (`source` "stored")."""
    if source == "stored":
        q = ((z_s if inv_tau == 1.0 else z_s * inv_tau) - lse_s[:, None]).exp_()
        return logit_grad(z_s, q, lse_raw_s, z_t_or_w, sums["w_total"], inv_tau, ce_coef, kd_scale), None
    t = chunk_terms(z_s, z_t_or_w, lse_s, lse_t, inv_tau)
    if source == "late":
        w = divergence.late_w(t, sums, param)
        return logit_grad(z_s, t.q, lse_raw_s, w, sums["w_total"], inv_tau, ce_coef, kd_scale), None
    part, w = chunk_row_sums(t, divergence, param, with_w=True)
    return logit_grad(z_s, t.q, lse_raw_s, w, divergence.w_total, inv_tau, ce_coef, kd_scale), part


def add_w_total(sums: dict, divergence: Divergence, param: float, source: str) -> None:
    """Σw per row ([rows, 1]) into the block's complete row sums, once, for pass 3 ("stored" and "late" w)."""
    if source == "stored":
        # Σq is 1 but for the rounding of the log-sum-exp; dividing by it cancels that rounding, which the softmax
        # term would otherwise multiply by Σw (reverse KL's D, large where the two models disagree)
        sums["w_total"] = (sums["w"] / sums["q"])[:, None]
    elif source == "late":
        sums["w_total"] = divergence.late_w_total(sums, param)[:, None]


def accumulate(total: dict, part: dict) -> dict:
    """Adds a chunk's row sums into the running ones, in place; entries not in `part` are kept."""
    for name, value in part.items():
        total[name] = total[name] + value if name in total else value
    return total


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
    """out += a @ b into an fp32 accumulator: in place where it can (`accumulates_in_place`), else through an fp32
    temporary of out's shape, which `choose_chunks` counts in the budget."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        out.addmm_(a, b)
    elif a.is_cuda and fp32_output_products(a.device, a.dtype).addmm:
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
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


def push_back_labels(grads: Gradients, student: ModelBlock, labels: torch.Tensor, rows: slice, ce_weight: float,
                     kd_weights: torch.Tensor | None = None):
    """The CE's one-hot term, -(1-c) at each row's label (plus `kd_weights` [rows], a KD term's own one-hot weight
    there, when it has one), through the head: rows W[y] and `index_add_`, so no chunk has to find which labels it
    holds (a `nonzero`, a host sync, per chunk)."""
    weight = torch.full_like(student.label_logit, -ce_weight)
    coef = student.head.chain(weight if kd_weights is None else weight.add_(kd_weights), student.label_logit)
    grads.hidden[rows].add_(coef[:, None] * student.weight[labels].float())
    grads.weight.index_add_(0, labels, coef[:, None] * student.hidden.float())
    if grads.bias is not None:
        grads.bias.index_add_(0, labels, coef)


# ---------------------------------------------------------------------------------------------------- a block's plan
@dataclass(frozen=True)
class KernelPlan:
    """Everything a token block needs to know, decided once per call from the spec and the shapes."""
    chunks: list[tuple[int, int]]
    ce_coef: float
    kd_coef: float
    tau: float
    kd_unit: float  # the KD term is kd_unit·D: τ² in fsdp-kd's convention (`loss.CONVENTIONS`)
    param: float  # the divergence's parameter (JSD's β, the skew's α), 0 when it has none
    divergence: Divergence
    w_source: str  # where pass 3 finds w (`w_source`): "folded", "stored" or "late"
    sums_fn: Callable
    grad_fn: Callable

    @property
    def inv_tau(self) -> float:
        return 1.0 / self.tau

    @property
    def kd_grad_scale(self) -> float:
        """d(kd_coef·kd_unit·D)/dz per unit of dD/da, a = z/τ: kd_coef·kd_unit/τ (kd_coef·τ at kd_unit = τ²)."""
        return self.kd_coef * self.kd_unit * self.inv_tau
