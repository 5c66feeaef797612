"""The loss against a teacher of another vocabulary (`fsdp_kd/cross_vocab.py`) against the dense reference, and
against today's live KD when the vocabulary is the same."""

import math

import pytest
import torch

from fsdp_kd.cross_vocab import CrossVocabTargets, VocabMap, prefix_joins, topk_in_student_vocabulary
from fsdp_kd.data import Spans
from fsdp_kd.kernel import Head
from fsdp_kd.targets import LiveTargets, SparseTargets
from fsdp_kd.loss import LossSpec, loss_against
from fsdp_kd.testing.reference import dense_cross_vocab_loss, dense_span_kd
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


def kernel_loss(spec, h_s, w_s, h_t, w_t, labels, t_labels, s_ids, t_ids, uld_weight=0.5, uld_topk=7, aligned=None,
                spans=None, joins=(None, None)):
    vmap = VocabMap(s_ids, t_ids, w_s.shape[0], w_t.shape[0], *joins)
    targets = CrossVocabTargets(h_t, Head(w_t), t_labels, vmap, uld_weight, uld_topk, aligned, spans)
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


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "akl"])
def test_rows_without_an_aligned_token_train_on_ce_alone(divergence):
    """`aligned` 0 on some rows (a token in a multi-token group): their KD and KD metrics are 0, CE stays, and the
    gradient equals the dense reference's with KD masked there. The teacher rows given there are extreme, which
    must not leak through (the kernel masks, it does not multiply)."""
    h_s, w_s, h_t, w_t, labels, t_labels, s_ids, t_ids = inputs(3)
    aligned = (torch.arange(N) % 3 != 1).float()
    h_t = torch.where(aligned[:, None] > 0, h_t, 1e4)
    spec = LossSpec(kd_coef=0.7, divergence=divergence, temperature=1.0, vocab_chunk=13, token_chunk=6)
    loss, metrics = kernel_loss(spec, h_s, w_s, h_t, w_t, labels, t_labels, s_ids, t_ids, aligned=aligned)
    ref_loss, ref_kd = dense_cross_vocab_loss(h_s, w_s, labels, spec, VS, h_t, w_t, VT, s_ids, t_ids, 0.5, 7,
                                              aligned=aligned)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert_close(loss.detach(), ref_loss.detach())
    assert math.isclose(float(metrics["kd"]), float(ref_kd), rel_tol=1e-5)
    for g, r in zip(torch.autograd.grad(loss, (h_s, w_s)), torch.autograd.grad(ref_loss, (h_s, w_s))):
        assert_close(g, r)
    _, only_aligned = kernel_loss(spec, h_s[aligned > 0], w_s, h_t[aligned > 0], w_t, labels[aligned > 0],
                                  t_labels[aligned > 0], s_ids, t_ids)
    for name in ("kd", "kl", "teacher_entropy", "student_entropy", "top1_agreement", "teacher_ce"):
        assert math.isclose(float(metrics[name]), float(only_aligned[name]), rel_tol=1e-5, abs_tol=1e-6), name


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


@pytest.mark.parametrize("divergence", ["forward_kl", "akl"])
def test_nothing_shared_is_the_rest_buckets_and_uld_alone(divergence):
    """With no shared token each side is one rest bucket holding all its mass, so D is 0 and only ULD teaches: the
    kernel equals the dense reference there too, and without ULD the KD term is 0. AKL's head over no shared token
    is empty (it used to raise IndexError)."""
    h_s, w_s, h_t, w_t, labels, t_labels, _, _ = inputs(2)
    none = torch.zeros(0, dtype=torch.long)
    spec = LossSpec(kd_coef=1.0, divergence=divergence, vocab_chunk=13, token_chunk=6)
    loss, metrics = kernel_loss(spec, h_s, w_s, h_t, w_t, labels, t_labels, none, none, uld_weight=1.0)
    ref_loss, _ = dense_cross_vocab_loss(h_s, w_s, labels, spec, VS, h_t, w_t, VT, none, none, 1.0, 7)
    assert_close(loss.detach(), ref_loss.detach())
    for g, r in zip(torch.autograd.grad(loss, (h_s, w_s)), torch.autograd.grad(ref_loss, (h_s, w_s))):
        assert_close(g, r)
    _, without = kernel_loss(spec, h_s, w_s, h_t, w_t, labels, t_labels, none, none, uld_weight=0.0)
    # 0 up to float32 rounding: each token's rest bucket is log Z - log Z of its whole vocabulary, a few ulps of
    # |log Z| ~ 4 (about 5e-7 each), summed over the tokens (1.4e-6 on this CPU's kernels)
    assert abs(float(without["kd"])) < 1e-6 * N and float(metrics["kd"]) > 0.1


