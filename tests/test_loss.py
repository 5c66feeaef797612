"""The chunked kernel against the dense reference: values, gradients, metrics, every divergence."""

import math

import pytest
import torch

from fsdp_kd.divergences import AKL_HEAD_TOKENS, DIVERGENCES
from fsdp_kd.kernel import Head, fp32_output_products
from fsdp_kd.loss import CPU_CACHE_MB, LossSpec, choose_chunks, distillation_loss
from fsdp_kd.targets import SparseTargets
from fsdp_kd.testing.profiling import profile_launches
from fsdp_kd.testing.reference import _akl, dense_bucketed_loss, dense_distillation_loss

N, HS, HT, V = 29, 12, 20, 97


def inputs(seed=0, dtype=torch.float32, padded_rows=(0, 0)):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(N, HS, generator=g).to(dtype).requires_grad_()
    w_s = (torch.randn(V + padded_rows[0], HS, generator=g) * 0.5).to(dtype).requires_grad_()
    h_t = torch.randn(N, HT, generator=g).to(dtype)
    w_t = (torch.randn(V + padded_rows[1], HT, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    return h_s, w_s, h_t, w_t, labels


def run(fn, spec, h_s, w_s, h_t, w_t, labels):
    loss, metrics = fn(h_s, w_s, labels, spec, V, h_t, w_t)
    grads = torch.autograd.grad(loss, (h_s, w_s))
    return loss.detach(), metrics, grads


def assert_close(a, b, rtol=1e-5):
    scale = max(float(b.abs().max()), 1e-12)
    assert float((a.double() - b.double()).abs().max()) <= rtol * scale, (a, b)


def spec_with(divergence: str, param: float, **kwargs) -> LossSpec:
    """A LossSpec whose divergence takes `param` as its own parameter (JSD's β, the skew's α), if it has one."""
    name = DIVERGENCES[divergence].parameter
    return LossSpec(divergence=divergence, **({} if name is None else {name: param}), **kwargs)


# (divergence, τ, its parameter): every entry, JSD's and the skews' endpoints, and temperatures on both sides of 1
CASES = [("forward_kl", 1.0, 0.5), ("forward_kl", 2.0, 0.5), ("reverse_kl", 1.0, 0.5), ("reverse_kl", 0.5, 0.5),
         ("jsd", 1.0, 0.5), ("jsd", 3.0, 0.1), ("jsd", 1.0, 0.9), ("jsd", 1.0, 0.0), ("jsd", 1.0, 1.0),
         ("tvd", 1.0, 0.5), ("tvd", 2.0, 0.5), ("skew_kl", 1.0, 0.1), ("skew_kl", 2.0, 0.5), ("skew_kl", 1.0, 0.0),
         ("skew_kl", 0.5, 0.9), ("skew_reverse_kl", 1.0, 0.1), ("skew_reverse_kl", 0.5, 0.3),
         ("skew_reverse_kl", 1.0, 0.0), ("skew_reverse_kl", 2.0, 0.9), ("akl", 1.0, 0.5), ("akl", 2.0, 0.2),
         ("akl", 0.5, 0.9), ("reverse_kl_student_topk", 1.0, 5), ("reverse_kl_student_topk", 2.0, 1),
         ("reverse_kl_student_topk", 0.5, 40)]


def test_every_divergence_is_tested_against_the_reference():
    assert {case[0] for case in CASES} == set(DIVERGENCES)


@pytest.mark.parametrize("divergence,tau,param", CASES)
def test_matches_dense_reference(divergence, tau, param):
    spec = spec_with(divergence, param, kd_coef=0.7, temperature=tau, vocab_chunk=13, token_chunk=6)
    args = inputs(padded_rows=(5, 11))  # padded head rows beyond the shared vocabulary are ignored
    loss, metrics, grads = run(distillation_loss, spec, *args)
    ref_loss, ref_metrics, ref_grads = run(dense_distillation_loss, spec, *args)
    assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)
    for name, value in ref_metrics.items():
        assert math.isclose(float(metrics[name]), float(value), rel_tol=1e-5, abs_tol=1e-4), name


@pytest.mark.parametrize("vocab_chunk,token_chunk", [(1, 1), (7, 3), (97, 29), (4096, 4096), (50, 8)])
def test_independent_of_chunk_sizes(vocab_chunk, token_chunk):
    base = run(distillation_loss, LossSpec(kd_coef=0.5, vocab_chunk=16, token_chunk=4), *inputs())
    other = run(distillation_loss, LossSpec(kd_coef=0.5, vocab_chunk=vocab_chunk, token_chunk=token_chunk), *inputs())
    assert_close(other[0], base[0])
    for g, r in zip(other[2], base[2]):
        assert_close(g, r)


@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_divergence_of_a_distribution_with_itself_is_zero(divergence):
    h_s, w_s, _, _, labels = inputs()
    spec = LossSpec(kd_coef=1.0, divergence=divergence, vocab_chunk=10)
    loss, metrics = distillation_loss(h_s, w_s, labels, spec, V, h_s.detach(), w_s.detach())
    assert abs(loss.item()) < 1e-4
    assert abs(float(metrics["kl"])) < 1e-4
    assert float(metrics["top1_agreement"]) == N
    # the teacher's entropy is the floor of the soft-target CE, and is not zero here
    assert float(metrics["teacher_entropy"]) / N > 1.0


def test_jsd_endpoints_equal_the_kls_and_are_continuous():
    args = inputs()

    def value(divergence, beta=0.5):
        spec = LossSpec(kd_coef=1.0, divergence=divergence, jsd_beta=beta)
        return distillation_loss(args[0], args[1], args[4], spec, V, args[2], args[3])[0].item()

    forward, reverse = value("forward_kl"), value("reverse_kl")
    assert forward > 1 and reverse > 1 and abs(forward - reverse) > 0.1  # the two differ here
    assert value("jsd", 0.0) == pytest.approx(forward, rel=1e-6)
    assert value("jsd", 1.0) == pytest.approx(reverse, rel=1e-6)
    # continuity: the gap to each endpoint shrinks as β approaches it, and is under 2% at 1e-4 from it
    gaps_forward = [abs(value("jsd", b) - forward) for b in (1e-2, 1e-3, 1e-4)]
    gaps_reverse = [abs(value("jsd", 1 - b) - reverse) for b in (1e-2, 1e-3, 1e-4)]
    assert gaps_forward == sorted(gaps_forward, reverse=True) and gaps_forward[-1] < 2e-2 * forward
    assert gaps_reverse == sorted(gaps_reverse, reverse=True) and gaps_reverse[-1] < 2e-2 * reverse
    mids = [value("jsd", b) for b in (0.25, 0.5, 0.75)]
    assert all(v > 0 for v in mids)


def test_bf16_inputs_stay_close_to_fp32():
    """bf16 weights and hidden states, fp32 accumulation: the only error is the inputs' own rounding.
    Stated tolerance: 2% relative on the loss and on the gradient's norm."""
    spec = LossSpec(kd_coef=0.5, vocab_chunk=16)
    fp32 = run(distillation_loss, spec, *inputs())
    bf16_args = inputs(dtype=torch.bfloat16)
    bf16 = run(distillation_loss, spec, *bf16_args)
    rounded = [a.detach().float().requires_grad_() if a.dtype == torch.bfloat16 and a.requires_grad else
               (a.float() if a.dtype == torch.bfloat16 else a) for a in bf16_args]
    exact_on_rounded = run(distillation_loss, spec, *rounded)
    assert bf16[2][0].dtype == torch.bfloat16 and bf16[2][1].dtype == torch.bfloat16
    assert float(bf16[0]) == pytest.approx(float(fp32[0]), rel=2e-2)
    # no rounding inside the kernel: bf16 inputs give the fp32 result on the rounded inputs
    assert float(bf16[0]) == pytest.approx(float(exact_on_rounded[0]), rel=1e-5)
    for g, r in zip(bf16[2], fp32[2]):
        assert float((g.float() - r).norm() / r.norm()) < 2e-2


def test_all_masked_batch_gives_zero_loss_connected_to_the_graph():
    h_s, w_s, h_t, w_t, _ = inputs()
    spec = LossSpec(kd_coef=0.5)
    loss, metrics = distillation_loss(h_s[:0], w_s, torch.zeros(0, dtype=torch.long), spec, V, h_t[:0], w_t)
    assert float(loss) == 0.0 and float(metrics["tokens"]) == 0
    loss.backward()
    assert w_s.grad is not None and float(w_s.grad.abs().sum()) == 0.0


def test_no_teacher_is_plain_cross_entropy():
    h_s, w_s, _, _, labels = inputs()
    loss, _ = distillation_loss(h_s, w_s, labels, LossSpec(kd_coef=0.0), V)
    expected = torch.nn.functional.cross_entropy(h_s @ w_s.t(), labels, reduction="sum")
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_eval_under_no_grad_gives_the_same_values():
    args = inputs()
    spec = LossSpec(kd_coef=0.5, divergence="reverse_kl")
    with_grad = distillation_loss(args[0], args[1], args[4], spec, V, args[2], args[3])
    with torch.no_grad():
        without = distillation_loss(args[0], args[1], args[4], spec, V, args[2], args[3])
    assert float(with_grad[0]) == float(without[0])
    assert float(with_grad[1]["kl"]) == float(without[1]["kl"])


def test_rejects_a_vocabulary_larger_than_a_head():
    h_s, w_s, h_t, w_t, labels = inputs()
    with pytest.raises(ValueError, match="exceeds"):
        distillation_loss(h_s, w_s[:50], labels, LossSpec(), V, h_t, w_t)


# ------------------------------------------------------------------------------------------- heads beyond a Linear
HEADS = {"bias": dict(bias=True), "cohere_scale": dict(scale=0.0625), "granite_scale": dict(scale=1 / 8.0),
         "softcap": dict(scale=8.0, softcap=3.0), "all": dict(bias=True, scale=4.0, softcap=2.0)}  # scaled: caps bite


def heads(seed, w_s, w_t, bias=False, scale=1.0, softcap=None):
    g = torch.Generator().manual_seed(seed)
    b_s = (torch.randn(w_s.shape[0], generator=g)).requires_grad_() if bias else None
    b_t = torch.randn(w_t.shape[0], generator=g) if bias else None
    return Head(w_s, b_s, scale, softcap), Head(w_t, b_t, scale, softcap)


@pytest.mark.parametrize("kind", list(HEADS))
@pytest.mark.parametrize("divergence,tau", [("forward_kl", 1.0), ("reverse_kl", 2.0), ("jsd", 1.0)])
def test_head_transforms_match_the_dense_reference(kind, divergence, tau):
    """Soft-capping, logit scale and head bias, applied in the chunked passes with their derivatives."""
    h_s, w_s, h_t, w_t, labels = inputs(padded_rows=(3, 0))
    s_head, t_head = heads(1, w_s, w_t, **HEADS[kind])
    spec = LossSpec(kd_coef=0.6, divergence=divergence, temperature=tau, vocab_chunk=13, token_chunk=6)
    params = (h_s, w_s) + ((s_head.bias,) if s_head.bias is not None else ())
    results = []
    for fn in (distillation_loss, dense_distillation_loss):
        loss, metrics = fn(h_s, s_head, labels, spec, V, h_t, t_head)
        results.append((loss.detach(), metrics, torch.autograd.grad(loss, params)))
    (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = results
    assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)
    for name, value in ref_metrics.items():
        assert math.isclose(float(metrics[name]), float(value), rel_tol=1e-5, abs_tol=1e-4), name


# ------------------------------------------------------------------------------------------- built for a GPU
def big_inputs(tokens=1024, hidden=16, vocab=32768):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(tokens, hidden, generator=g).requires_grad_(),
            (torch.randn(vocab, hidden, generator=g) * 0.1).requires_grad_(),
            torch.randn(tokens, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * 0.1,
            torch.randint(0, vocab, (tokens,), generator=g))


def training_call(spec, h_s, w_s, h_t, w_t, labels):
    h_s.grad = w_s.grad = None  # the loss's own launches, not autograd adding into an earlier call's .grad
    loss, metrics = distillation_loss(h_s, w_s, labels, spec, w_s.shape[0], h_t, w_t)
    loss.backward()
    return loss


@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_no_host_syncs_and_few_launches(divergence):
    """No `.item()`/`nonzero` anywhere in the loss; at the CUDA block shape (1024 rows, two vocabulary chunks,
    forced here on CPU) a 1k-token training call launches at most 200 kernels. The launches do not depend on the
    chunks' width, so two narrow ones stand in for two of 76k."""
    args = big_inputs(vocab=8192)
    cuda_shape = choose_chunks(LossSpec(), torch.device("cuda"), 1024, 2 * 75968, 2)
    assert cuda_shape == (1024, 75968)  # the default budget fits a 152k vocabulary in two chunks
    for token_chunk, vocab_chunk in ((None, None), (1024, 4096)):
        spec = LossSpec(kd_coef=0.5, divergence=divergence, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
        _, profile = profile_launches(training_call, spec, *args)
        assert profile.host_syncs == 0, profile.by_name
        if token_chunk:
            assert profile.launches <= 200, profile.by_name
            assert profile.matmuls == 8  # two logit products per chunk, two gradient products per chunk


def test_evaluation_does_no_gradient_work():
    """Under no_grad only the logit products run, although the head parameter requires a gradient."""
    h_s, w_s, h_t, w_t, labels = big_inputs(tokens=256)
    spec = LossSpec(kd_coef=0.5, divergence="reverse_kl", token_chunk=256, vocab_chunk=16384)

    def evaluation():
        with torch.no_grad():
            return distillation_loss(h_s, w_s, labels, spec, w_s.shape[0], h_t, w_t)

    _, profile = profile_launches(evaluation)
    assert profile.matmuls == 4 and "aten::index_add_" not in profile.by_name, profile.by_name


def test_chunk_shapes_per_device():
    spec = LossSpec()
    # CPU: the block's logit caches within CPU_CACHE_MB, in multiples of 64 rows from 64 to 256
    assert choose_chunks(spec, torch.device("cpu"), 5000, 151936, 2) == (192, 1024)
    assert 192 * 2 * 151936 * 4 <= CPU_CACHE_MB * 1024**2 < 256 * 2 * 151936 * 4
    assert choose_chunks(spec, torch.device("cpu"), 5000, 32000, 2) == (256, 1024)
    assert choose_chunks(spec, torch.device("cpu"), 5000, 262144, 2) == (128, 1024)
    assert choose_chunks(spec, torch.device("cpu"), 5000, 10**6, 2) == (64, 1024)  # never below 64 rows
    rows, cols = choose_chunks(spec, torch.device("cuda"), 8192, 151936, 2)
    assert rows == 1024 and -(-151936 // cols) <= 3
    # the budget holds the logit caches and the chunk temporaries
    assert rows * 4 * (2 * 151936 + 8 * cols) <= spec.chunk_budget_mb * 1024**2
    assert choose_chunks(spec, torch.device("cuda"), 300, 32000, 2) == (300, 32000)  # one block, one chunk
    small = LossSpec(chunk_budget_mb=512)
    rows, cols = choose_chunks(small, torch.device("cuda"), 8192, 151936, 2)
    assert rows < 1024 and rows * 4 * (2 * 151936 + 8 * cols) <= 512 * 1024**2
    assert choose_chunks(LossSpec(token_chunk=64, vocab_chunk=100), torch.device("cuda"), 8192, 151936, 2) == (64, 100)


def test_the_weight_gradients_fp32_temporary_is_counted_in_the_budget():
    """Where bf16 products cannot accumulate in place, each chunk's weight gradient passes through an fp32
    [columns × H] temporary (1.1 GB at H = 3584 and a 75k-column chunk); the block shape leaves room for it."""
    spec, hidden = LossSpec(), 3584
    rows, cols = choose_chunks(spec, torch.device("cuda"), 8192, 151936, 2, grad_temporary_per_column=hidden)
    assert rows * 4 * (2 * 151936 + 8 * cols) + 4 * cols * hidden <= spec.chunk_budget_mb * 1024**2
    assert cols < choose_chunks(spec, torch.device("cuda"), 8192, 151936, 2)[1]


def test_fp32_output_support_is_probed_once_and_an_out_of_memory_error_is_not_taken_for_no(monkeypatch):
    """One transient OOM must not switch every later head product to the widened path: only "unsupported" is a no."""
    from fsdp_kd import kernel

    probe = (torch.device("cpu"), torch.float16)
    monkeypatch.setattr(kernel, "_PROBED", {})

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with monkeypatch.context() as m:
        m.setattr(torch, "mm", out_of_memory)
        with pytest.raises(torch.OutOfMemoryError):
            fp32_output_products(*probe)
    assert probe not in kernel._PROBED

    def unsupported(*args, **kwargs):
        raise NotImplementedError("no out_dtype overload on this backend")

    with monkeypatch.context() as m:
        m.setattr(torch, "mm", unsupported)
        m.setattr(torch, "addmm", unsupported)
        assert fp32_output_products(*probe) == kernel._Fp32Output(mm=False, addmm=False)
    assert fp32_output_products(*probe) == kernel._Fp32Output(mm=False, addmm=False)  # the answer is kept


def test_bf16_products_keep_fp32_statistics():
    """The bf16 path: bf16 head products with fp32 output, dL/dz rounded to bf16 for the gradient products. Loss
    and metrics equal the fp32 computation on the rounded inputs; gradients stay within the bf16 tolerance."""
    spec = LossSpec(kd_coef=0.5, divergence="jsd", vocab_chunk=16)
    bf16_args = inputs(dtype=torch.bfloat16)
    rounded = [a.detach().float().requires_grad_(a.requires_grad) if a.is_floating_point() else a for a in bf16_args]
    loss, metrics, grads = run(distillation_loss, spec, *bf16_args)
    ref_loss, ref_metrics, ref_grads = run(dense_distillation_loss, spec, *rounded)
    assert_close(loss, ref_loss)
    assert math.isclose(float(metrics["kl"]), float(ref_metrics["kl"]), rel_tol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16
        assert float((g.float() - r).norm() / r.norm()) < 1e-2


@pytest.mark.parametrize("divergence", ["jsd", "forward_kl", "akl"])
def test_compiled_elementwise_work_equals_eager(divergence):
    """At τ = 2, each way pass 3 finds w (stored by pass 2: JSD; folded: forward KL; recomputed late: AKL) through
    both compiled functions (pass 2's sums and pass 3's gradient)."""
    args = inputs()
    shape = dict(kd_coef=0.5, divergence=divergence, temperature=2.0, vocab_chunk=16, token_chunk=8)
    eager = run(distillation_loss, LossSpec(**shape), *args)
    compiled = run(distillation_loss, LossSpec(**shape, compile=True), *args)
    assert_close(compiled[0], eager[0], rtol=1e-6)
    for g, r in zip(compiled[2], eager[2]):
        assert_close(g, r, rtol=1e-6)


# ------------------------------------------------------------------------------------- a cached teacher at extremes
VE = 16  # vocabulary of the extreme-logit tests; identity heads, so the hidden states are the logits
EXTREME_CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9), ("jsd", 0.0),
                 ("jsd", 1.0), ("tvd", 0.5), ("skew_kl", 0.1), ("skew_kl", 0.0), ("skew_kl", 0.9),
                 ("skew_reverse_kl", 0.1), ("skew_reverse_kl", 0.0), ("skew_reverse_kl", 0.9), ("akl", 0.5),
                 ("akl", 0.1)]
# divergences over the student's buckets have no cached form; their live kernel is tested at the same extremes
LIVE_EXTREME_CASES = EXTREME_CASES + [("reverse_kl_student_topk", 3), ("reverse_kl_student_topk", 1),
                                      ("reverse_kl_student_topk", VE)]


def extreme_logits():
    """(student logits, teacher logits, labels) [rows, VE]: ordinary rows, then rows where a ratio of the two
    distributions leaves fp32 — the teacher peaked on a token the student puts at -92 or -120, the student at +80
    on a token the teacher does not favour, a teacher at +80 against a student at -120."""
    g = torch.Generator().manual_seed(5)
    z_s, z_t = torch.randn(8, VE, generator=g), torch.randn(8, VE, generator=g)
    z_t[2:6, 3] = 20.0
    z_s[2, 3], z_s[3, 3], z_s[4, 5], z_s[5, 3] = -92.0, -120.0, 80.0, -92.0
    z_s[6, 7], z_t[6, 7] = -120.0, 80.0
    z_s[7, 0], z_t[7, 9] = 80.0, 80.0
    return z_s, z_t, torch.randint(0, VE, (8,), generator=g)


def top_k_cache(z_t: torch.Tensor, tau: float, k: int) -> SparseTargets:
    """The teacher's k most likely tokens and the log of its mass on the rest, by definition (k = V: no rest)."""
    log_p, ids = torch.log_softmax(z_t / tau, dim=1).sort(dim=1, descending=True)
    return SparseTargets(ids[:, :k], log_p[:, :k], torch.logsumexp(log_p[:, k:], dim=1))


def with_logit_gradient(fn, z_s, *args, **kwargs):
    """(loss, kd, dL/dz_student): with an identity head the hidden states' gradient is the logits' gradient."""
    loss, metrics = fn(z_s, torch.eye(VE, dtype=z_s.dtype), *args, **kwargs)
    kd = metrics["kd"] if isinstance(metrics, dict) else metrics
    return loss.detach(), kd, torch.autograd.grad(loss, z_s)[0]


def assert_all_close(got, expected, rtol=1e-5):
    for name, a, b in zip(("loss", "kd", "gradient"), got, expected):
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), (name, a, b)
        assert_close(a, b, rtol)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 10.0])
