"""Several teachers in one run (`teachers`, routed by `dataset_teachers` or `teacher_key`): the routed loss equals
the dense per-teacher reference (loss, gradients, metrics); a micro-batch's routes put each teacher's rows where they
are, without a host sync; refusals before any model loads; resume refuses a changed routing; and train.py on 2 ranks
with a live and a cached teacher, each logging its own kl_<name>, and with two copies of one teacher, routed per
source or per record, training exactly like that teacher alone."""

import dataclasses
import math
import re

import pytest
import torch

from conftest import REPO, python_run, read_metrics, torchrun, train_args
from fsdp_kd.config import ConfigError, parse_config, resume_mismatches
from fsdp_kd.data import collate, collate_packed
from fsdp_kd.kernel import Head
from fsdp_kd.loss import LossSpec, loss_against
from fsdp_kd.records import Sample
from fsdp_kd.routed_teacher import Part, RoutedTargets
from fsdp_kd.step_metrics import SUMMED, no_sums, reduce_sums, summed
from fsdp_kd.targets import LiveTargets
from fsdp_kd.testing.reference import dense_distillation_loss

TRAIN = str(REPO / "train.py")
N, HS, HT, V = 31, 12, 20, 53


def test_the_routed_loss_equals_each_teachers_dense_loss_over_its_rows():
    """Two live teachers, each with its own kd_loss and τ, over interleaved rows: the loss, both gradients, the
    metrics and each teacher's own sums equal the sum of the dense reference over each teacher's rows."""
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(N, HS, generator=g).requires_grad_()
    w_s = (torch.randn(V, HS, generator=g) * 0.5).requires_grad_()
    teachers = [(torch.randn(N, HT, generator=g), torch.randn(V, HT, generator=g) * 0.5) for _ in range(2)]
    labels = torch.randint(0, V, (N,), generator=g)
    owner = torch.randint(0, 2, (N,), generator=g)
    spec = LossSpec(kd_coef=0.6, vocab_chunk=7, token_chunk=5)
    overrides = [{"divergence": "jsd", "temperature": 2.0}, {}]
    rows = [torch.nonzero(owner == t)[:, 0] for t in range(2)]

    def score(hidden, labels_, spec_, targets):
        return loss_against(hidden, w_s, labels_, spec_, V, targets)

    parts = [Part(t, rows[t], LiveTargets(teachers[t][0][rows[t]], Head(teachers[t][1], None)), overrides[t])
             for t in range(2)]
    loss, metrics = RoutedTargets(parts, 2).scored(score, h_s, labels, spec)
    grads = torch.autograd.grad(loss, (h_s, w_s))

    ref_loss, ref_rows, ref_metrics = 0.0, [], {}
    for t in range(2):
        part_loss, part = dense_distillation_loss(h_s[rows[t]], w_s, labels[rows[t]],
                                                  dataclasses.replace(spec, **overrides[t]), V,
                                                  teachers[t][0][rows[t]], teachers[t][1])
        ref_loss = ref_loss + part_loss
        ref_rows.append(part_loss.detach().double())
        ref_metrics = {k: ref_metrics.get(k, 0.0) + float(v) for k, v in part.items()}
    ref_grads = torch.autograd.grad(ref_loss, (h_s, w_s))
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name, value in ref_metrics.items():
        assert float(metrics[name]) == pytest.approx(value, rel=1e-5, abs=1e-4), name
    by_teacher = metrics["by_teacher"]
    assert by_teacher.shape == (2, len(SUMMED))
    for t in range(2):
        assert float(by_teacher[t, 0]) == pytest.approx(float(ref_rows[t]), rel=1e-5)
        assert float(by_teacher[t, SUMMED.index("tokens")]) == len(rows[t])
    torch.testing.assert_close(by_teacher.sum(0), summed(loss, metrics)[:len(SUMMED)])