def test_a_divergence_over_the_students_top_tokens_is_refused():
    args = inputs()
    with pytest.raises(ValueError, match="no counterpart in another vocabulary"):
        kernel_loss(LossSpec(kd_coef=0.5, divergence="reverse_kl_student_topk"), *args)


def test_a_map_with_a_repeated_id_is_refused():
    h_s, w_s, h_t, w_t, labels, t_labels, _, _ = inputs()
    with pytest.raises(ValueError, match="distinct ids"):
        kernel_loss(LossSpec(kd_coef=0.5), h_s, w_s, h_t, w_t, labels, t_labels, torch.tensor([3, 3]),
                    torch.tensor([1, 2]))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_a_full_top_k_in_the_students_vocabulary_is_the_exact_part(divergence):
    """What a cache across tokenizers stores (`topk_in_student_vocabulary`) at k = V_t equals the live cross loss
    without ULD: the shared tokens each a bucket, everything else the rest, rows without an aligned token CE
    alone. Loss, gradients and KD metrics."""
    h_s, w_s, h_t, w_t, labels, t_labels, s_ids, t_ids = inputs(4)
    aligned = (torch.arange(N) % 4 != 2).float()
    spec = LossSpec(kd_coef=0.7, divergence=divergence, temperature=1.0, vocab_chunk=13, token_chunk=6)
    live, live_metrics = kernel_loss(spec, h_s, w_s, h_t, w_t, labels, t_labels, s_ids, t_ids, uld_weight=0.0,
                                     aligned=aligned)
    log_p = torch.log_softmax(h_t @ w_t.T, -1)
    top, ids = log_p.topk(VT, dim=1)
    vmap = VocabMap(s_ids, t_ids, VS, VT)
    stored = topk_in_student_vocabulary(ids, top, torch.full((N,), -math.inf), aligned, vmap)
    assert bool((stored[1][aligned == 0] == -math.inf).all()) and bool((stored[2][aligned == 0] == -math.inf).all())
    kd_rows = (stored[2] > -math.inf) | (stored[1].amax(1) > -math.inf)
    assert torch.equal(kd_rows, aligned > 0)
    cached, metrics = loss_against(h_s, w_s, labels, spec, VS, SparseTargets(*stored, kd_rows=kd_rows))
    assert_close(cached.detach(), live.detach(), rtol=1e-5)
    for g, r in zip(torch.autograd.grad(cached, (h_s, w_s)), torch.autograd.grad(live, (h_s, w_s))):
        assert_close(g, r, rtol=1e-4)
    for name in ("kd", "kl"):
        assert math.isclose(float(metrics[name]), float(live_metrics[name]), rel_tol=1e-4), name


def test_a_top_k_in_the_students_vocabulary_folds_the_unshared_tokens_into_the_rest():
    """By hand: teacher ids 0..3 with student ids 5, -, 7, - (1 and 3 unshared); k = 3 keeps ids 2, 1, 0."""
    vmap = VocabMap(torch.tensor([5, 7]), torch.tensor([0, 2]), 9, 4)
    log_p = torch.log(torch.tensor([[0.4, 0.3, 0.2], [0.5, 0.3, 0.1]]))
    ids = torch.tensor([[2, 1, 0], [1, 3, 0]])
    rest = torch.log(torch.tensor([0.1, 0.1]))
    out_ids, out_log_p, out_rest = topk_in_student_vocabulary(ids, log_p, rest, torch.tensor([1.0, 0.0]), vmap)
    assert out_ids[0].tolist() == [7, 7, 5]  # the empty slot repeats a non-empty id
    assert torch.allclose(out_log_p[0].exp(), torch.tensor([0.4, 0.0, 0.2]))
    assert math.isclose(float(out_rest[0].exp()), 0.4, rel_tol=1e-6)  # 0.3 unshared + the 0.1 beyond the top-k
    assert bool((out_log_p[1] == -math.inf).all()) and float(out_rest[1]) == -math.inf  # not aligned: nothing


