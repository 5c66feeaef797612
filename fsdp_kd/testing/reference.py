"""The obvious, slow ways: yardsticks for the fast code, used by the tests and the benchmarks, never by training.

- The dense distillation loss (full logits and autograd) for the chunked kernel in `loss.py`: the tests check values
  and gradients against it, and `bench/loss_bench.py` measures the kernel's time and memory against it. Likewise
  the loss against a cached teacher, on the bucketed distributions.
- The chat-template response mask by its definition (every prefix tokenized by the template) for the one-rendering
  `records.chat_token_mask`: the tests check equality on real data, `bench/data_bench.py` measures the cost.
- On-policy generation as it was before `decode`: transformers' `generate` (dynamic cache, a host sync per token) on
  one batch of prompts: the tests check `decode`'s tokens against it, `bench/generate_bench.py` times it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor

from ..kernel import Head, as_head
from ..loss import LossSpec
from ..targets import SparseTargets


def dense_logits(hidden: torch.Tensor, head: torch.Tensor | Head, vocab_size: int) -> torch.Tensor:
    """The model's logits over the shared vocabulary, as its own forward computes them: softcap(scale·(h·Wᵀ + b)).
    In fp32, or in fp64 when given fp64 inputs (an exact yardstick for the fp32 kernel)."""
    head = as_head(head)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    z = hidden.to(dtype) @ head.weight[:vocab_size].to(dtype).t()
    if head.bias is not None:
        z = z + head.bias[:vocab_size].to(dtype)
    z = z * head.scale
    if head.softcap is not None:
        z = torch.tanh(z / head.softcap) * head.softcap
    return z


def dense_distillation_loss(student_hidden, student_head, labels, spec: LossSpec, vocab_size: int,
                            teacher_hidden=None, teacher_head=None):
    """Same contract as `loss.distillation_loss`: summed loss and summed metrics, in fsdp-kd's own convention (τ²·D):
    another tool's convention is checked against that tool's formula, written out in its test."""
    _only_own_convention(spec)
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
    elif divergence == "akl":
        kd = _akl(log_p, log_q, torch.ones_like(log_p, dtype=torch.bool), spec.akl_mu)
    elif divergence == "reverse_kl_student_topk":  # KL(Q‖P) over the student's top k tokens and the rest
        top = z_s.detach().topk(min(spec.student_topk, vocab_size), dim=-1).indices
        kd = _kl(_bucketed(log_q, top), _bucketed(log_p, top))
    elif divergence == "skew_kl":  # KL(p ‖ αp + (1-α)q)
        log_m = _log_mix(log_p, log_q, spec.skew_alpha)
        kd = (p * (log_p - log_m)).sum(-1)
    elif divergence == "skew_reverse_kl":  # KL(q ‖ (1-α)p + αq)
        log_m = _log_mix(log_p, log_q, 1 - spec.skew_alpha)
        kd = (q * (log_q - log_m)).sum(-1)
    else:
        log_m = _log_mix(log_p, log_q, beta)
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


def dense_bucketed_loss(student_hidden, student_head, labels, spec: LossSpec, vocab_size: int,
                        cached: SparseTargets):
    """`loss.distillation_loss` against a cached teacher, the obvious way: the student's full log-softmax, its log
    mass on each cached token and on the rest (a log-sum-exp over every token outside the filled slots), the
    divergence between the bucketed distributions written out per divergence, autograd for the gradient. All in log
    space, so it stays finite where a probability underflows fp32 and equals the live loss at k = V at any logit
    gap. Returns (summed loss, summed kd·τ²)."""
    _only_own_convention(spec)
    tau, c = spec.temperature, spec.kd_coef
    z_s = dense_logits(student_hidden, student_head, vocab_size)
    ce = F.cross_entropy(z_s, labels, reduction="none")
    log_q_all = F.log_softmax(z_s / tau, dim=-1)
    filled = cached.log_p > -math.inf
    log_q_cached = torch.where(filled, log_q_all.gather(1, cached.ids), -math.inf)
    in_bucket = torch.zeros_like(z_s, dtype=torch.long).scatter_add(1, cached.ids, filled.long()) > 0
    has_rest = ~in_bucket.all(1, keepdim=True)
    rest_lse = torch.logsumexp(torch.where(has_rest, log_q_all.masked_fill(in_bucket, -math.inf), 0.0), dim=1)
    log_q = torch.cat([log_q_cached, torch.where(has_rest, rest_lse[:, None], -math.inf)], 1)
    log_p = torch.cat([cached.log_p, cached.log_rest[:, None]], 1)
    kd = _bucket_divergence(log_p, log_q, spec) * tau * tau
    return ((1 - c) * ce + c * kd).sum(), kd.detach().double().sum()


def _bucket_divergence(log_p: torch.Tensor, log_q: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """D between bucketed distributions [rows, B] given as log-probabilities, the last bucket the rest (-inf where a
    bucket is empty), written out per divergence."""
    beta, divergence = spec.jsd_beta, spec.effective_divergence
    if divergence == "forward_kl":
        kd = _kl(log_p, log_q)
    elif divergence == "reverse_kl":
        kd = _kl(log_q, log_p)
    elif divergence == "tvd":
        kd = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    elif divergence == "akl":  # the rest bucket is in the tail
        rankable = torch.ones_like(log_p, dtype=torch.bool)
        rankable[:, -1] = False
        kd = _akl(log_p, log_q, rankable, spec.akl_mu)
    else:
        occupied = (log_p > -math.inf) | (log_q > -math.inf)  # where m > 0; elsewhere m is never read
        log_p_m, log_q_m = torch.where(occupied, log_p, 0.0), torch.where(occupied, log_q, 0.0)
        if divergence == "skew_kl":
            kd = _kl(log_p, _log_mix(log_p_m, log_q_m, spec.skew_alpha))
        elif divergence == "skew_reverse_kl":
            kd = _kl(log_q, _log_mix(log_p_m, log_q_m, 1 - spec.skew_alpha))
        else:
            log_m = _log_mix(log_p_m, log_q_m, beta)
            kd = (beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)) / (beta * (1 - beta))
    return kd


def dense_cross_vocab_loss(student_hidden, student_head, labels, spec: LossSpec, student_vocab: int, teacher_hidden,
                           teacher_head, teacher_vocab: int, student_ids, teacher_ids, uld_weight: float,
                           uld_topk: int, aligned=None, student_joins=None, teacher_joins=None):
    """`cross_vocab.CrossVocabTargets`'s loss the obvious way: both full log-softmaxes, the shared tokens as buckets
    (with `*_joins`, [vocab] the bucket each other token joins or -1: `cross_vocab.prefix_joins`, each bucket the
    log-sum-exp of its tokens) and a rest bucket per side, the divergence between them, plus uld_weight times ULD
    over each side's uld_topk most likely tokens in no bucket (sorted), autograd for the gradient; KD only at the
    rows `aligned` marks (all when None). Returns (summed loss, summed kd)."""
    _only_own_convention(spec)
    tau, c = spec.temperature, spec.kd_coef
    z_s = dense_logits(student_hidden, student_head, student_vocab)
    ce = F.cross_entropy(z_s, labels, reduction="none")
    log_q_all = F.log_softmax(z_s / tau, dim=-1)
    log_p_all = F.log_softmax(dense_logits(teacher_hidden, teacher_head, teacher_vocab) / tau, dim=-1)
    log_q, q_unshared = shared_and_rest(log_q_all, student_ids, student_joins)
    log_p, p_unshared = shared_and_rest(log_p_all, teacher_ids, teacher_joins)
    if q_unshared.shape[1] == 0 and p_unshared.shape[1] > 0:  # the student has no rest: the teacher renormalized
        log_p = _renormalized(log_p)
    if p_unshared.shape[1] == 0 and q_unshared.shape[1] > 0:  # the teacher has none: the student renormalized
        log_q = _renormalized(log_q)
    k = min(uld_topk, max(q_unshared.shape[1], p_unshared.shape[1]))
    p_sorted, q_sorted = (F.pad(x.topk(min(k, x.shape[1]), dim=-1).values.exp(), (0, k - min(k, x.shape[1])))
                          for x in (p_unshared, q_unshared))
    kd = (_bucket_divergence(log_p, log_q, spec) + uld_weight * (p_sorted - q_sorted).abs().sum(-1)) * tau * tau
    if aligned is not None:
        kd = torch.where(aligned > 0, kd, 0.0)
    return ((1 - c) * ce + c * kd).sum(), kd.detach().double().sum()


def dense_span_kd(student_hidden, student_head, labels, spec: LossSpec, student_vocab: int, teacher_hidden,
                  teacher_head, teacher_labels, teacher_vocab: int, groups) -> torch.Tensor:
    """The span term of `span_term` the obvious way, summed over `groups` (each a list of student rows and a list of
    teacher rows, into the given hidden states and labels): both full log-softmaxes in float64, each side's
    log-probability of the group's tokens summed along them, log(1 - Q) = log(-expm1(log Q)) by its definition, the
    divergence between the two-outcome distributions, τ²; autograd for the gradient."""
    _only_own_convention(spec)
    tau = spec.temperature
    log_q = F.log_softmax(dense_logits(student_hidden, student_head, student_vocab).double() / tau, dim=-1)
    log_p = F.log_softmax(dense_logits(teacher_hidden, teacher_head, teacher_vocab).double() / tau, dim=-1)
    ell_q, ell_p = log_q.gather(1, labels[:, None])[:, 0], log_p.gather(1, teacher_labels[:, None])[:, 0]
    rows = [(ell_p[list(t_rows)].sum(), ell_q[list(s_rows)].sum()) for s_rows, t_rows in groups]
    log_span = torch.stack([torch.stack(pair) for pair in rows])  # [G, 2]: log P, log Q
    two = torch.stack([log_span, torch.log(-torch.expm1(log_span))], 2)  # [G, side, outcome]
    return (_bucket_divergence(two[:, 0], two[:, 1], spec) * tau * tau).sum().float()


def _renormalized(log_buckets: torch.Tensor) -> torch.Tensor:
    """Shared buckets renormalized over themselves, the rest bucket emptied."""
    shared = torch.log_softmax(log_buckets[:, :-1], dim=-1)
    return torch.cat([shared, torch.full_like(log_buckets[:, -1:], -math.inf)], 1)


def shared_and_rest(log_x: torch.Tensor, ids: torch.Tensor, joins=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log of each shared bucket's mass (the shared `ids`, and the tokens `joins` puts in each) then of the rest's,
    log x at every token in no bucket)."""
    bucket = torch.full((log_x.shape[1],), -1, dtype=torch.long)
    if joins is not None:
        bucket = torch.as_tensor(joins).clone()
    bucket[ids] = torch.arange(len(ids))
    others = log_x[:, bucket < 0]
    rest = (torch.logsumexp(others, dim=-1, keepdim=True) if others.shape[1] else
            torch.full_like(log_x[:, :1], -math.inf))
    if joins is None:  # a bucket per shared token: a gather (a loop over 26k buckets takes a minute)
        return torch.cat([log_x[:, ids], rest], 1), others
    buckets = [torch.logsumexp(log_x[:, bucket == j], dim=-1) for j in range(len(ids))]
    return torch.cat([torch.stack(buckets, 1) if buckets else log_x[:, :0], rest], 1), others