@pytest.mark.parametrize("divergence,param", EXTREME_CASES)
def test_full_vocabulary_cache_equals_the_live_teacher_at_extreme_logits(divergence, param, tau):
    """With k = V the bucketed divergence is the live one, so the cached path, kernel and dense reference alike, must
    give the live teacher's loss, divergence and gradient (computed exactly, in fp64) at any logit gap. A bucket
    gradient written as a ratio p/Q times Q is NaN once log p - log Q passes 88 (fp32) and drops the pull to 0 once
    Q underflows: rows 2-3 and 5-6 (at τ = 0.5 a logit gap of 46 is enough)."""
    z_s, z_t, labels = extreme_logits()
    spec = spec_with(divergence, param, kd_coef=0.8, temperature=tau, vocab_chunk=5, token_chunk=3)
    cache = top_k_cache(z_t, tau, VE)
    exact = with_logit_gradient(dense_distillation_loss, z_s.double().requires_grad_(), labels, spec, VE, z_t.double(),
                                torch.eye(VE, dtype=torch.float64))
    z_s.requires_grad_()
    assert_all_close(with_logit_gradient(distillation_loss, z_s, labels, spec, VE, cached_teacher=cache), exact)
    assert_all_close(with_logit_gradient(dense_bucketed_loss, z_s, labels, spec, VE, cache), exact)