@pytest.mark.parametrize("all_shared", ["student", "teacher"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "akl", "tvd", "skew_reverse_kl"])
def test_a_vocabulary_that_is_all_shared_renormalizes_the_other_side(all_shared, divergence):
    """When every token of one side is shared, that side has no rest bucket, and the other side's rest mass would
    have no counterpart (forward KL infinite when it is the teacher's, reverse KL when it is the student's). The
    other side is then compared over the shared tokens alone, renormalized: finite for every divergence, and equal
    to the dense reference in value and gradient, with unaligned rows too."""
    vs, vt = (40, 83) if all_shared == "student" else (97, 40)
    h_s, w_s, h_t, w_t, labels, t_labels, _, _ = inputs(5, vs=vs, vt=vt)
    g = torch.Generator().manual_seed(6)
    s_ids = torch.randperm(vs, generator=g)[:40]
    t_ids = torch.randperm(vt, generator=g)[:40]
    aligned = (torch.arange(N) % 5 != 3).float()
    spec = LossSpec(kd_coef=0.8, divergence=divergence, temperature=1.5, vocab_chunk=13, token_chunk=6)
    loss, metrics = kernel_loss(spec, h_s, w_s, h_t, w_t, labels, t_labels, s_ids, t_ids, aligned=aligned)
    ref_loss, ref_kd = dense_cross_vocab_loss(h_s, w_s, labels, spec, vs, h_t, w_t, vt, s_ids, t_ids, 0.5, 7,
                                              aligned=aligned)
    assert torch.isfinite(loss) and torch.isfinite(ref_loss)
    assert_close(loss.detach(), ref_loss.detach())
    assert math.isclose(float(metrics["kd"]), float(ref_kd), rel_tol=1e-5)
    grads = torch.autograd.grad(loss, (h_s, w_s))
    for g_kernel, g_ref in zip(grads, torch.autograd.grad(ref_loss, (h_s, w_s))):
        assert torch.isfinite(g_kernel).all()
        assert_close(g_kernel, g_ref)


def test_a_cached_row_without_a_teacher_has_a_finite_gradient_when_its_ids_cover_the_student():
    """A cache across tokenizers keeps the ids of its rows without a teacher; if those cover the student's whole
    vocabulary, the student has no mass outside them, and the bucket gradient's Σw / ΣQ was 0/0 there."""
    vs = 6
    g = torch.Generator().manual_seed(7)
    h_s = torch.randn(4, 5, generator=g).requires_grad_()
    w_s = torch.randn(vs, 5, generator=g).requires_grad_()
    ids = torch.arange(vs).repeat(4, 1)
    log_p = torch.log_softmax(torch.randn(4, vs, generator=g), -1)
    kd_rows = torch.tensor([True, False, True, False])
    log_p[~kd_rows] = -math.inf
    log_rest = torch.full((4,), -math.inf)
    spec = LossSpec(kd_coef=0.7, divergence="reverse_kl", vocab_chunk=4)
    loss, _ = loss_against(h_s, w_s, torch.zeros(4, dtype=torch.long), spec, vs,
                           SparseTargets(ids, log_p, log_rest, kd_rows=kd_rows))
    assert torch.isfinite(loss)
    assert all(torch.isfinite(grad).all() for grad in torch.autograd.grad(loss, (h_s, w_s)))