def _bucketed(log_x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log x at `ids`, then the log of its mass on every other token (-inf when there is none)."""
    if ids.shape[1] == log_x.shape[1]:  # no rest (a log-sum-exp over nothing would have a NaN gradient)
        rest = torch.full_like(log_x[:, :1], -math.inf)
    else:
        rest = torch.logsumexp(log_x.scatter(1, ids, -math.inf), dim=-1, keepdim=True)
    return torch.cat([log_x.gather(1, ids), rest], 1)


def _only_own_convention(spec: LossSpec) -> None:
    if spec.convention != "fsdp_kd":
        raise ValueError(f"the dense reference computes fsdp-kd's convention, not {spec.convention!r}")


def _akl(log_p: torch.Tensor, log_q: torch.Tensor, rankable: torch.Tensor, mu: float) -> torch.Tensor:
    """Adaptive KL as Wu et al.'s code computes it: the teacher's tokens (those `rankable`) sorted most likely first,
    the head those whose cumulative mass is at most μ, and always the first; g_head and g_tail the sums of |p - q|
    over the head and the rest (no gradient); g_head/(g_head + g_tail)·KL(p‖q) + g_tail/(g_head + g_tail)·KL(q‖p)."""
    sorted_log_p, order = torch.where(rankable, log_p, -math.inf).sort(dim=-1, descending=True)
    head_sorted = sorted_log_p.exp().cumsum(-1) <= mu
    head_sorted[:, 0] = True
    head = torch.zeros_like(head_sorted).scatter(1, order, head_sorted) & rankable
    gap = (log_p.exp() - log_q.exp()).abs().detach()
    total = gap.sum(-1)  # 0 where the two agree (both KLs 0 there): the share is then 0, not 0/0
    share = torch.where(total > 0, torch.where(head, gap, 0.0).sum(-1) / total.clamp_min(1e-30), 0.0)
    return share * _kl(log_p, log_q) + (1 - share) * _kl(log_q, log_p)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p·p + (1 - weight_p)·q), exact at any gap (a weight of 0 drops its side)."""
    if weight_p == 0:
        return log_q
    if weight_p == 1:
        return log_p
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def _kl(log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """Σ x·(log x - log y) per row from log x and log y, with 0·log 0 = 0; an empty bucket (log x = -inf) is kept
    out of the arithmetic, so it adds 0 to the value and to the gradient, not NaN."""
    present = log_x > -math.inf
    log_x, log_y = torch.where(present, log_x, 0.0), torch.where(present, log_y, 0.0)
    return torch.where(present, log_x.exp() * (log_x - log_y), 0.0).sum(-1)


def prefix_chat_token_mask(messages: list[dict], tokenizer, all_assistant_turns: bool) -> tuple[list[int], list[bool]]:
    """(ids, trainable) by the mask's definition: an assistant turn's tokens are those the tokenized rendering up to
    and including it adds after the tokenized rendering of everything before it with the generation prompt, as far
    as they agree with the whole conversation's tokens. 2k + 1 tokenizations of growing prefixes for k turns."""
    def render(msgs, generation_prompt=False):
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation_prompt)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    full = render(messages)
    trainable = [False] * len(full)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns if all_assistant_turns else turns[-1:]:
        start = len(render(messages[:i], generation_prompt=True))
        upto = render(messages[:i + 1])
        if full[:start] != upto[:start]:
            raise ValueError(f"turn {i} renders differently inside the whole conversation")
        end = start
        while end < min(len(upto), len(full)) and upto[end] == full[end]:
            end += 1
        trainable[start:end] = [True] * (end - start)
    return full, trainable


class NoPaddedRows(LogitsProcessor):
    """A logits processor for `generate` that gives no probability to the output head's rows at or past the
    tokenizer's length (as `decode.next_tokens` does): run before temperature and top-p, so the nucleus is taken
    over tokens only."""

    def __init__(self, vocab_size: int | None):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.vocab_size is not None:
            scores[:, self.vocab_size:] = -math.inf
        return scores


def hf_generate(lm, prompts: list[list[int]], settings, seed: int, new_tokens: int | None = None) -> list[list[int]]:
    """Responses to `prompts` (one left-padded batch) from transformers' `generate` with the global generator
    seeded with `seed`, sampled as `on_policy.GenerationSettings` says (plain temperature and top-p: no top-k, no
    penalties, whatever the model's generation_config.json says), each cut after its first stop token."""
    from transformers import GenerationConfig, LogitsProcessorList

    from ..on_policy import cut_at_stop

    width = max(map(len, prompts))
    ids = torch.tensor([[settings.pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    sample = settings.temperature > 0
    config = GenerationConfig(max_new_tokens=new_tokens or settings.max_new_tokens, do_sample=sample,
                              temperature=settings.temperature if sample else None,
                              top_p=settings.top_p if sample else None, top_k=0 if sample else None,
                              eos_token_id=list(settings.stop_ids), pad_token_id=settings.pad_id, use_cache=True)
    device = next(lm.parameters()).device
    torch.manual_seed(seed)
    out = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                      logits_processor=LogitsProcessorList([NoPaddedRows(settings.vocab_size)]))
    return [cut_at_stop(row, settings.stop_ids) for row in out[:, width:].tolist()]
