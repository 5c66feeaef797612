"""The loss kernel's passes over one token block, and the targets a teacher hands the loss.

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
  - few launches: the block shape is chosen per device (`choose_chunks`); on CUDA a block is ≥ 1024 rows over a few
    large vocabulary chunks, sized by a memory budget, so a 1k-token micro-batch costs a few hundred launches;
  - tensor cores: with bf16 inputs the head products run in bf16 with fp32 output on CUDA, and the gradient products
    take the gradient in bf16; logits, softmax statistics, row sums and gradient accumulation stay fp32, so no logit
    is rounded to bf16 before its softmax;
  - no gradient work without a gradient: evaluation (grad mode off) runs passes 1 and 2 only.

Each model's head is a `Head`: weight, optional bias, logit scale and soft-cap, so the kernel reproduces the model's
own logits. What the student is scored against is a `Targets` entry, which picks its block function: `LiveTargets`
(a teacher's hidden states and head: `distillation_block`, or `student_bucket_block` for a divergence taken over the
student's top tokens), `SparseTargets` (a cached distribution over a few ids and a rest bucket: `bucket_block`),
`NO_TEACHER` (CE only: `student_block`); `cross_vocab.CrossVocabTargets` is a teacher of another vocabulary. Another
form of teacher output is one more `Targets` subclass with its block function; the divergences it can take come from
`divergences.py`. Bucketed distributions (a cached teacher's ids, the student's top tokens, the shared tokens of two
vocabularies) all take their gradient from `bucket_gradient`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from .divergences import Buckets, ChunkTerms, Divergence, row_dot, xlogy_sum

if TYPE_CHECKING:
    from .loss import LossSpec

# the metric sums every block returns, in this order; the loss returns them by name
METRIC_NAMES = ("ce", "kd", "kl", "teacher_entropy", "student_entropy", "top1_agreement", "teacher_ce")


# ---------------------------------------------------------------------------------------------------- block shape
# CPU: 1024-column chunks keep a chunk's temporaries in cache; blocks of up to 256 rows keep the head products at full
# speed (at 128 × 8192 they ran at 26-42 GFLOP/s, at 192-256 × 1024 at 59-64, 2-core EPYC, measured) while the
# block's logit caches stay within CPU_CACHE_MB
CPU_MAX_ROWS, CPU_COLUMNS, CPU_CACHE_MB = 256, 1024, 256
CUDA_MIN_ROWS = 1024
DEFAULT_CUDA_BUDGET_MB = 4096
_LIVE_CHUNK_TEMPORARIES = 8  # fp32 [rows × chunk] tensors alive at once in pass 3 (log q, log p, q, p, grad, ...)
ID_MASKS = 0.25  # a block that places bucket ids keeps a bool per logit (`IdPlace.mask`): a quarter of fp32 logits


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


def _accumulate(total: dict, part: dict) -> dict:
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


def push_back_labels(grads: Gradients, student: ModelBlock, labels: torch.Tensor, rows: slice, ce_weight: float):
    """The CE's one-hot term, -(1-c) at each row's label, through the head: rows W[y] and `index_add_`, so no
    chunk has to find which labels it holds (a `nonzero`, a host sync, per chunk)."""
    coef = student.head.chain(torch.full_like(student.label_logit, -ce_weight), student.label_logit)
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


# ---------------------------------------------------------------------------------------------------- targets
class Targets(ABC):
    """The teacher's side of one call of the loss, over the call's rows: each kind is one subclass, whose `block`
    runs the passes of one token block of the student against it. The loss loops over token blocks calling `block`
    and never asks which kind it has."""
    models = 1  # the models whose fp32 logits a token block caches (the student, and a live teacher): sizes blocks

    def weights(self, spec: LossSpec) -> tuple[float, float]:
        """(CE weight, KD weight) of the loss against these targets."""
        return spec.ce_weight, spec.kd_coef

    def check_vocab(self, vocab_size: int) -> None:
        """Raises ValueError when the targets do not reach over the shared vocabulary."""

    def check_divergence(self, name: str, divergence: Divergence) -> None:
        """Raises ValueError when these targets cannot give what the divergence is taken over."""

    @abstractmethod
    def block(self, plan: KernelPlan, student: ModelBlock, labels: torch.Tensor, rows: slice,
              grads: Gradients | None) -> torch.Tensor:
        """The metric sums of token block `rows`, ordered as METRIC_NAMES; with `grads`, the block's gradient is
        added into them."""


def check_head_rows(head: Head, vocab_size: int) -> None:
    if head.weight.shape[0] < vocab_size:
        raise ValueError(f"vocab_size {vocab_size} exceeds an output head's rows")


# ---------------------------------------------------------------------------------------------------- a live teacher
@dataclass
class LiveTargets(Targets):
    """A teacher run on the same rows: its final hidden states [N, hidden] and its frozen head (no gradient), whose
    logits are computed block by block beside the student's."""
    hidden: torch.Tensor
    head: Head
    weight: torch.Tensor = field(init=False)  # the head weight in the product dtype: one cast per call, if any
    models = 2

    def __post_init__(self):
        self.weight = self.head.weight.to(self.hidden.dtype)

    def check_vocab(self, vocab_size: int) -> None:
        check_head_rows(self.head, vocab_size)

    def block(self, plan, student, labels, rows, grads):
        teacher = ModelBlock(self.head, self.weight, self.head.bias, self.hidden[rows])
        block = student_bucket_block if plan.divergence.student_buckets else distillation_block
        return block(plan, student, teacher, labels, rows, grads)