def test_aligned_metrics_are_means_over_the_aligned_rows():
    """A student equal to its teacher (same vocabulary, same hidden states) with 2/3 of its rows aligned: the KD
    metrics read as over the aligned rows (top-1 agreement 1, KL 0), the aligned count is logged, and
    kd_token_share is the aligned share; CE stays per trained token."""
    from fsdp_kd.step_metrics import reduce_sums, summed
    from fsdp_kd.cross_vocab import ALIGNED_METRIC_NAMES

    h_s, w_s, _, _, labels, _, _, _ = inputs(4)
    aligned = (torch.arange(N) % 3 != 1).float()
    identity = torch.arange(VS)
    with torch.no_grad():
        loss, metrics = kernel_loss(LossSpec(kd_coef=0.5, vocab_chunk=13, token_chunk=6), h_s, w_s, h_s, w_s,
                                    labels, labels, identity, identity, aligned=aligned)
    out, _ = reduce_sums(summed(loss, metrics), ALIGNED_METRIC_NAMES)
    assert out["top1_agreement_aligned"] == 1.0
    assert abs(out["kl_shared_buckets"]) < 1e-6
    assert out["kd_tokens"] == float(aligned.sum()) and out["tokens"] == N
    assert out["kd_token_share"] == pytest.approx(float(aligned.sum()) / N)
    assert out["ce"] == pytest.approx(float(metrics["ce"]) / N)


def test_kd_token_share_is_one_for_a_live_teacher_and_zero_without_one():
    from fsdp_kd.step_metrics import reduce_sums, summed
    from fsdp_kd.targets import NO_TEACHER

    h_s, w_s, h_t, w_t, labels, _, _, _ = inputs(5, vt=VS)
    spec = LossSpec(kd_coef=0.5, vocab_chunk=13, token_chunk=6)
    with torch.no_grad():
        live = reduce_sums(summed(*loss_against(h_s, w_s, labels, spec, VS, LiveTargets(h_t, Head(w_t)))), {})[0]
        none = reduce_sums(summed(*loss_against(h_s, w_s, labels, spec, VS, NO_TEACHER)), {})[0]
    assert live["kd_token_share"] == 1.0 and live["kd_tokens"] == N
    assert none["kd_token_share"] == 0.0 and none["kd_tokens"] == 0.0


# groups of several tokens: (the student's rows, the teacher's count) over N = 23 rows; the third crosses the block cut
# at row 12 of token_chunk 6, the last ends the call
GROUPS = [([2, 3], 1), ([7], 3), ([10, 11, 12], 2), ([15], 1), ([20, 21, 22], 1)]


def span_inputs(seed: int, groups=GROUPS):
    """`inputs` with the teacher's span rows after its N aligned ones, and the groups' layout: rows in a group, and
    every third row, are not aligned one to one."""
    h_s, w_s, h_t, w_t, labels, t_labels, s_ids, t_ids = inputs(seed)
    g = torch.Generator().manual_seed(seed + 100)
    m = sum(count for _, count in groups)
    h_t = torch.cat([h_t, torch.randn(m, HT, generator=g)])
    t_labels = torch.cat([t_labels, torch.randint(0, VT, (m,), generator=g)])
    aligned = (torch.arange(N) % 3 != 1).float()
    for rows, _ in groups:
        aligned[rows] = 0.0
    spans = Spans.of([rows[0] for rows, _ in groups], [len(rows) for rows, _ in groups], [c for _, c in groups])
    t_rows, at = [], N
    for _, count in groups:
        t_rows.append(list(range(at, at + count)))
        at += count
    return (h_s, w_s, h_t, w_t, labels, t_labels, s_ids, t_ids), aligned, spans, [
        (rows, t) for (rows, _), t in zip(groups, t_rows)]


def span_reference(spec, args, aligned, groups):
    h_s, w_s, h_t, w_t, labels, t_labels, s_ids, t_ids = args
    bucket_loss, bucket_kd = dense_cross_vocab_loss(h_s, w_s, labels, spec, VS, h_t[:N], w_t, VT, s_ids, t_ids, 0.5,
                                                    7, aligned=aligned)
    span_kd = dense_span_kd(h_s, w_s, labels, spec, VS, h_t, w_t, t_labels, VT, groups)
    return bucket_loss + spec.kd_coef * span_kd, float(bucket_kd) + float(span_kd.detach())


