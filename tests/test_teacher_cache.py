"""The teacher cache's math: the teacher side (top-k with a rest bucket, sampled draws) and the loss on buckets,
against the dense reference and against the live teacher."""

import math

import pytest
import torch

from fsdp_kd.loss import DIVERGENCES, LossSpec, ModelBlock, SparseTargets, distillation_loss, Head
from fsdp_kd.profiling import profile_launches
from fsdp_kd.reference import dense_bucketed_loss, dense_logits
from fsdp_kd.teacher_cache import decode_ids, encode_ids, id_bytes, teacher_samples, teacher_topk

N, HS, HT, V = 23, 12, 20, 97
CHUNKS = [(0, 40), (40, 80), (80, 97)]


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(N, HS, generator=g).requires_grad_()
    w_s = (torch.randn(V, HS, generator=g) * 0.5).requires_grad_()
    h_t = torch.randn(N, HT, generator=g)
    w_t = torch.randn(V, HT, generator=g) * 0.6
    labels = torch.randint(0, V, (N,), generator=g)
    return h_s, w_s, h_t, w_t, labels


def topk_of(h_t, w_t, k, tau=1.0):
    block = ModelBlock(Head(w_t), w_t, None, h_t)
    return teacher_topk(block, CHUNKS, k, 1.0 / tau)


def assert_close(a, b, rtol=1e-5):
    scale = max(float(b.abs().max()), 1e-12)
    assert float((a.double() - b.double()).abs().max()) <= rtol * scale, (a, b)


def test_topk_is_the_teachers_top_k_and_its_rest():
    h_s, w_s, h_t, w_t, labels = inputs()
    for tau in (1.0, 2.0):
        cached = topk_of(h_t, w_t, 7, tau)
        log_p = torch.log_softmax(dense_logits(h_t, w_t, V) / tau, dim=1)
        top = log_p.topk(7, dim=1)
        assert torch.equal(cached.ids, top.indices)
        assert_close(cached.log_p, top.values)
        rest = 1 - top.values.exp().sum(1)
        assert_close(cached.log_rest.exp(), rest)
    everything = topk_of(h_t, w_t, V)
    assert torch.all(everything.log_rest == -math.inf)
    assert_close(everything.log_p.exp().sum(1), torch.ones(N))


@pytest.mark.parametrize("divergence,tau,beta", [("forward_kl", 1.0, 0.5), ("forward_kl", 2.0, 0.5),
                                                 ("reverse_kl", 1.0, 0.5), ("jsd", 1.5, 0.3), ("jsd", 1.0, 0.0),
                                                 ("tvd", 1.0, 0.5)])
def test_bucketed_loss_matches_the_dense_reference(divergence, tau, beta):
    h_s, w_s, h_t, w_t, labels = inputs()
    cached = topk_of(h_t, w_t, 5, tau)
    spec = LossSpec(kd_coef=0.6, divergence=divergence, jsd_beta=beta, temperature=tau, vocab_chunk=13, token_chunk=6)
    loss, metrics = distillation_loss(h_s, w_s, labels, spec, V, cached_teacher=cached)
    grads = torch.autograd.grad(loss, (h_s, w_s))
    ref_loss, ref_kd = dense_bucketed_loss(h_s, w_s, labels, spec, V, cached)
    ref_grads = torch.autograd.grad(ref_loss, (h_s, w_s))
    assert_close(loss.detach(), ref_loss.detach())
    assert math.isclose(float(metrics["kd"]), float(ref_kd), rel_tol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)


@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_k_equal_to_the_vocabulary_is_the_live_teacher(divergence):
    """Every token cached, no rest: loss, gradients and metrics equal a live teacher's to 1e-5."""
    h_s, w_s, h_t, w_t, labels = inputs(1)
    spec = LossSpec(kd_coef=0.6, divergence=divergence, temperature=1.5, vocab_chunk=13, token_chunk=6)
    cached = topk_of(h_t, w_t, V, 1.5)
    loss, metrics = distillation_loss(h_s, w_s, labels, spec, V, cached_teacher=cached)
    live_loss, live_metrics = distillation_loss(h_s, w_s, labels, spec, V, h_t, w_t)
    assert_close(loss.detach(), live_loss.detach())
    for g, r in zip(torch.autograd.grad(loss, (h_s, w_s)), torch.autograd.grad(live_loss, (h_s, w_s))):
        assert_close(g, r)
    for name in ("kd", "kl", "teacher_entropy", "student_entropy", "top1_agreement"):
        assert math.isclose(float(metrics[name]), float(live_metrics[name]), rel_tol=1e-5, abs_tol=1e-5), name