def head_values(plan: KernelPlan, student: ModelBlock, teacher: ModelBlock) -> dict[str, torch.Tensor]:
    """The row values a divergence takes from both distributions at the teacher's most likely tokens (`on_head`), to
    start the block's row sums with; none for most divergences."""
    divergence = plan.divergence
    if divergence.on_head is None:
        return {}
    z_t, ids = top_tokens(teacher, plan.chunks, divergence.head_tokens)
    log_p = (z_t if plan.inv_tau == 1.0 else z_t * plan.inv_tau) - teacher.lse[:, None]
    log_q = log_probs_at(student, plan.chunks, ids, plan.inv_tau)
    return divergence.on_head(buckets_from_logs(log_p, log_q), plan.param)


def distillation_block(plan: KernelPlan, student: ModelBlock, teacher: ModelBlock, labels, rows: slice,
                       grads: Gradients | None) -> torch.Tensor:
    """One token block of both models: passes 1-3. Returns the block's metric sums, ordered as METRIC_NAMES.
    Its logit caches die with it, before the next block allocates its own."""
    pass1_logits(student, plan.chunks, labels, plan.inv_tau)
    pass1_logits(teacher, plan.chunks, labels, plan.inv_tau)
    sums = head_values(plan, student, teacher)
    if plan.w_source != "folded":  # pass 2
        for k, (z_s, z_t) in enumerate(zip(student.logits, teacher.logits)):
            part, w = plan.sums_fn(z_s, z_t, student.lse, teacher.lse, plan.inv_tau, plan.divergence, plan.param,
                                   grads is not None and plan.w_source == "stored")
            _accumulate(sums, part)
            if w is not None:  # the teacher's logits are spent (pass 1 kept its normalizers): its slot keeps w
                teacher.logits[k] = w
    if grads is not None:
        add_w_total(sums, plan.divergence, plan.param, plan.w_source)
    for k, (v0, v1) in enumerate(plan.chunks if grads is not None else ()):  # pass 3
        grad_z, part = plan.grad_fn(student.logits[k], teacher.logits[k], student.lse, student.lse_raw, teacher.lse,
                                    sums, plan.inv_tau, plan.divergence, plan.param, plan.ce_coef,
                                    plan.kd_grad_scale, plan.w_source)
        if part is not None:
            _accumulate(sums, part)
        push_back(grads, student, grad_z, student.logits[k], rows, v0, v1)
    if grads is not None:
        push_back_labels(grads, student, labels, rows, plan.ce_coef)
    kd = plan.divergence.value(sums, plan.param) * plan.kd_unit
    per_row = torch.stack([student.lse_raw - student.label_logit, kd, sums["p_log_p"] - sums["p_log_q"],
                           -sums["p_log_p"], -sums["q_log_q"], (student.argmax == teacher.argmax).float(),
                           teacher.lse_raw - teacher.label_logit])
    return per_row.sum(1)


# ---------------------------------------------------------------------------------------------------- no teacher
class NoTeacher(Targets):
    """No teacher (plain SFT): the loss is the student's CE alone, whatever kd_coef says."""

    def weights(self, spec: LossSpec) -> tuple[float, float]:
        return 1.0, 0.0

    def block(self, plan, student, labels, rows, grads):
        return student_block(plan, student, labels, rows, grads)


NO_TEACHER = NoTeacher()


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


