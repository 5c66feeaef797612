"""The teacher cache's math: the teacher side (top-k with a rest bucket, sampled draws) and the loss on buckets,
against the dense reference and against the live teacher."""

import math

import pytest
import torch

from fsdp_kd.divergences import DIVERGENCES
from fsdp_kd.kernel import Head, ModelBlock
from fsdp_kd.targets import SparseTargets
from fsdp_kd.loss import LossSpec, distillation_loss
from fsdp_kd.testing.profiling import profile_launches
from fsdp_kd.testing.reference import dense_bucketed_loss, dense_logits
from fsdp_kd.teacher_cache import decode_ids, encode_ids, id_bytes, teacher_samples, teacher_topk
from test_loss import spec_with

N, HS, HT, V = 23, 12, 20, 97
CACHEABLE = [name for name, d in DIVERGENCES.items() if not d.student_buckets]  # a cache holds the teacher's tokens
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


@pytest.mark.parametrize("divergence,tau,param", [("forward_kl", 1.0, 0.5), ("forward_kl", 2.0, 0.5),
                                                  ("reverse_kl", 1.0, 0.5), ("jsd", 1.5, 0.3), ("jsd", 1.0, 0.0),
                                                  ("tvd", 1.0, 0.5), ("skew_kl", 1.0, 0.1), ("skew_reverse_kl", 2.0, 0.1),
                                                  ("akl", 1.0, 0.5), ("akl", 0.5, 0.3)])
def test_bucketed_loss_matches_the_dense_reference(divergence, tau, param):
    h_s, w_s, h_t, w_t, labels = inputs()
    cached = topk_of(h_t, w_t, 5, tau)
    spec = spec_with(divergence, param, kd_coef=0.6, temperature=tau, vocab_chunk=13, token_chunk=6)
    loss, metrics = distillation_loss(h_s, w_s, labels, spec, V, cached_teacher=cached)
    grads = torch.autograd.grad(loss, (h_s, w_s))
    ref_loss, ref_kd = dense_bucketed_loss(h_s, w_s, labels, spec, V, cached)
    ref_grads = torch.autograd.grad(ref_loss, (h_s, w_s))
    assert_close(loss.detach(), ref_loss.detach())
    assert math.isclose(float(metrics["kd"]), float(ref_kd), rel_tol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)


@pytest.mark.parametrize("divergence", CACHEABLE)
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
    return SparseTargets(ids, torch.log(counts.float() / n), torch.full(ids.shape[:1], -math.inf))