@pytest.mark.parametrize("divergence,tau,param", [("forward_kl", 1.0, 0), ("forward_kl", 2.0, 0),
                                                  ("reverse_kl", 1.0, 0), ("jsd", 0.5, 0.3), ("tvd", 1.0, 0),
                                                  ("skew_kl", 1.0, 0.1), ("skew_reverse_kl", 1.0, 0.1),
                                                  ("akl", 1.0, 0.5)])
def test_groups_of_several_tokens_match_the_dense_span_reference(divergence, tau, param):
    """The span term (each side's chain-rule probability of a group's text, the divergence between the two
    two-outcome distributions, once per group) beside the one-to-one rows' bucket term: loss, KD sum and gradients
    equal the dense reference's, with a group across a block cut and one at the end of the call."""
    args, aligned, spans, groups = span_inputs(8)
    spec = spec_with(divergence, param, kd_coef=0.7, temperature=tau, vocab_chunk=13, token_chunk=6)
    loss, metrics = kernel_loss(spec, *args, aligned=aligned, spans=spans)
    ref_loss, ref_kd = span_reference(spec, args, aligned, groups)
    assert_close(loss.detach(), ref_loss.detach())
    assert math.isclose(float(metrics["kd"]), ref_kd, rel_tol=1e-5)
    for g, r in zip(torch.autograd.grad(loss, args[:2]), torch.autograd.grad(ref_loss, args[:2])):
        assert_close(g, r)


def test_the_span_term_is_what_the_groups_add():
    """Without its span rows the same call is the bucket term alone: the groups add their D and nothing else, and
    the block cuts they move change nothing else."""
    args, aligned, spans, groups = span_inputs(9)
    spec = LossSpec(kd_coef=0.6, divergence="forward_kl", vocab_chunk=13, token_chunk=6)
    _, with_spans = kernel_loss(spec, *args, aligned=aligned, spans=spans)
    h_s, w_s, h_t, w_t, labels, t_labels, s_ids, t_ids = args
    _, without = kernel_loss(spec, h_s, w_s, h_t[:N], w_t, labels, t_labels[:N], s_ids, t_ids, aligned=aligned)
    span_kd = float(dense_span_kd(h_s, w_s, labels, spec, VS, h_t, w_t, t_labels, VT, groups).detach())
    assert span_kd > 0.1
    assert math.isclose(float(with_spans["kd"]) - float(without["kd"]), span_kd, rel_tol=1e-5)
    for name in ("ce", "kl", "teacher_entropy", "student_entropy", "top1_agreement", "teacher_ce"):
        assert math.isclose(float(with_spans[name]), float(without[name]), rel_tol=1e-6, abs_tol=1e-6), name


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_a_span_the_student_is_sure_of_keeps_an_exact_bounded_gradient(divergence):
    """A group whose every token the student gives 1 - q below 1e-9, where 1 - Q rounds to 0 from the product and
    dD/dlog Q = (Q - P)/(1 - Q) is ~1e9: the kernel sums the complement in log space and takes the gradient in its
    bounded form, so loss and gradients stay finite and equal the float64 reference's."""
    args, aligned, spans, groups = span_inputs(10)
    h_s, w_s, labels = args[0].detach().clone(), args[1].detach(), args[4].clone()
    for rows, _ in groups:
        for r in rows:  # the label the row's most likely token, scaled until it leads the next one by 25
            top = (h_s[r] @ w_s.T).topk(2)
            labels[r] = top.indices[0]
            h_s[r] *= 25.0 / float(top.values[0] - top.values[1])
    args = (h_s.requires_grad_(), w_s.requires_grad_(), *args[2:4], labels, *args[5:])
    log_q = torch.log_softmax(h_s.detach() @ w_s.T, -1).gather(1, labels[:, None])[:, 0]
    assert all(float(log_q[rows].sum()) > -1e-9 for rows, _ in groups)  # 1 - Q < 1e-9: 0 from 1 - exp in fp32
    spec = spec_with(divergence, 0.5, kd_coef=0.9, temperature=1.0, vocab_chunk=13, token_chunk=6)
    loss, metrics = kernel_loss(spec, *args, aligned=aligned, spans=spans)
    ref_loss, ref_kd = span_reference(spec, args, aligned, groups)
    assert torch.isfinite(loss) and math.isfinite(ref_kd)
    # the hidden states are scaled up: the logits' and the one-hot term's fp32 rounding (as the CE's) grow with them
    assert_close(loss.detach(), ref_loss.detach(), rtol=1e-4)
    for g, r in zip(torch.autograd.grad(loss, args[:2]), torch.autograd.grad(ref_loss, args[:2])):
        assert torch.isfinite(g).all()
        assert_close(g, r, rtol=1e-3)