def test_a_cross_tokenizer_teachers_part_is_its_one_teacher_loss_over_its_rows(tiny, pair_student, pair_teacher):
    """A teacher of another tokenizer and a live one, routed per sample: the cross-tokenizer part (its span rows after
    its aligned ones) scores the student's rows of its samples as a one-teacher batch of those samples alone does,
    the live part as the dense reference; loss, gradients and the micro-batch's left-out counts add up."""
    from transformers import AutoTokenizer

    from fsdp_kd.cross_tokenizer import UNALIGNED_SAMPLE, TokenBytes, shared_vocabulary
    from fsdp_kd.cross_vocab import CrossVocabTargets, VocabMap
    from test_cross_tokenizer_runs import _samples

    s_tok, t_tok = AutoTokenizer.from_pretrained(pair_student), AutoTokenizer.from_pretrained(pair_teacher)
    texts = ["abcd:ABCDEF", "hgfe:GHA", "abab:CDCDCDAB", "dcba:BCDE", "cdcd:EFGHABCDA",
             "hgfbaGHA"]  # the last: a group of several tokens from the prompt into the response, left out
    # the live teacher's samples hold no teacher tokens, as routed per record (`data._routes`), not counted left out
    none_of_its_own = dict(teacher_ids=[], teacher_spans=[])
    samples = [dataclasses.replace(s, teacher=t) if t == 0 else dataclasses.replace(
        Sample(s.input_ids, s.targets), teacher=t, teacher_positions=[UNALIGNED_SAMPLE] * len(s.input_ids),
        **none_of_its_own) for s, t in zip(_samples(s_tok, t_tok, texts), (0, 1, 0, 1, 1, 0))]
    batch = collate(samples, 0, teachers=(True, False))
    alone = collate([s for s in samples if s.teacher == 0], 0)  # the one-teacher batch of its samples
    cross, live = batch.routes
    assert alone.spans.teacher_rows > 0 and cross.batch.teacher.target_rows.shape[0] > cross.count
    assert torch.equal(cross.batch.teacher.target_ids, alone.teacher.target_ids)
    assert live.batch.teacher is None and batch.teacher is None  # routed: its own tokens in its route alone
    assert batch.left_out == alone.left_out and sum(alone.left_out) > 0
    stand_in = collate([s for s in samples if s.teacher == 1], 0, teachers=(True, False)).routes[0]
    assert stand_in.count == 0 and stand_in.batch.teacher.target_rows.numel() == 0  # none of another's tokens

    g = torch.Generator().manual_seed(2)
    vs, vt = len(s_tok), len(t_tok)
    h_s = torch.randn(batch.trainable_tokens, HS, generator=g).requires_grad_()
    w_s = (torch.randn(vs, HS, generator=g) * 0.5).requires_grad_()
    embed, w_t = torch.randn(vt, HT, generator=g), torch.randn(vt, HT, generator=g) * 2
    live_hidden, w_live = torch.randn(live.count, HT, generator=g), torch.randn(vs, HT, generator=g)
    shared = shared_vocabulary(TokenBytes.of(s_tok), TokenBytes.of(t_tok))
    vmap = VocabMap(torch.from_numpy(shared.student_ids), torch.from_numpy(shared.teacher_ids), vs, vt)

    def teacher_targets(mb):  # a teacher "model" of its own tokens: each row's hidden state from the token it reads
        hidden = embed[mb.teacher.input_ids.flatten()[mb.teacher.target_rows]]
        return CrossVocabTargets(hidden, Head(w_t), mb.teacher.target_ids, vmap, 0.5, 8, mb.aligned, mb.spans)

    spec = LossSpec(kd_coef=0.6, vocab_chunk=7, token_chunk=5)
    parts = [Part(0, cross.rows, teacher_targets(cross.batch), {}),
             Part(1, live.rows, LiveTargets(live_hidden, Head(w_live, None)), {"divergence": "jsd"})]
    loss, metrics = RoutedTargets(parts, 2).scored(
        lambda h, labels, spec_, targets: loss_against(h, w_s, labels, spec_, vs, targets), h_s, batch.target_ids,
        spec)
    grads = torch.autograd.grad(loss, (h_s, w_s))

    assert torch.equal(batch.target_ids[cross.rows], alone.target_ids)
    ref_cross, cross_metrics = loss_against(h_s[cross.rows], w_s, alone.target_ids, spec, vs, teacher_targets(alone))
    ref_live, _ = dense_distillation_loss(h_s[live.rows], w_s, batch.target_ids[live.rows],
                                          dataclasses.replace(spec, divergence="jsd"), vs, live_hidden, w_live)
    ref_grads = torch.autograd.grad(ref_cross + ref_live, (h_s, w_s))
    assert float(loss.detach()) == pytest.approx(float((ref_cross + ref_live).detach()), rel=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    row = metrics["by_teacher"][0]
    assert float(row[SUMMED.index("span_tokens")]) == float(cross_metrics["span_tokens"]) > 0
    assert float(row[SUMMED.index("kl")]) == pytest.approx(float(cross_metrics["kl"]), rel=1e-5)


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.0, 1.0)])
def test_a_weighted_mixture_is_the_weighted_sum_of_each_teachers_dense_divergence(weights):
    """Every row to both teachers (their own kd_loss and τ): loss = (1 - c)·CE + c·Σ w_t·D_t, gradients alike; the
    run's kd is the weighted sum, its CE and token count the rows' once, and each teacher's sums are its own."""
    g = torch.Generator().manual_seed(1)
    h_s = torch.randn(N, HS, generator=g).requires_grad_()
    w_s = (torch.randn(V, HS, generator=g) * 0.5).requires_grad_()
    teachers = [(torch.randn(N, HT, generator=g), torch.randn(V, HT, generator=g) * 0.5) for _ in range(2)]
    labels = torch.randint(0, V, (N,), generator=g)
    spec = LossSpec(kd_coef=0.6, vocab_chunk=7, token_chunk=5)
    overrides = [{"divergence": "reverse_kl", "temperature": 2.0}, {"divergence": "jsd"}]
    parts = [Part(t, None, LiveTargets(teachers[t][0], Head(teachers[t][1], None)), overrides[t], weights[t],
                  owns_rows=t == min(i for i, w in enumerate(weights) if w > 0))
             for t in range(2) if weights[t] > 0]
    loss, metrics = RoutedTargets(parts, 2).scored(
        lambda hidden, labels_, spec_, targets: loss_against(hidden, w_s, labels_, spec_, V, targets),
        h_s, labels, spec)
    grads = torch.autograd.grad(loss, (h_s, w_s))

    ce, _ = dense_distillation_loss(h_s, w_s, labels, spec, V)
    kd = [dense_distillation_loss(h_s, w_s, labels, dataclasses.replace(spec, kd_coef=1.0, **overrides[t]), V,
                                  *teachers[t]) for t in range(2)]
    ref = (1 - spec.kd_coef) * ce + spec.kd_coef * sum(w * part for w, (part, _) in zip(weights, kd))
    ref_grads = torch.autograd.grad(ref, (h_s, w_s))
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(metrics["ce"]) == pytest.approx(float(ce.detach()), rel=1e-5)
    assert float(metrics["tokens"]) == N
    assert float(metrics["kd"]) == pytest.approx(sum(w * float(m["kd"]) for w, (_, m) in zip(weights, kd)), rel=1e-5)
    for t in range(2):
        row = metrics["by_teacher"][t]
        if weights[t] == 0:
            assert not row.any()  # a teacher of weight 0 is not run
        else:
            assert float(row[SUMMED.index("kl")]) == pytest.approx(float(kd[t][1]["kl"]), rel=1e-5)
            assert float(row[SUMMED.index("tokens")]) == N