@pytest.mark.parametrize("tau", [0.5, 1.0, 10.0])
@pytest.mark.parametrize("divergence,param", LIVE_EXTREME_CASES)
def test_live_teacher_at_extreme_logits_matches_the_exact_loss(divergence, param, tau):
    """The live kernel at the same logit gaps, against the fp64 dense loss: finite, and equal to 3e-5 of the largest
    gradient (1e-5 but at τ = 10, where fp32 log-probabilities near 16 carry a rounding of 1e-6 that the gradient's
    factor τ multiplies; the fp32 dense loss errs by 1e-5 there too). Mixtures' log m is floored at fp32's smallest
    normal number, which moves only terms below 1e-36."""
    z_s, z_t, labels = extreme_logits()
    spec = spec_with(divergence, param, kd_coef=0.8, temperature=tau, vocab_chunk=5, token_chunk=3)
    exact = with_logit_gradient(dense_distillation_loss, z_s.double().requires_grad_(), labels, spec, VE, z_t.double(),
                                torch.eye(VE, dtype=torch.float64))
    live = with_logit_gradient(distillation_loss, z_s.requires_grad_(), labels, spec, VE, z_t, torch.eye(VE))
    assert_all_close(live, exact, 1e-5 if tau < 10 else 3e-5)


def test_akl_head_is_cut_at_its_candidate_tokens_on_a_flat_teacher():
    """A teacher too flat for its top AKL_HEAD_TOKENS to reach μ: the head is those tokens (the documented cut), and
    the loss, kd and gradient are the authors' formula with the head restricted to them."""
    vocab, rows = 3 * AKL_HEAD_TOKENS, 5
    g = torch.Generator().manual_seed(3)
    z_s, z_t = torch.randn(rows, vocab, generator=g), 0.05 * torch.randn(rows, vocab, generator=g)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    spec = LossSpec(kd_coef=0.7, divergence="akl", akl_mu=0.5, vocab_chunk=50, token_chunk=3)
    log_p = torch.log_softmax(z_t.double(), 1)
    top = torch.zeros_like(log_p, dtype=torch.bool).scatter(1, log_p.topk(AKL_HEAD_TOKENS, 1).indices, True)
    assert float(torch.where(top, log_p.exp(), 0.0).sum(1).max()) < 0.5  # the cut is active on every row
    zd = z_s.double().requires_grad_()
    kd = _akl(log_p, torch.log_softmax(zd, 1), top, 0.5)
    expected = (0.3 * torch.nn.functional.cross_entropy(zd, labels, reduction="none") + 0.7 * kd).sum()
    loss, metrics = distillation_loss(z_s.requires_grad_(), torch.eye(vocab), labels, spec, vocab, z_t, torch.eye(vocab))
    assert_close(loss.detach(), expected.detach())
    assert math.isclose(float(metrics["kd"]), float(kd.sum()), rel_tol=1e-5)
    assert_close(torch.autograd.grad(loss, z_s)[0], torch.autograd.grad(expected, zd)[0])