# ---------------------------------------------------------------------------------------------------- a cached teacher
@dataclass
class SparseTargets(Targets):
    """A cached teacher distribution per target row, at the run's temperature: `ids` [N, k] token ids, `log_p`
    [N, k] their log-probabilities (-inf on an empty slot), `log_rest` [N] the log of the mass on every other token
    (-inf when there is none: a sampled cache, or k = V). No two non-empty slots of a row hold the same id, and an
    empty slot repeats a non-empty slot's id. The divergence is taken between the bucketed distributions
    (`bucket_block`). `kd_rows` [N] bool, where given, marks the rows that have a teacher distribution at all; the
    others get the CE term alone (a cache across tokenizers: rows with no aligned teacher token)."""
    ids: torch.Tensor
    log_p: torch.Tensor
    log_rest: torch.Tensor
    kd_rows: torch.Tensor | None = None
    models = 1 + ID_MASKS  # the student's logits and the ids' masks

    def check_divergence(self, name: str, divergence: Divergence) -> None:
        if divergence.student_buckets:
            raise ValueError(f"{name} needs the teacher's probability at the student's most likely tokens, which a "
                             "cached teacher has only where they are among its own cached ones; train it with a "
                             "live teacher")

    def __getitem__(self, rows: slice) -> SparseTargets:
        return SparseTargets(self.ids[rows], self.log_p[rows], self.log_rest[rows],
                             None if self.kd_rows is None else self.kd_rows[rows])

    def block(self, plan, student, labels, rows, grads):
        return bucket_block(plan, student, self[rows], labels, rows, grads)


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


def bucket_block(plan: KernelPlan, student: ModelBlock, cached: SparseTargets, labels, rows: slice,
                 grads: Gradients | None) -> torch.Tensor:
    """One token block against a cached teacher: D between the bucketed distributions, the k cached tokens plus one
    bucket for the rest (the student's rest is its mass off the cached ids, a masked log-sum-exp). Returns the
    block's metric sums, ordered as METRIC_NAMES.
    Only the student's head is multiplied: the teacher side is [rows, k] numbers read from disk."""
    pass1_logits(student, plan.chunks, labels, plan.inv_tau)
    places = id_places(cached.ids, plan.chunks)
    (q,), _ = mass_on_buckets((student,), places, plan.inv_tau)
    log_q_cached = q.log_at.masked_fill(cached.log_p == -math.inf, -math.inf)  # empty slots are no bucket
    b = buckets_from_logs(torch.cat([cached.log_p, cached.log_rest[:, None]], 1),
                          torch.cat([log_q_cached, q.log_rest[:, None]], 1))
    value = bucket_gradient(plan, student, places, b, labels, rows, grads, cached.kd_rows)
    is_label = cached.ids == labels[:, None]
    teacher_log_p_label = torch.where(is_label.any(1), torch.where(is_label, cached.log_p, -math.inf).amax(1),
                                      cached.log_rest)
    teacher_top = cached.ids.gather(1, cached.log_p.argmax(1, keepdim=True))[:, 0]
    per_row = torch.stack([student.lse_raw - student.label_logit, value * plan.kd_unit,
                           xlogy_sum(b.p, b.log_p - b.log_q), -xlogy_sum(b.p, b.log_p), -q.x_log_x,
                           (student.argmax == teacher_top).float(), -teacher_log_p_label])
    if cached.kd_rows is not None:  # a row without a teacher has the CE term alone
        per_row[1:].masked_fill_(~cached.kd_rows[None], 0.0)
    return per_row.sum(1)


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


def student_bucket_block(plan: KernelPlan, student: ModelBlock, teacher: ModelBlock, labels, rows: slice,
                         grads: Gradients | None) -> torch.Tensor:
    """One token block of both models for a divergence over the student's buckets (`Divergence.student_buckets`):
    the student's top k tokens (k = the divergence's parameter) and the rest, with both models' mass on each taken
    from their pass-1 logits. The metrics other than kd are the whole-vocabulary ones, as for `distillation_block`."""
    pass1_logits(student, plan.chunks, labels, plan.inv_tau)
    pass1_logits(teacher, plan.chunks, labels, plan.inv_tau)
    top, ids = top_tokens(student, plan.chunks, int(plan.param))
    places = id_places(ids, plan.chunks)
    (q, p), p_log_q = mass_on_buckets((student, teacher), places, plan.inv_tau, known_at=(top, None))
    b = buckets_from_logs(torch.cat([p.log_at, p.log_rest[:, None]], 1),
                          torch.cat([q.log_at, q.log_rest[:, None]], 1))
    value = bucket_gradient(plan, student, places, b, labels, rows, grads)
    per_row = torch.stack([student.lse_raw - student.label_logit, value * plan.kd_unit, p.x_log_x - p_log_q,
                           -p.x_log_x, -q.x_log_x, (student.argmax == teacher.argmax).float(),
                           teacher.lse_raw - teacher.label_logit])
    return per_row.sum(1)
