"""The loss against a teacher of another vocabulary (`fsdp_kd/cross_vocab.py`) against the dense reference, and
against today's live KD when the vocabulary is the same."""

import math

import pytest
import torch

from fsdp_kd.cross_vocab import CrossVocabTargets, VocabMap
from fsdp_kd.kernel import Head, LiveTargets
from fsdp_kd.loss import LossSpec, loss_against
from fsdp_kd.reference import dense_cross_vocab_loss
from test_loss import assert_close, spec_with

N, HS, HT, VS, VT = 23, 12, 20, 97, 83


def inputs(seed=0, vs=VS, vt=VT, shared=40):
    """Random heads and hidden states for both models, and `shared` random pairs of ids that "spell the same"."""
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(N, HS, generator=g).requires_grad_()
    w_s = (torch.randn(vs, HS, generator=g) * 0.5).requires_grad_()
    h_t = torch.randn(N, HT, generator=g)
    w_t = torch.randn(vt, HT, generator=g) * 0.6
    labels, t_labels = torch.randint(0, vs, (N,), generator=g), torch.randint(0, vt, (N,), generator=g)
    s_ids = torch.randperm(vs, generator=g)[:shared]
    t_ids = torch.randperm(vt, generator=g)[:shared]
    return h_s, w_s, h_t, w_t, labels, t_labels, s_ids, t_ids


def kernel_loss(spec, h_s, w_s, h_t, w_t, labels, t_labels, s_ids, t_ids, uld_weight=0.5, uld_topk=7):
    vmap = VocabMap(s_ids, t_ids, w_s.shape[0], w_t.shape[0])
    targets = CrossVocabTargets(h_t, Head(w_t), t_labels, vmap, uld_weight, uld_topk)
    return loss_against(h_s, w_s, labels, spec, w_s.shape[0], targets)


@pytest.mark.parametrize("divergence,tau,param", [("forward_kl", 1.0, 0), ("forward_kl", 2.0, 0),
                                                  ("reverse_kl", 1.0, 0), ("jsd", 0.5, 0.3), ("tvd", 1.0, 0),
                                                  ("skew_kl", 1.0, 0.1), ("akl", 1.0, 0.5)])
@pytest.mark.parametrize("uld_topk", [7, 200])  # a top-k of the unshared tokens, and all of them (the full sort)
def test_matches_the_dense_reference(divergence, tau, param, uld_topk):
    args = inputs()
    spec = spec_with(divergence, param, kd_coef=0.7, temperature=tau, vocab_chunk=13, token_chunk=6)
    loss, metrics = kernel_loss(spec, *args, uld_topk=uld_topk)
    ref_loss, ref_kd = dense_cross_vocab_loss(args[0], args[1], args[4], spec, VS, args[2], args[3], VT, args[6],
                                              args[7], 0.5, uld_topk)
    assert_close(loss.detach(), ref_loss.detach())
    assert math.isclose(float(metrics["kd"]), float(ref_kd), rel_tol=1e-5)
    for g, r in zip(torch.autograd.grad(loss, args[:2]), torch.autograd.grad(ref_loss, args[:2])):
        assert_close(g, r)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "akl"])
def test_the_same_vocabulary_is_todays_live_kd(divergence):
    """Every token shared with itself: no rest, no ULD part; loss, gradients and metrics equal the live teacher's."""
    h_s, w_s, h_t, w_t, labels, _, _, _ = inputs(1, vt=VS)
    spec = LossSpec(kd_coef=0.6, divergence=divergence, temperature=1.5, vocab_chunk=13, token_chunk=6)
    identity = torch.arange(VS)
    loss, metrics = kernel_loss(spec, h_s, w_s, h_t, w_t, labels, labels, identity, identity)
    live_loss, live_metrics = loss_against(h_s, w_s, labels, spec, VS, LiveTargets(h_t, Head(w_t)))
    assert_close(loss.detach(), live_loss.detach(), rtol=2e-6)
    for g, r in zip(torch.autograd.grad(loss, (h_s, w_s)), torch.autograd.grad(live_loss, (h_s, w_s))):
        assert_close(g, r)
    for name in live_metrics:
        assert math.isclose(float(metrics[name]), float(live_metrics[name]), rel_tol=1e-5, abs_tol=1e-5), name


def test_nothing_shared_is_the_rest_buckets_and_uld_alone():
    """With no shared token each side is one rest bucket holding all its mass, so D is 0 and only ULD teaches: the
    kernel equals the dense reference there too, and without ULD the KD term is 0."""
    h_s, w_s, h_t, w_t, labels, t_labels, _, _ = inputs(2)
    none = torch.zeros(0, dtype=torch.long)
    spec = LossSpec(kd_coef=1.0, divergence="forward_kl", vocab_chunk=13, token_chunk=6)
    loss, metrics = kernel_loss(spec, h_s, w_s, h_t, w_t, labels, t_labels, none, none, uld_weight=1.0)
    ref_loss, _ = dense_cross_vocab_loss(h_s, w_s, labels, spec, VS, h_t, w_t, VT, none, none, 1.0, 7)
    assert_close(loss.detach(), ref_loss.detach())
    for g, r in zip(torch.autograd.grad(loss, (h_s, w_s)), torch.autograd.grad(ref_loss, (h_s, w_s))):
        assert_close(g, r)
    _, without = kernel_loss(spec, h_s, w_s, h_t, w_t, labels, t_labels, none, none, uld_weight=0.0)
    assert abs(float(without["kd"])) < 1e-6 and float(metrics["kd"]) > 0.1


def test_a_divergence_over_the_students_top_tokens_is_refused():
    args = inputs()
    with pytest.raises(ValueError, match="no counterpart in another vocabulary"):
        kernel_loss(LossSpec(kd_coef=0.5, divergence="reverse_kl_student_topk"), *args)


def test_a_map_with_a_repeated_id_is_refused():
    h_s, w_s, h_t, w_t, labels, t_labels, _, _ = inputs()
    with pytest.raises(ValueError, match="distinct ids"):
        kernel_loss(LossSpec(kd_coef=0.5), h_s, w_s, h_t, w_t, labels, t_labels, torch.tensor([3, 3]),
                    torch.tensor([1, 2]))