def test_student_top_k_reverse_kl_is_a_lower_bound_of_reverse_kl_and_equals_it_at_k_equal_to_v():
    """Merging tokens into buckets cannot raise a KL (the data-processing inequality), so the student cannot lower it
    by moving mass out of its top k; with every token its own bucket it is reverse KL, value and gradients."""
    args = inputs(3)
    full = run(distillation_loss, LossSpec(kd_coef=1.0, divergence="reverse_kl", vocab_chunk=13), *args)
    for k in (1, 4, 20):
        top = run(distillation_loss, LossSpec(kd_coef=1.0, divergence="reverse_kl_student_topk", student_topk=k,
                                              vocab_chunk=13), *args)
        assert 0 < float(top[0]) < float(full[0])
        assert float(top[1]["kl"]) == pytest.approx(float(full[1]["kl"]), rel=1e-6)  # the metric is the full KL
    whole = run(distillation_loss, LossSpec(kd_coef=1.0, divergence="reverse_kl_student_topk", student_topk=V + 3,
                                            vocab_chunk=13, token_chunk=7), *args)
    assert_close(whole[0], full[0], rtol=1e-6)
    for g, r in zip(whole[2], full[2]):
        assert_close(g, r, rtol=1e-5)


def test_a_cached_teacher_refuses_a_divergence_over_the_students_buckets():
    h_s, w_s, h_t, w_t, labels = inputs()
    cached = SparseTargets(torch.zeros(N, 2, dtype=torch.long), torch.zeros(N, 2), torch.zeros(N))
    spec = LossSpec(kd_coef=0.5, divergence="reverse_kl_student_topk")
    with pytest.raises(ValueError, match="student's most likely tokens.*live teacher"):
        distillation_loss(h_s, w_s, labels, spec, V, cached_teacher=cached)