def test_the_end_of_turn_mapped_by_role_is_a_bucket_of_the_exact_part():
    """A Phi-3 student under a Qwen2.5 teacher, with their real id map: at a row where the teacher says "stop"
    (its `<|im_end|>`), the student's `<|end|>` is that bucket, so a student that stops too is near it and one that
    puts the same mass on a token without a counterpart is far (without the role pair both would be the rest
    bucket). Loss, KD and gradients equal the dense reference's over that map, taken in float64 (in float32 its
    reverse KL is 3e-5 off in a rest bucket of e^-16 over these vocabularies; the kernel is within 3e-6)."""
    from transformers import AutoTokenizer

    from assets import real_asset
    from fsdp_kd.cross_tokenizer import TokenBytes, shared_vocabulary

    s_tok, t_tok = (AutoTokenizer.from_pretrained(real_asset(name))
                    for name in ("tok_phi3_mini_instruct", "tok_qwen2.5_instruct"))
    shared = shared_vocabulary(TokenBytes.of(s_tok), TokenBytes.of(t_tok))
    s_end, t_end = s_tok.convert_tokens_to_ids("<|end|>"), t_tok.convert_tokens_to_ids("<|im_end|>")
    s_ids, t_ids = torch.from_numpy(shared.student_ids), torch.from_numpy(shared.teacher_ids)
    assert int(t_ids[s_ids == s_end]) == t_end
    unshared = next(i for i in range(len(s_tok)) if i not in set(s_ids.tolist()))
    vs, vt, rows = len(s_tok), len(t_tok), 5
    g = torch.Generator().manual_seed(5)
    h_s, h_t = torch.randn(rows, HS, generator=g), torch.randn(rows, HT, generator=g)
    w_s, w_t = torch.randn(vs, HS, generator=g) * 0.3, torch.randn(vt, HT, generator=g) * 0.3
    w_t[t_end] = h_t[0] * 20 / h_t[0].square().sum()  # row 0: the teacher ends its turn (logit 20)
    labels, t_labels = torch.randint(0, vs, (rows,), generator=g), torch.randint(0, vt, (rows,), generator=g)
    for divergence in ("forward_kl", "reverse_kl"):
        spec = LossSpec(kd_coef=0.7, divergence=divergence, temperature=1.0, vocab_chunk=8192, token_chunk=4)
        kd_at_end = {}
        for stops_at in (s_end, unshared):
            w = w_s.clone()
            w[stops_at] = h_s[0] * 16 / h_s[0].square().sum()  # the student too (logit 16), or elsewhere
            h, w = h_s.clone().requires_grad_(), w.requires_grad_()
            loss, metrics = kernel_loss(spec, h, w, h_t, w_t, labels, t_labels, s_ids, t_ids)
            h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
            ref_loss, ref_kd = dense_cross_vocab_loss(h64, w64, labels, spec, vs, h_t.double(), w_t.double(), vt,
                                                      s_ids, t_ids, 0.5, 7)
            assert_close(loss.detach(), ref_loss.detach())
            assert math.isclose(float(metrics["kd"]), float(ref_kd), rel_tol=1e-5)
            for got, want in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref_loss, (h64, w64))):
                assert_close(got, want)
            kd_at_end[stops_at] = float(kernel_loss(spec, h[:1], w, h_t[:1], w_t, labels[:1], t_labels[:1], s_ids,
                                                    t_ids)[1]["kd"])
        assert 10 * kd_at_end[s_end] < kd_at_end[unshared], (divergence, kd_at_end)