def test_each_teachers_sums_read_as_its_own_metrics_in_one_transfer():
    sums = no_sums(torch.device("cpu"), 2)
    assert sums.numel() == 3 * len(SUMMED)
    row = torch.arange(len(SUMMED), dtype=torch.float64) + 1
    sums += torch.cat([row + row, row, row])
    out, extra = reduce_sums(sums, {"kl": "kl_buckets", "teacher_ce": None},
                             [torch.tensor([7.0])], {"a": {}, "b": {"kl": "kl_buckets", "teacher_ce": None}})
    def value(k):  # each teacher's row holds 1, 2, ... in SUMMED's order; the run's, twice that
        return SUMMED.index(k) + 1

    assert extra == [7.0]
    assert out["kl_buckets"] == pytest.approx(2 * value("kl") / (2 * value("kd_tokens")))  # per token with a KD term
    assert out["kl_a"] == out["kl_b"] == pytest.approx(value("kl") / value("kd_tokens"))
    assert out["ce_a"] == pytest.approx(value("ce") / value("tokens"))
    assert "teacher_ce_a" in out and "teacher_ce_b" not in out and out["tokens_b"] == value("tokens")


@pytest.mark.parametrize("packed", [False, True])
def test_a_micro_batchs_routes_hold_each_teachers_samples_at_its_rows(packed):
    """Each route's batch is its teacher's samples alone, whose target rows are the whole batch's at `rows`; a
    teacher with no sample gets a stand-in with no rows."""
    samples = [Sample(list(range(1, n + 1)), [-100] * (n // 2) + list(range(50, 50 + n - n // 2)), teacher=t)
               for n, t in ((5, 0), (8, 2), (3, 0), (6, 2), (4, 0))]
    routes = (False,) * 3  # three teachers, none reading its own tokens
    batch = collate_packed(samples, 12, 0, teachers=routes) if packed else collate(samples, 0, teachers=routes)
    assert [r.count for r in batch.routes] == [sum(s.trainable_tokens for s in samples if s.teacher == t)
                                               for t in range(3)]
    for route in batch.routes:
        assert torch.equal(batch.target_ids[route.rows], route.batch.target_ids)
    assert batch.routes[1].batch.trainable_tokens == 0 and batch.routes[1].rows.numel() == 0
    assert sorted(torch.cat([r.rows for r in batch.routes]).tolist()) == list(range(batch.trainable_tokens))
    assert collate(samples, 0).routes == []  # one teacher: no routes, the batch as before


YAML = """pretrain: s
dataset: a.jsonl,b.jsonl
kd_coef: 0.5
teachers:
  math: {{teacher_model: t1, kd_temperature: 2}}
  chat: {{teacher_cache: c1}}
{extra}"""


def config(tmp_path, extra="dataset_teachers: math,chat\n", *flags):
    path = tmp_path / "run.yaml"
    path.write_text(YAML.format(extra=extra))
    return parse_config(["--config", str(path), *flags])


def test_teachers_and_their_routing_are_read_with_each_teachers_own_keys(tmp_path):
    cfg = config(tmp_path)
    assert cfg.teachers == {"math": {"teacher_model": "t1", "kd_temperature": 2.0}, "chat": {"teacher_cache": "c1"}}
    from fsdp_kd.routing import loss_overrides, source_teachers, teacher_configs
    own = teacher_configs(cfg)
    assert own["math"].teacher_model == "t1" and own["math"].kd_temperature == 2.0 and own["math"].teachers is None
    assert own["chat"].teacher_cache == "c1" and own["chat"].kd_temperature == 1.0
    assert source_teachers(cfg) == (0, 1) and loss_overrides(cfg) == {"math": {"temperature": 2.0}, "chat": {}}


@pytest.mark.parametrize("extra, flags, message", [
    ("dataset_teachers: math,physics\n", (), r"run.yaml:7: source b.jsonl is routed to 'physics', which no teacher "
                                             r"has; the teachers are math, chat"),
    ("dataset_teachers: math\n", (), r"run.yaml:7: dataset_teachers names 1 teachers for 2 dataset sources"),
    ("", (), r"run.yaml:4: 2 teachers but no routing: set dataset_teachers"),
    ("dataset_teachers: math,chat\n", ("--teachers", "{math: {teacher_model: t}, chat: {teacher_offload: true}}"),
     r"command line --teachers: key teachers.chat: give the teacher a teacher_model or a teacher_cache"),
    ("dataset_teachers: math,chat\n", ("--teachers", "{math: {teacher_model: t, cache_kk: 3}}"),
     r"key teachers.math: unknown key 'cache_kk'"),
    ("dataset_teachers: math,chat\n", ("--teachers", "{math: {teacher_cache: c, teacher_ranks: 1}, "
                                                     "chat: {teacher_model: t}}"),
     r"command line --teachers teachers.math.teacher_ranks: teacher_ranks runs the teacher_model on ranks of its own"),
    ("dataset_teachers: math,chat\nteacher_ranks: 1\n", (), r"run.yaml:8: teacher_ranks is set with teachers: a "
                                                           r"teacher on ranks of its own takes them as its own key"),
    ("teacher_weights: 1,1\n", ("--teachers", "{math: {teacher_model: t}, chat: {teacher_model: t, "
                                             "cross_tokenizer: true}}"),
     r"run.yaml:7: teacher_weights with teachers.chat.cross_tokenizer: a mixture needs that teacher's own tokens on "
     r"every sample"),
    ("dataset_teachers: math,chat\ncross_tokenizer: true\n", (), r"run.yaml:8: cross_tokenizer is set with teachers: "
                                                                 r"set it per teacher"),
    ("dataset_teachers: math,chat\nteacher_model: t\n", (), r"run.yaml:8: teacher_model is set with teachers: each "
                                                            r"teacher names its own under teachers"),
    ("dataset_teachers: math,chat\n", ("--teachers", "{math: {teacher_model: t, teacher_ranks: 1}, chat: "
                                                     "{teacher_model: t, teacher_sharding_strategy: hybrid_shard}}"),
     r"command line --teachers: teachers.chat is sharded hybrid_shard beside teachers.math.teacher_ranks: .*; set "
     r"teachers.chat.teacher_sharding_strategy full_shard$"),
    ("dataset_teachers: math,chat\nteacher_sharding_strategy: hybrid_shard\n",
     ("--teachers", "{math: {teacher_model: t, teacher_ranks: 1}, chat: {teacher_model: t}}"),
     r"run.yaml:8: teachers.chat is sharded hybrid_shard beside teachers.math.teacher_ranks: .*; set "
     r"teacher_sharding_strategy full_shard$"),
    ("dataset_teachers: math,chat\n", ("--teachers", "{math: {teacher_model: t, teacher_ranks: 1, "
                                                     "teacher_sharding_strategy: hybrid_shard}, chat: {teacher_cache: c}}"),
     r"teachers.math.teacher_ranks: teacher_ranks shards each side over its own ranks \(full_shard\); hybrid_shard"),
    ("teacher_weights: 1,0\n", ("--teachers", "{math: {teacher_model: t}, chat: {teacher_model: t, teacher_ranks: 1}}"),
     r"run.yaml:7: teacher_weights gives teachers.chat weight 0, but it holds ranks of its own"),
    ("dataset_teachers: math,chat\n", ("--teachers", "{math: {teacher_model: t, kd_loss: kl}, chat: {teacher_model: "
                                                     "t}}"),
     r"command line --teachers teachers.math.kd_loss: kd_loss must be one of"),
])
def test_a_routing_that_cannot_run_is_refused_with_where_and_key(tmp_path, extra, flags, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, extra, *flags)


@pytest.mark.parametrize("world, ranks, message", [
    (3, {"math": 1, "chat": 1}, None),  # 1 student rank, then math's rank, then chat's
    (3, {"math": 1, "chat": 2}, r"run.yaml:4: key teachers.math.teacher_ranks: 3 teacher ranks of 3 leave 0 student "
                                r"ranks, which must be a positive multiple of 1"),
    (4, {"math": 1, "chat": 2}, r"run.yaml:4: key teachers.chat.teacher_ranks: 3 teacher ranks of 4 leave 1 student "
                                r"ranks, which must be a positive multiple of 2 .*; change teachers.chat.teacher_ranks "
                                r"or --nproc_per_node"),
    (1, {"math": 1}, r"run.yaml:4: key teachers.math.teacher_ranks: 1 teacher ranks of 1 leave 0 student ranks"),
])
def test_teachers_on_ranks_of_their_own_that_the_world_cannot_split_are_refused(tmp_path, monkeypatch, world, ranks,
                                                                                message):
    """Each teacher's block follows the student ranks, in the order of teachers; the student ranks must be a positive
    multiple of every block, checked against torchrun's WORLD_SIZE as the config is read (a plain process: 1)."""
    from fsdp_kd.distributed import plan_split
    from fsdp_kd.routing import rank_blocks

    if world == 1:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", str(world))
    path = tmp_path / "run.yaml"
    path.write_text("pretrain: s\ndataset: a.jsonl,b.jsonl\ndataset_teachers: math,chat\nteachers:\n" + "".join(
        f"  {name}: {{teacher_model: t{f', teacher_ranks: {ranks[name]}' if name in ranks else ''}}}\n"
        for name in ("math", "chat")))
    if message is not None:
        with pytest.raises(ConfigError, match=message):
            parse_config(["--config", str(path)])
        return
    cfg = parse_config(["--config", str(path)])
    assert rank_blocks(cfg) == ranks
    assert plan_split(world, rank_blocks(cfg)) == ([0], {"math": [1], "chat": [2]})


@pytest.mark.parametrize("extra, message", [
    ("teacher_weights: 0.5,0.5\ndataset_teachers: math,chat\n", r"run.yaml:7: dataset_teachers and teacher_weights "
                                                                r"are each a routing"),
    ("teacher_weights: 1,-1\n", r"run.yaml:7: teacher_weights needs one non-negative weight per teacher"),
    ("teacher_weights: 1\n", r"run.yaml:7: teacher_weights needs one non-negative weight per teacher \(math, chat\)"),
    ("teacher_key: domain\n", None),
    ("teacher_weights: 3,1\n", None),
])
def test_a_run_is_routed_one_way(tmp_path, extra, message):
    if message is None:
        config(tmp_path, extra)
    else:
        with pytest.raises(ConfigError, match=message):
            config(tmp_path, extra)


def test_one_teacher_of_teachers_routes_an_eval_source_to_itself(tmp_path):
    from fsdp_kd.routing import row_routing

    cfg = parse_config(["--pretrain", "s", "--dataset", "a.jsonl", "--eval_dataset", "e.jsonl", "--teachers",
                        "{x: {teacher_model: t, cross_tokenizer: true}}"])
    routing = row_routing(cfg)
    assert routing.teachers(None, [None] * 3).tolist() == [0, 0, 0]
    assert routing.own_tokens(None, {"x": "its tokens"}) == routing.own_tokens(0, {"x": "its tokens"}) == "its tokens"


@pytest.mark.parametrize("teachers, routed", [("{x: {teacher_cache: c}}", {"x": ["a", "b", "e"]}),
                                                ("{x: {teacher_cache: c}, y: {teacher_cache: d}}",
                                                 {"x": ["a"], "y": ["b"]})])
def test_each_teacher_checks_the_sources_routed_to_it_and_a_lone_one_the_eval_source(teachers, routed):
    """Start-up checks each teacher (say, that its cache holds the data) against its own sources: with one teacher,
    the eval source too, which would otherwise fail only at the first evaluation."""
    from types import SimpleNamespace

    from fsdp_kd.routed_teacher import RoutedTeachers
    from fsdp_kd.routing import row_routing

    eval_source = ["--eval_dataset", "e.jsonl"] if len(routed) == 1 else ["--dataset_teachers", "x,y"]
    cfg = parse_config(["--pretrain", "s", "--dataset", "a.jsonl,b.jsonl", *eval_source, "--teachers", teachers])
    checked = {}

    def member(name):
        return SimpleNamespace(retokenize=None, vocab_size=V, metric_names={},
                               check=lambda tokenizer, sources, env: checked.update({name: sources}))

    routed_teachers = RoutedTeachers({n: member(n) for n in routed}, dict.fromkeys(routed, "teacher_cache"),
                                     dict.fromkeys(routed, {}), row_routing(cfg))
    sources = ["a", "b", "e"] if len(routed) == 1 else ["a", "b"]
    routed_teachers.check(None, sources, SimpleNamespace(for_teacher=lambda name: None))
    assert checked == routed


def test_resume_refuses_a_changed_routing_naming_it(tmp_path):
    saved = config(tmp_path).to_dict()
    assert resume_mismatches(saved, config(tmp_path).to_dict()) == []
    swapped = config(tmp_path, "dataset_teachers: chat,math\n").to_dict()
    assert resume_mismatches(saved, swapped) == ["dataset_teachers ('math,chat' -> 'chat,math')"]
    other = config(tmp_path, "dataset_teachers: math,chat\n", "--teachers",
                   "{math: {teacher_model: t2}, chat: {teacher_cache: c1}}").to_dict()
    assert [m.split(" ")[0] for m in resume_mismatches(saved, other)] == ["teachers"]


def _two_sources(tiny, tmp_path):
    """The tiny task's training records cut into two sources."""
    from fsdp_kd.testing.tiny import read_jsonl, write_jsonl

    records = read_jsonl(tiny["train"])
    paths = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    write_jsonl(paths[0], records[:128])
    write_jsonl(paths[1], records[128:])
    return paths


def _teachers_yaml(path, teachers: dict, routing: str):
    import yaml

    path.write_text(yaml.safe_dump({"teachers": teachers, "dataset_teachers": routing}))
    return str(path)


def served_by(proc, name: str) -> list[str]:
    """What the block of teacher `name` says it served, per rank, as its first rank prints it."""
    return re.findall(rf"teacher ranks of teacher '{name}': served (\d+) micro-batches", proc.stdout)


def micro_batches_per_student(steps: int, batch: int, micro: int, students: int, evaluations: int,
                              held_out: int) -> int:
    """The micro-batches of `micro` samples each student rank runs: its share of `steps` global batches of `batch`
    samples, then of `evaluations` passes over `held_out` samples."""
    return steps * batch // (students * micro) + evaluations * math.ceil(math.ceil(held_out / students) / micro)


LAYOUTS = {"co_located": "", "each_on_a_rank_of_its_own": "ab", "one_on_a_rank_of_its_own": "a",
           "cross_tokenizer": "", "cross_tokenizer_one_on_a_rank_of_its_own": "a"}  # the copies on ranks of their own


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_copies_of_one_teacher_routed_per_source_train_exactly_like_that_teacher(tiny, tmp_path, request, layout):
    """On 2 ranks (a live teacher is collective there: it runs on stand-ins where a rank has none of its rows), the
    routed run's every logged figure equals the one-teacher run's, and each copy's figures are its own rows'.

    The copies named in `LAYOUTS` each run on a rank of its own (`teachers.<name>.teacher_ranks: 1`), after the
    student ranks: both (1 student rank, as the one-teacher run it equals: a world of 3), or one beside the other
    co-located (2 student ranks, a world of 3), whose rank serves both student ranks in turn. Such a copy runs on
    every micro-batch of every student rank (a stand-in where it has none of its rows). Across tokenizers (the pair
    student, the pair teacher) each source is tokenized with its teacher's tokens, the left-out counts are the
    routes' together, and one sample per micro-batch makes the other copy run on a stand-in; one such copy may run on
    a rank of its own."""
    own_ranks, across = LAYOUTS[layout], layout.startswith("cross_tokenizer")
    sources = ",".join(_two_sources(tiny, tmp_path))
    common = dict(dataset=sources, eval_holdout_ratio=0.1, eval_steps=2, logging_steps=1, kd_temperature=2.0)
    own = dict(teacher_model=tiny["teacher"])
    if across:
        own = dict(teacher_model=request.getfixturevalue("pair_teacher"), cross_tokenizer="true")
        common.update(pretrain=request.getfixturevalue("pair_student"), max_steps=3, eval_steps=3,
                      micro_train_batch_size=1, train_batch_size=4)  # each micro-batch a stand-in for one copy
    students = 1 if own_ranks == "ab" else 2
    torchrun([TRAIN, *train_args(tiny, tmp_path / "one", **common, **own)], nproc=students)
    routed = _teachers_yaml(tmp_path / "routed.yaml", {n: {**own, **({"teacher_ranks": 1} if n in own_ranks else {})}
                                                       for n in "ab"}, "a,b")
    proc = torchrun([TRAIN, "--config", routed, *train_args(tiny, tmp_path / "two", teacher_model=None, **common)],
                    nproc=students + len(own_ranks))
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == (4 if across else 6)
    kl = "kl_shared_buckets" if across else "kl"
    for a, b in zip(one, two):
        for name, value in a.items():
            if name not in ("tokens_per_sec", "peak_mem_gb"):
                assert b[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, a, b)
        prefix = "eval_" if "eval_loss" in a else ""
        tokens = {n: b[f"{prefix}tokens_{n}"] for n in "ab"}
        assert tokens["a"] > 0 and tokens["b"] > 0 and tokens["a"] + tokens["b"] == b[f"{prefix}tokens"]
        kd_tokens = {n: b[f"{prefix}kd_tokens_{n}"] for n in "ab"}
        mixed = sum(b[f"{prefix}kl_{n}"] * kd_tokens[n] for n in "ab") / b[f"{prefix}kd_tokens"]
        assert mixed == pytest.approx(b[f"{prefix}{kl}"], rel=1e-5)
    if across:  # the figures compared above include the span term's and the left-out counts
        assert sum(m["kd_span_tokens"] for m in one if "loss" in m) > 0 and "kd_left_out_unaligned_sample" in one[0]
    for name in "ab":  # the start-up summary says where each lives
        kind = "teacher_ranks" if name in own_ranks else "cross_tokenizer" if across else "live"
        runs = "every micro-batch (collective)" if name in own_ranks or students > 1 else "its rows only"
        assert f"teacher '{name}' ({kind}; 1 source(s), runs on {runs}):" in proc.stdout, proc.stdout[-3000:]
    served = {n: served_by(proc, n) for n in "ab"}
    held_out = int(re.search(r"held out (\d+) training samples", proc.stdout)[1])
    steps, evaluations, batch, micro = (3, 1, 4, 1) if across else (4, 2, 16, 4)
    per_student = micro_batches_per_student(steps, batch, micro, students, evaluations, held_out)
    side = "1 student rank (global rank 0 on " if students == 1 else f"{students} student ranks (global ranks 0-1 on "
    for rank, name in enumerate(own_ranks, start=students):  # its rank ran every micro-batch of every student rank
        assert f"teacher on ranks of its own: {side}" in proc.stdout, proc.stdout[-3000:]
        assert f"1 teacher rank (global rank {rank} on " in proc.stdout
        assert served[name] == [str(students * per_student)], served
    assert all(not served[n] for n in "ab" if n not in own_ranks)


def same_figures(one_dir, two_dir) -> tuple[list[dict], list[dict]]:
    """Both runs' metrics.jsonl records, every figure of the first (but speed and memory) equal in the second."""
    one, two = read_metrics(one_dir), read_metrics(two_dir)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for name, value in a.items():
            if name not in ("tokens_per_sec", "peak_mem_gb"):
                assert b[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, a, b)
    return one, two


@pytest.mark.parametrize("b_ranks", [0, 1], ids=["co_located", "b_on_a_rank_of_its_own"])
def test_a_mixture_of_two_copies_of_one_teacher_trains_exactly_like_that_teacher(tiny, tmp_path, b_ranks):
    """teacher_weights on 2 student ranks: Σ w_t·D(p ‖ q) with p the same teacher is D(p ‖ q), so every logged figure
    of the run's equals the one-teacher run's; each copy's own KL is the whole KL, over every token. Copy b may run
    on a rank of its own (a world of 3), scoring every row of every micro-batch."""
    common = dict(eval_dataset=tiny["eval"], eval_steps=4, logging_steps=2, kd_temperature=2.0)
    torchrun([TRAIN, *train_args(tiny, tmp_path / "one", **common)])
    mixed = tmp_path / "mixed.yaml"
    teacher = tiny["teacher"]
    mixed.write_text(f"teachers: {{a: {{teacher_model: {teacher}}}, b: {{teacher_model: {teacher}"
                     f"{', teacher_ranks: 1' if b_ranks else ''}}}}}\nteacher_weights: 1,3\n")
    proc = torchrun([TRAIN, "--config", str(mixed), *train_args(tiny, tmp_path / "two", teacher_model=None, **common)],
                    nproc=2 + b_ranks)
    if b_ranks:  # its rank ran every micro-batch of both student ranks: 4 steps of 16 in 4s, one evaluation
        assert "teacher 'b' (teacher_ranks; weight 0.75 on every token, runs on every micro-batch" in proc.stdout
        held_out = len(open(tiny["eval"]).readlines())
        served = served_by(proc, "b")
        assert served == [str(2 * micro_batches_per_student(4, 16, 4, 2, 1, held_out))], served
    one, two = same_figures(tmp_path / "one", tmp_path / "two")
    for a, b in zip(one, two):
        prefix = "eval_" if "eval_loss" in a else ""
        for copy in "ab":
            assert b[f"{prefix}kl_{copy}"] == pytest.approx(a[f"{prefix}kl"], rel=1e-5)
            assert b[f"{prefix}tokens_{copy}"] == a[f"{prefix}tokens"]


def _routed_records(tiny, path, name_of):
    """The tiny task's training records, each naming its teacher under `domain` (`name_of(i)`; None: no field)."""
    from fsdp_kd.testing.tiny import read_jsonl, write_jsonl

    records = read_jsonl(tiny["train"])
    write_jsonl(str(path), [{**r, **({} if name_of(i) is None else {"domain": name_of(i)})}
                            for i, r in enumerate(records)])
    return str(path)


def test_two_copies_of_one_teacher_routed_per_record_train_exactly_like_that_teacher(tiny, tmp_path):
    """Per record (teacher_key), on 2 ranks with an eval source whose records name their teachers too: every logged
    figure equals the one-teacher run's, and the copies' token counts are their records'."""
    data = _routed_records(tiny, tmp_path / "train.jsonl", lambda i: "ab"[i % 3 == 0])
    held = _routed_records({"train": tiny["eval"]}, tmp_path / "eval.jsonl", lambda i: "ab"[i % 2])
    common = dict(dataset=data, eval_dataset=held, eval_steps=4, logging_steps=2, kd_loss="reverse_kl")
    torchrun([TRAIN, *train_args(tiny, tmp_path / "one", **common)])
    routed = tmp_path / "routed.yaml"
    routed.write_text(f"teachers: {{a: {{teacher_model: {tiny['teacher']}}}, b: {{teacher_model: {tiny['teacher']}}}}}"
                      "\nteacher_key: domain\n")
    torchrun([TRAIN, "--config", str(routed), *train_args(tiny, tmp_path / "two", teacher_model=None, **common)])
    one, two = same_figures(tmp_path / "one", tmp_path / "two")
    assert two[-1]["eval_tokens_a"] > 0 and two[-1]["eval_tokens_b"] > 0
    for record in two[:2]:
        assert record["tokens_a"] > 0 and record["tokens_b"] > 0
        assert record["tokens_a"] + record["tokens_b"] == record["tokens"]


def test_routed_per_record_each_record_gets_its_teachers_tokens_and_the_cache_key_names_them(tiny, pair_student,
                                                                                            pair_teacher, tmp_path):
    """teacher_key with a teacher of another tokenizer ('x') and one of the student's ('y'): each record of x holds
    x's tokens of it, computed as for a run of x alone, each of y none; a cache tokenized for another routing of the
    names is another cache; a micro-batch lays out x's tokens in x's route alone."""
    from transformers import AutoTokenizer

    from fsdp_kd.config import TrainConfig, token_settings
    from fsdp_kd.cross_tokenizer import TeacherTokenization, TokenBytes
    from fsdp_kd.data import RoutedTo
    from fsdp_kd.tokenized import open_tokenized

    s_tok, t_tok = AutoTokenizer.from_pretrained(pair_student), AutoTokenizer.from_pretrained(pair_teacher)
    data = _routed_records({"train": tiny["eval"]}, tmp_path / "train.jsonl", lambda i: "xy"[i % 3 == 0])
    x = TeacherTokenization(TokenBytes.of(s_tok), TokenBytes.of(t_tok), t_tok)
    settings = token_settings(TrainConfig(pretrain="s", dataset=data))

    def tokenized(routing):
        return open_tokenized(data, "train", None, settings, str(tmp_path / "cache"), s_tok, 0, log=lambda *a: None,
                              teacher=routing, teacher_key="domain")

    table = tokenized({"x": x})
    names = table.teachers(("x", "y"), "domain")
    assert 0 < names.sum() < len(table)
    for i in range(len(table)):
        sample = table[i]
        assert sample.teacher_ids == (x.fields(sample.input_ids)["teacher_ids"] if names[i] == 0 else [])
    assert tokenized({"x": x}).directory == table.directory
    assert tokenized({"y": x}).directory != table.directory
    batch = collate([RoutedTo(table, names)[i] for i in range(6)], 0, teachers=(True, False))
    assert batch.routes[0].batch.teacher is not None and batch.routes[1].batch.teacher is None
    assert batch.routes[0].count + batch.routes[1].count == batch.trainable_tokens


@pytest.mark.parametrize("name_of, message", [
    (lambda i: None if i == 4 else "a", r"train.jsonl:5: missing key 'domain' \(teacher_key\)"),
    (lambda i: "physics" if i == 6 else "a", r"train.jsonl:7: key 'domain' names the teacher 'physics', which no "
                                             r"teacher has; the teachers are a, b"),
])
def test_a_record_whose_teacher_is_missing_is_refused_before_any_model_loads(tiny, tmp_path, name_of, message):
    data = _routed_records(tiny, tmp_path / "train.jsonl", name_of)
    routed = tmp_path / "routed.yaml"
    teacher = tiny["teacher"]
    routed.write_text(f"teachers: {{a: {{teacher_model: {teacher}}}, b: {{teacher_model: {teacher}}}}}\n")
    proc = python_run([TRAIN, "--config", str(routed), *train_args(tiny, tmp_path / "out", teacher_model=None,
                                                                   dataset=data, teacher_key="domain",
                                                                   data_cache_dir=str(tmp_path / "tokenized"))])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_a_cached_and_a_live_teacher_in_one_run_each_log_their_own_kl(tiny, tmp_path):
    """The bar's job: two sources, one taught live, the other from a cache of another teacher (built on that source
    alone); metrics.jsonl carries kl_<name> for both, and the start-up summary says where each lives."""
    a, b = _two_sources(tiny, tmp_path)
    cache = tmp_path / "cache"
    torchrun(["-m", "fsdp_kd.cache_teacher", *train_args(tiny, tmp_path / "unused", dataset=b,
                                                         teacher_model=tiny["qwen_teacher"],
                                                         teacher_cache=str(cache), cache_chunk_samples=64)])
    routed = _teachers_yaml(tmp_path / "routed.yaml", {"live": {"teacher_model": tiny["teacher"]},
                                                      "cached": {"teacher_cache": str(cache)}}, "live,cached")
    proc = torchrun([TRAIN, "--config", routed, *train_args(tiny, tmp_path / "run", teacher_model=None,
                                                            dataset=f"{a},{b}", eval_holdout_ratio=0.1,
                                                            eval_steps=4)])
    assert "teacher 'live' (live; 1 source(s), runs on every micro-batch (collective)):" in proc.stdout
    assert "teacher 'cached' (cache; 1 source(s), runs on its rows only):" in proc.stdout
    assert "rows (k = 64) from the cache" in proc.stdout
    metrics = read_metrics(tmp_path / "run")
    for record, prefix in each_teachers_own_kl(metrics, ("live", "cached")):
        assert f"{prefix}kl" not in record  # the live KL and a cache's KL over buckets are not one figure
    assert any("eval_kl_cached" in record for record in metrics)


def each_teachers_own_kl(metrics: list[dict], names) -> list[tuple[dict, str]]:
    """Each record of metrics.jsonl and its prefix (eval_ or none), having checked that every teacher of `names`
    logged a finite kl_<name> over some tokens of its own there."""
    out = []
    for record in metrics:
        prefix = "eval_" if "eval_loss" in record else ""
        for name in names:
            assert math.isfinite(record[f"{prefix}kl_{name}"]) and record[f"{prefix}tokens_{name}"] > 0
        out.append((record, prefix))
    return out


@pytest.mark.parametrize("per_record", [False, True], ids=["per_source", "per_record_packed"])
def test_a_teacher_of_another_tokenizer_and_a_live_one_in_one_run_each_log_their_own_kl(tiny, pair_teacher, tmp_path,
                                                                                         per_record):
    """On 2 ranks, samples taught by the pair teacher across tokenizers and by the live teacher of the student's
    tokenizer, by source, or by record (packed, with an eval source whose records name their teachers): each logs
    kl_<name> over its own rows, the span term's count is the cross teacher's, and the run-wide KL (not one figure
    across the two) is not logged."""
    import yaml

    teachers = {"cross": {"teacher_model": pair_teacher, "cross_tokenizer": True},
                "live": {"teacher_model": tiny["teacher"]}}
    if per_record:
        routing = {"teacher_key": "domain"}
        data = dict(dataset=_routed_records(tiny, tmp_path / "train.jsonl", lambda i: ["cross", "live"][i % 3 == 0]),
                    eval_dataset=_routed_records({"train": tiny["eval"]}, tmp_path / "eval.jsonl",
                                                 lambda i: ["cross", "live"][i % 2]),
                    packing_samples="true", max_len=64)
    else:
        routing = {"dataset_teachers": "cross,live"}
        data = dict(dataset=",".join(_two_sources(tiny, tmp_path)), eval_holdout_ratio=0.1)
    (tmp_path / "routed.yaml").write_text(yaml.safe_dump({"teachers": teachers, **routing}))
    proc = torchrun([TRAIN, "--config", str(tmp_path / "routed.yaml"),
                     *train_args(tiny, tmp_path / "run", teacher_model=None, max_steps=2, eval_steps=2, **data)])
    assert re.search(r"teacher 'cross' \(cross_tokenizer; .*, runs on every micro-batch \(collective\)\):", proc.stdout)
    assert "align one to one with a teacher token" in proc.stdout
    metrics = read_metrics(tmp_path / "run")
    for record, prefix in each_teachers_own_kl(metrics, ("cross", "live")):
        assert record[f"{prefix}span_tokens_cross"] == record[f"{prefix}kd_span_tokens"]
        assert f"{prefix}kl" not in record and f"{prefix}span_tokens_live" not in record
    assert sum(record.get("span_tokens_cross", 0) for record in metrics) > 0
    assert any("eval_kl_cross" in record for record in metrics)


def test_routing_a_micro_batch_to_its_teachers_does_not_sync():
    """The routes are laid out on the host at collate time and moved with the batch; splitting the rows by teacher
    and scoring each part reads nothing back from the device."""
    from fsdp_kd.testing.profiling import SyncDetector

    device = torch.device("cpu")  # the compute device as the code names it
    samples = [Sample(list(range(1, n + 1)), [-100] * 2 + list(range(10, 8 + n)), teacher=t)
               for n, t in ((9, 0), (7, 1), (8, 0), (6, 1))]
    with SyncDetector() as syncs:
        batch = collate(samples, 0, teachers=(False, False)).to(device)
        h_s = torch.randn(batch.trainable_tokens, HS, device=device).requires_grad_()
        w_s = torch.randn(V, HS, device=device).requires_grad_()
        heads = [Head(torch.randn(V, HT, device=device), None) for _ in range(2)]
        hidden = [torch.randn(r.count, HT, device=device) for r in batch.routes]

        def step():
            parts = [Part(t, r.rows, LiveTargets(hidden[t], heads[t]), {}) for t, r in enumerate(batch.routes)]
            loss, metrics = RoutedTargets(parts, 2).scored(
                lambda h, labels, spec, targets: loss_against(h, w_s, labels, spec, V, targets),
                h_s, batch.target_ids, LossSpec())
            loss.backward()
            return summed(loss, metrics)

        step()
        with syncs.counting():
            step()
    assert not syncs.events, syncs.report()