@pytest.mark.parametrize("skew,plain", [("skew_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")])
def test_a_skew_of_zero_is_the_plain_kl(skew, plain):
    args = inputs()
    skewed = run(distillation_loss, LossSpec(kd_coef=0.6, divergence=skew, skew_alpha=0.0, vocab_chunk=13), *args)
    kl = run(distillation_loss, LossSpec(kd_coef=0.6, divergence=plain, vocab_chunk=13), *args)
    assert_close(skewed[0], kl[0], rtol=1e-6)
    for g, r in zip(skewed[2], kl[2]):
        assert_close(g, r, rtol=1e-5)
    tilted = run(distillation_loss, LossSpec(kd_coef=0.6, divergence=skew, skew_alpha=0.1, vocab_chunk=13), *args)
    assert float(tilted[0]) < float(kl[0])  # the mixture is closer to the first argument than the student/teacher is


@pytest.mark.parametrize("tau", [0.5, 1.0, 10.0])
@pytest.mark.parametrize("divergence,param", EXTREME_CASES)
def test_a_starved_rest_bucket_keeps_a_finite_pull(divergence, param, tau):
    """k < V with the student's rest mass underflowing fp32 (at τ ≤ 1) while the teacher's rest holds mass: the last
    row puts every uncached token at -110. The kernel and the dense reference on the buckets equal its exact value
    to 3e-5: the teacher's log-probabilities near -160 (+80 at τ = 0.5) carry an fp32 rounding of 1e-5, which reverse
    KL's w = Q·(log Q - log p) keeps, in either path."""
    z_s, z_t, labels = extreme_logits()
    z_t, labels = torch.cat([z_t, z_t[:1]]), torch.cat([labels, labels[:1]])  # a flat teacher: its rest holds mass
    cache = top_k_cache(z_t, tau, 4)
    starved = torch.full((VE,), -110.0).scatter(0, cache.ids[-1], 0.0)
    z_s = torch.cat([z_s, starved[None]]).requires_grad_()
    spec = spec_with(divergence, param, kd_coef=0.8, temperature=tau, vocab_chunk=5, token_chunk=3)
    exact = with_logit_gradient(dense_bucketed_loss, z_s.detach().double().requires_grad_(), labels, spec, VE,
                                top_k_cache(z_t.double(), tau, 4))
    assert_all_close(with_logit_gradient(distillation_loss, z_s, labels, spec, VE, cached_teacher=cache), exact, 3e-5)
    assert_all_close(with_logit_gradient(dense_bucketed_loss, z_s, labels, spec, VE, cache), exact, 3e-5)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_cached_teacher_ce_is_the_teachers_ce_at_the_caches_temperature(tau):
    """A cache's teacher CE (k = V here) is -log p_τ(label): the live teacher_ce's definition at τ = 1, and at other
    temperatures the tempered one, which `CachedTeacher.metric_names` logs under its own name."""
    z_s, z_t, labels = extreme_logits()
    spec = LossSpec(kd_coef=0.5, temperature=tau, vocab_chunk=5, token_chunk=3)
    with torch.no_grad():
        _, cached = distillation_loss(z_s, torch.eye(VE), labels, spec, VE, cached_teacher=top_k_cache(z_t, tau, VE))
        _, live = distillation_loss(z_s, torch.eye(VE), labels, spec, VE, z_t, torch.eye(VE))
    tempered = -torch.log_softmax(z_t.double() / tau, dim=1).gather(1, labels[:, None]).sum()
    assert math.isclose(float(cached["teacher_ce"]), float(tempered), rel_tol=1e-5)
    assert math.isclose(float(cached["teacher_ce"]), float(live["teacher_ce"]), rel_tol=1e-5) == (tau == 1.0)