def _mean_sampled_gradients(n: int, scales: tuple[float, ...], copies: int = 4096, per_call: int = 1024):
    """The live forward-KL gradient of the head, and the mean over `copies` independent draws of n samples per row
    of the sampled-cache gradient with p̂ = scale·counts/n, for each scale (the same draws for all).

    The draws are the batch repeated, each copy sampled afresh, in one kernel call per `per_call` copies: the loss
    is a sum over rows, so its gradient over the copies is the sum of the per-draw gradients."""
    h_s, w_s, h_t, w_t, labels = inputs(2)
    spec = LossSpec(kd_coef=1.0, divergence="forward_kl", vocab_chunk=40, token_chunk=4096)
    live = torch.autograd.grad(distillation_loss(h_s, w_s, labels, spec, V, h_t, w_t)[0], w_s)[0]
    rows = lambda x: x.repeat(per_call, *([1] * (x.dim() - 1)))  # noqa: E731 - the batch, per_call times
    g = torch.Generator().manual_seed(n)
    totals = [torch.zeros_like(live) for _ in scales]
    for _ in range(copies // per_call):
        cached = _sampled_targets(rows(h_t), w_t, n, g)
        for total, scale in zip(totals, scales):
            scaled = SparseTargets(cached.ids, cached.log_p + math.log(scale), cached.log_rest)
            loss = distillation_loss(rows(h_s), w_s, rows(labels), spec, V, cached_teacher=scaled)[0]
            total += torch.autograd.grad(loss, w_s)[0]
    return live, [total / copies for total in totals]


def test_sampled_gradient_is_unbiased_and_its_error_shrinks_as_one_over_root_n():
    """Forward KL with p̂ = counts/n: the mean of the sampled gradients over 4096 independent draws of every row tends
    to the live gradient, tightly enough that a 1% bias fails (the same draws with p̂ scaled by 1.01 do), and the
    error at n = 64 is about a quarter of that at n = 4 (1/√16).

    The mean's error is noise, falling as 1/√(n·draws): at n = 64 about 0.003 of the live gradient's norm (0.018
    over 100 draws), under half the 0.006 allowed; p̂·1.01 moves the mean by about 0.012 of it."""
    def error(mean, live):
        return float((mean - live).norm() / live.norm())

    live, (at_4,) = _mean_sampled_gradients(4, (1.0,))
    _, (at_64, at_64_biased) = _mean_sampled_gradients(64, (1.0, 1.01))
    errors = {4: error(at_4, live), 64: error(at_64, live), "64, p̂·1.01": error(at_64_biased, live)}
    assert errors[64] < 0.45 * errors[4], errors
    assert errors[64] < 0.006, errors
    assert errors["64, p̂·1.01"] > 0.006, errors  # the test catches a 1% bias


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


# ------------------------------------------------------------------------------------------------ storage and reading
def _write_cache(directory, parts: list[list[int]], mode="topk", slots=3, seed=0):
    """A cache written part by part with `write_part`, as ranks of a build would; parts[c] lists the samples of part
    c (an empty list: a rank whose share of a chunk held only masked copies). Returns the meta and each sample's
    rows as written."""
    from fsdp_kd.teacher_cache import CacheMeta, part_name, write_part

    samples = sum(map(len, parts))
    meta = CacheMeta(mode=mode, slots=slots, temperature=1.0, vocab_size=V, log_p_dtype="float32", tokenizer="t",
                     sources=[{"path": "data", "samples_sha256": "sha", "samples": samples, "offset": 0}],
                     settings={}, teacher="t", samples_per_chunk=1, complete=True)
    g = torch.Generator().manual_seed(seed)
    written = {}
    for c, members in enumerate(parts):
        rows = []
        for i in members:
            n = 1 + i % 4
            ids = torch.randint(0, V, (n, slots), generator=g)
            if mode == "topk":
                rows.append((ids, torch.randn(n, slots, generator=g), torch.randn(n, generator=g)))
            else:
                rows.append((ids, torch.randint(0, 4, (n, slots), generator=g)))
            written[i] = rows[-1]
        write_part(str(directory), part_name(c // 2, c % 2, 2), members, rows, meta)
    meta.save(str(directory))
    return meta, written


def _reader(directory, meta):
    """A `CachedTeacher` of the cache written in `directory`, loaded on the CPU."""
    import types

    from fsdp_kd.teacher_cache import CachedTeacher, CacheRun

    teacher = CachedTeacher(CacheRun(str(directory), None, "pretrain", meta.temperature, "forward_kl", {}), meta)
    teacher.load(types.SimpleNamespace(device=torch.device("cpu")), torch.float32)
    return teacher


class _Batch:
    """What `CachedTeacher.targets` reads off a micro-batch."""

    def __init__(self, samples, written):
        self.sample_keys = [("sha", i) for i in samples]
        self.trainable_tokens = sum(written[i][0].shape[0] for i in samples)


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_a_part_of_no_samples_and_a_micro_batch_of_only_masked_copies(tmp_path, mode):
    """A rank with no real sample in a chunk writes a part of no samples; a rank whose micro-batch holds only masked
    copies (no sample keys) gets targets of no rows, shaped like any other, which the loss takes."""
    meta, written = _write_cache(tmp_path, [[0, 1], [], [2], []], mode=mode)
    teacher = _reader(tmp_path, meta)
    with teacher.targets(_Batch([2, 0], written)) as full:
        assert torch.equal(full.ids, torch.cat([written[2][0], written[0][0]]))
    with teacher.targets(_Batch([], written)) as empty:
        pass
    assert empty.ids.shape == (0, meta.slots) and empty.log_p.shape == (0, meta.slots) and empty.log_rest.shape == (0,)
    h_s, w_s, *_ = inputs()
    spec = LossSpec(kd_coef=0.5, divergence="forward_kl", vocab_chunk=40, token_chunk=N)
    loss, metrics = distillation_loss(h_s[:0], w_s, torch.zeros(0, dtype=torch.long), spec, V, cached_teacher=empty)
    assert float(loss.detach()) == 0 and float(metrics["tokens"]) == 0


def _maps_of(directory) -> int:
    with open("/proc/self/maps") as f:
        return sum(str(directory) in line for line in f)


def test_reading_a_cache_of_many_parts_keeps_few_of_them_mapped(tmp_path):
    """A part per chunk per rank reaches ~10⁵ at 64 ranks, above Linux's default vm.max_map_count (65530): the
    reader maps a bounded number of parts at once, whatever the cache holds, and reads every sample right."""
    from fsdp_kd.teacher_cache import OPEN_PARTS

    parts = [[c] for c in range(3 * OPEN_PARTS)]
    meta, written = _write_cache(tmp_path, parts)
    teacher = _reader(tmp_path, meta)
    order = torch.randperm(len(parts), generator=torch.Generator().manual_seed(0)).tolist()
    most = 0
    for start in range(0, len(order), 4):
        samples = order[start:start + 4]
        with teacher.targets(_Batch(samples, written)) as got:
            pass
        most = max(most, _maps_of(tmp_path))
        for column, name in ((got.ids, 0), (got.log_p, 1), (got.log_rest, 2)):
            assert torch.equal(column, torch.cat([written[i][name] for i in samples]))
    assert 0 < most <= OPEN_PARTS, most


def test_a_tempered_caches_teacher_ce_says_so(tmp_path):
    """The live `teacher_ce` is at τ = 1, like the student's CE. A top-k cache holds the teacher at kd_temperature
    only, and τ = 1 cannot be recovered from it (log p₁ = τ·log p_τ - log Σ p_τ^τ needs every tail token's p_τ, not
    only their total), so at τ ≠ 1 its teacher CE is logged under a name that says which temperature it is at."""
    import dataclasses

    meta, _ = _write_cache(tmp_path, [[0]])
    for temperature, name in ((1.0, "teacher_ce_buckets"), (2.0, "teacher_ce_buckets_at_kd_temperature")):
        cached = _reader(tmp_path, dataclasses.replace(meta, temperature=temperature))
        assert cached.metric_names["teacher_ce"] == name


def test_a_hidden_state_cache_fits_any_kd_temperature_and_a_top_k_cache_only_its_own(tiny):
    """Hidden states do not depend on the temperature (the loss applies it to the logits it computes from them), so
    a hidden-state cache is not refused at another kd_temperature; a top-k cache holds p at its build's τ, and is."""
    from transformers import AutoTokenizer

    from fsdp_kd.errors import ConfigError
    from fsdp_kd.teacher_cache import CacheMeta, CacheRun, check_cache_fits
    from fsdp_kd.tokenized import tokenizer_fingerprint

    tokenizer = AutoTokenizer.from_pretrained(tiny["tok"])
    run = CacheRun("/cache", None, "pretrain", 2.0, "forward_kl", {})
    for mode, refused in (("hidden", False), ("topk", True)):
        meta = CacheMeta(mode=mode, slots=3, temperature=1.0, vocab_size=V, log_p_dtype="float32",
                         tokenizer=tokenizer_fingerprint(tokenizer), sources=[], settings={}, teacher="t",
                         samples_per_chunk=1, complete=True)
        if refused:
            with pytest.raises(ConfigError, match="kd_temperature 1, this run has 2"):
                check_cache_fits(meta, run, tokenizer, [])
        else:
            check_cache_fits(meta, run, tokenizer, [])


def test_a_cache_across_tokenizers_from_an_older_alignment_is_refused(tiny):
    """Its rows were placed by another alignment (before the end of turn was mapped by role, its end-of-turn rows are
    empty and the teacher's end of turn is in the rest bucket): training from it would mix two id maps."""
    from transformers import AutoTokenizer

    from fsdp_kd.cross_tokenizer import ALIGNMENT_VERSION
    from fsdp_kd.errors import ConfigError
    from fsdp_kd.teacher_cache import CacheMeta, CacheRun, check_cache_fits
    from fsdp_kd.tokenized import tokenizer_fingerprint

    tokenizer = AutoTokenizer.from_pretrained(tiny["tok"])
    run = CacheRun("/cache", None, "pretrain", 1.0, "forward_kl", {})
    for alignment, refused in ((None, True), (ALIGNMENT_VERSION - 1, True), (ALIGNMENT_VERSION, False)):
        meta = CacheMeta(mode="topk", slots=3, temperature=1.0, vocab_size=V, log_p_dtype="float32",
                         tokenizer=tokenizer_fingerprint(tokenizer), sources=[], settings={}, teacher="t",
                         samples_per_chunk=1, teacher_tokenizer="teacher", alignment=alignment, complete=True)
        if refused:
            with pytest.raises(ConfigError, match="older alignment of the two tokenizers"):
                check_cache_fits(meta, run, tokenizer, [])
        else:
            check_cache_fits(meta, run, tokenizer, [])


def test_a_top_k_cache_across_tokenizers_names_its_kl_a_lower_bound_below_the_teachers_vocabulary():
    """Its teacher's shared tokens past the top k are in the rest bucket: coarser buckets, so a KL at most the live
    run's kl_shared_buckets; only at k = V_t is it the same quantity, under the same name."""
    from fsdp_kd.teacher_cache import CACHE_MODES, CacheMeta

    def kl_name(slots):
        meta = CacheMeta(mode="topk", slots=slots, temperature=1.0, vocab_size=V, log_p_dtype="float32",
                         tokenizer="t", sources=[], settings={}, teacher="t", samples_per_chunk=1,
                         teacher_tokenizer="teacher", teacher_vocab_size=50)
        return CACHE_MODES["topk"].metric_names(meta)["kl"]

    assert kl_name(50) == "kl_shared_buckets" and kl_name(8) == "kl_shared_buckets_lower_bound"