def test_the_demos_top_k_plus_rest_kl_is_what_a_top_k_cache_trains_on():
    """The demo's "top-8 + rest" column (`demo.bucketed`, on dense log-probs) is the kernel's KL on a k = 8 cache, and
    a lower bound of the full KL: the part a top-k cache can teach."""
    from torch.nn.functional import kl_div

    from fsdp_kd.demo import bucketed

    h_s, w_s, h_t, w_t, labels = inputs(2)
    spec = LossSpec(kd_coef=1.0, divergence="forward_kl", vocab_chunk=13, token_chunk=6)
    with torch.no_grad():
        _, metrics = distillation_loss(h_s, w_s, labels, spec, V, cached_teacher=topk_of(h_t, w_t, 8))
        log_p = torch.log_softmax(dense_logits(h_t, w_t, V).double(), dim=1)
        log_q = torch.log_softmax(dense_logits(h_s, w_s, V).double(), dim=1)
    top = log_p.topk(8, dim=1).indices
    on_buckets = float(kl_div(bucketed(log_q, top), bucketed(log_p, top), reduction="sum", log_target=True))
    assert math.isclose(on_buckets, float(metrics["kl"]), rel_tol=1e-5)
    assert on_buckets < float(kl_div(log_q, log_p, reduction="sum", log_target=True))


def test_samples_are_distinct_ids_with_counts_drawn_from_p():
    h_s, w_s, h_t, w_t, labels = inputs()
    block = lambda: ModelBlock(Head(w_t), w_t, None, h_t)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    total = torch.zeros(N, V)
    for _ in range(200):
        ids, counts = teacher_samples(block(), CHUNKS, 32, 1.0, g)
        assert torch.all(counts.sum(1) == 32)
        first = counts > 0
        for row in range(3):
            assert len(set(ids[row][first[row]].tolist())) == int(first[row].sum())  # distinct where counted
        total.scatter_add_(1, ids, counts.float())
    p = torch.softmax(dense_logits(h_t, w_t, V), dim=1)
    estimate = total / (200 * 32)
    assert float((estimate - p).abs().max()) < 5 * math.sqrt(0.25 / (200 * 32))


def _sampled_targets(h_t, w_t, n, g):
    ids, counts = teacher_samples(ModelBlock(Head(w_t), w_t, None, h_t), CHUNKS, n, 1.0, g)
    return SparseTargets(ids, torch.log(counts.float() / n), torch.full((N,), -math.inf))


def test_sampled_gradient_is_unbiased_and_its_error_shrinks_as_one_over_root_n():
    """Forward KL with p̂ = counts/n: the mean of the sampled gradients over seeds tends to the live gradient, and
    with the same number of seeds the error at n = 64 is about a quarter of that at n = 4 (1/√16)."""
    h_s, w_s, h_t, w_t, labels = inputs(2)
    spec = LossSpec(kd_coef=1.0, divergence="forward_kl", vocab_chunk=40, token_chunk=N)
    live = torch.autograd.grad(distillation_loss(h_s, w_s, labels, spec, V, h_t, w_t)[0], w_s)[0]
    errors = {}
    for n in (4, 64):
        g = torch.Generator().manual_seed(n)
        mean = torch.zeros_like(live)
        seeds = 100
        for _ in range(seeds):
            cached = _sampled_targets(h_t, w_t, n, g)
            mean += torch.autograd.grad(distillation_loss(h_s, w_s, labels, spec, V, cached_teacher=cached)[0], w_s)[0]
        errors[n] = float((mean / seeds - live).norm() / live.norm())
    assert errors[64] < 0.45 * errors[4], errors
    assert errors[64] < 0.05, errors


def test_ids_take_the_fewest_bytes():
    assert [id_bytes(v) for v in (97, 256, 257, 32000, 65536, 151936, 2**24 + 1)] == [1, 1, 2, 2, 2, 3, 4]
    ids = torch.tensor([[0, 5, 151935], [65535, 65536, 1]])
    assert torch.equal(decode_ids(encode_ids(ids, 3)), ids)


def test_the_bucketed_loss_has_no_host_syncs():
    h_s, w_s, h_t, w_t, labels = inputs()
    cached = topk_of(h_t, w_t, 8)
    spec = LossSpec(kd_coef=0.5, divergence="reverse_kl", vocab_chunk=40, token_chunk=N)

    def call():
        loss, _ = distillation_loss(h_s, w_s, labels, spec, V, cached_teacher=cached)
        loss.backward()

    _, profile = profile_launches(call)
    assert profile.host_syncs == 0, profile.by_name
    assert profile.matmuls == 3 * len(range(0, V, 40))  # per chunk the student's logits and two gradient products