def random_joins(ids: torch.Tensor, size: int, share: float, seed: int):
    """[size] a random bucket (an index into `ids`) for about `share` of the tokens outside `ids`, -1 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    joins = torch.randint(0, len(ids), (size,), generator=g)
    joins[torch.rand(size, generator=g) >= share] = -1
    joins[ids] = -1
    return joins.numpy()


@pytest.mark.parametrize("divergence,tau,param", [("forward_kl", 1.0, 0), ("reverse_kl", 1.5, 0), ("jsd", 1.0, 0.3),
                                                  ("tvd", 1.0, 0), ("akl", 1.0, 0.5)])
@pytest.mark.parametrize("student_share,teacher_share", [(0.5, 0.7), (1.0, 0.4), (0.6, 1.0), (1.0, 1.0)])
def test_prefix_buckets_match_the_dense_reference(divergence, tau, param, student_share, teacher_share):
    """With `prefix_buckets`, tokens without a counterpart join shared buckets (several to a bucket, across vocabulary
    chunks): loss, KD sum and gradients equal the dense reference, with unaligned rows; a share of 1 puts every
    token of a side in a bucket (no rest: the other side renormalized, or neither when both have none)."""
    h_s, w_s, h_t, w_t, labels, t_labels, s_ids, t_ids = inputs(7)
    joins = random_joins(s_ids, VS, student_share, 8), random_joins(t_ids, VT, teacher_share, 9)
    aligned = (torch.arange(N) % 4 != 1).float()
    spec = spec_with(divergence, param, kd_coef=0.7, temperature=tau, vocab_chunk=13, token_chunk=6)
    loss, metrics = kernel_loss(spec, h_s, w_s, h_t, w_t, labels, t_labels, s_ids, t_ids, aligned=aligned,
                                joins=joins)
    ref_loss, ref_kd = dense_cross_vocab_loss(h_s, w_s, labels, spec, VS, h_t, w_t, VT, s_ids, t_ids, 0.5, 7,
                                              aligned=aligned, student_joins=joins[0], teacher_joins=joins[1])
    assert torch.isfinite(loss)
    assert_close(loss.detach(), ref_loss.detach())
    assert math.isclose(float(metrics["kd"]), float(ref_kd), rel_tol=1e-5)
    for g, r in zip(torch.autograd.grad(loss, (h_s, w_s)), torch.autograd.grad(ref_loss, (h_s, w_s))):
        assert_close(g, r)


def test_a_token_joins_the_bucket_of_the_longest_shared_token_it_starts_with():
    spelled = (b"<eos>", b"t", b"th", b"the", b"ther", b"x", b"he", b"<s>t")
    regular = (False, True, True, True, True, True, True, False)
    own_ids = torch.tensor([1, 3, 0]).numpy()  # shared: "t" (bucket 0), "the" (1), "<eos>" (2)
    assert prefix_joins(spelled, regular, own_ids).tolist() == [-1, -1, 0, -1, 1, -1, -1, -1]


def test_the_demos_pair_tokens_join_their_first_characters_bucket(tmp_path):
    """The demo's second tokenizer (characters and letter pairs) against its character teacher: every pair joins
    its first character's bucket, so neither side has a rest and the buckets are the next character's
    distribution on both."""
    from fsdp_kd.cross_tokenizer import TokenBytes, shared_vocabulary
    from fsdp_kd.testing.tiny import build_char_tokenizer

    chars = build_char_tokenizer(str(tmp_path / "chars"))
    pairs = build_char_tokenizer(str(tmp_path / "pairs"), pairs=("AB", "BA", "CD"))
    s_bytes, t_bytes = TokenBytes.of(pairs), TokenBytes.of(chars)
    shared = shared_vocabulary(s_bytes, t_bytes)
    joins = prefix_joins(s_bytes.spelled, s_bytes.regular, shared.student_ids)
    first = {pairs.convert_ids_to_tokens(int(shared.student_ids[j])) for j in joins[joins >= 0]}
    assert sorted(pairs.convert_ids_to_tokens(i) for i in (joins >= 0).nonzero()[0].tolist()) == ["AB", "BA", "CD"]
    assert first == {"A", "B", "C"}
    vmap = VocabMap(torch.from_numpy(shared.student_ids), torch.from_numpy(shared.teacher_ids), len(pairs),
                    len(chars), joins)
    assert vmap.renormalized is None