# ------------------------------------------------------------------------------------- other tools' conventions
def published_generalized_jsd(z_s, z_t, beta, tau):
    """TRL's `generalized_jsd_loss` and Liger's `LigerFusedLinearJSDLoss` as their documentation writes them, per
    token: both softmaxes at z/τ, m = β·p + (1-β)·q, β·KL(p‖m) + (1-β)·KL(q‖m), the plain KLs at β = 0 and 1, no τ²."""
    log_q, log_p = torch.log_softmax(z_s / tau, -1), torch.log_softmax(z_t / tau, -1)
    if beta == 0:
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if beta == 1:
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), 0)
    return beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)


@pytest.mark.parametrize("convention", ["trl", "liger"])
@pytest.mark.parametrize("beta,tau", [(0.5, 1.0), (0.1, 2.0), (0.0, 2.0), (1.0, 0.5), (0.9, 1.0)])
def test_a_conventions_loss_is_that_tools_formula(convention, beta, tau):
    """(1 - c)·CE + c·JSD with JSD as the tool writes it (Liger's weight_hard_loss / weight_soft_loss; TRL's GKD is
    c = 1): the loss, its gradient and the kd metric, summed over tokens."""
    h_s, w_s, h_t, w_t, labels = inputs()
    kd_coef = 0.6
    spec = LossSpec(kd_coef=kd_coef, divergence="jsd", jsd_beta=beta, temperature=tau, convention=convention,
                    vocab_chunk=13, token_chunk=6)
    loss, metrics = distillation_loss(h_s, w_s, labels, spec, V, h_t, w_t)
    grads = torch.autograd.grad(loss, (h_s, w_s))
    z_s, z_t = h_s @ w_s.t(), h_t @ w_t.t()
    jsd = published_generalized_jsd(z_s, z_t, beta, tau)
    expected = ((1 - kd_coef) * torch.nn.functional.cross_entropy(z_s, labels, reduction="none") + kd_coef * jsd).sum()
    assert_close(loss, expected.detach())
    for g, r in zip(grads, torch.autograd.grad(expected, (h_s, w_s))):
        assert_close(g, r)
    assert math.isclose(float(metrics["kd"]), float(jsd.sum()), rel_tol=1e-5)


def test_fsdp_kd_convention_is_the_normalized_jsd_times_tau_squared():
    """fsdp-kd's JSD is the published one divided by β(1-β), times τ² (docs/divergences.md's conversion table)."""
    h_s, w_s, h_t, w_t, labels = inputs()
    beta, tau = 0.3, 2.0
    spec = LossSpec(kd_coef=1.0, divergence="jsd", jsd_beta=beta, temperature=tau, vocab_chunk=13)
    with torch.no_grad():
        _, metrics = distillation_loss(h_s, w_s, labels, spec, V, h_t, w_t)
        published = published_generalized_jsd(h_s @ w_s.t(), h_t @ w_t.t(), beta, tau).sum()
    assert math.isclose(float(metrics["kd"]), float(published) * tau**2 / (beta * (1 - beta)), rel_tol=1e-5)
