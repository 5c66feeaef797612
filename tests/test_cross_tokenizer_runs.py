"""Training with a teacher of another tokenizer (`cross_tokenizer: true`): the data's stored alignment laid out per
micro-batch, the run end to end under torchrun, and its refusals. The tokenizers are the demo's character tokenizer
(the teacher's) and the same characters plus letter pairs (the student's), so no asset is needed."""

import numpy as np
import pytest
import torch

from conftest import REPO, python_run, read_metrics, torchrun, train_args
from fsdp_kd.config import parse_config
from fsdp_kd.errors import ConfigError
from fsdp_kd.cross_tokenizer import LEFT_OUT, TeacherTokenization, TokenBytes
from fsdp_kd.data import collate, collate_packed
from fsdp_kd.records import IGNORE_INDEX, Sample

TRAIN = str(REPO / "train.py")
WORKER = str(REPO / "tests" / "dist_worker.py")
def _samples(student_tok, teacher_tok, texts, prompt_chars=4):
    """Samples as the data pipeline builds them: the student's ids, targets after the prompt, and the teacher's
    columns read back into positions."""
    retokenize = TeacherTokenization(TokenBytes.of(student_tok), TokenBytes.of(teacher_tok), teacher_tok)
    out = []
    for text in texts:
        ids = student_tok(text)["input_ids"] + [student_tok.eos_token_id]
        prompt = len(student_tok(text[:prompt_chars])["input_ids"])
        targets = [IGNORE_INDEX] * (prompt - 1) + ids[prompt:] + [IGNORE_INDEX]
        out.append(Sample(ids, targets, **retokenize.fields(ids)))
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_the_teacher_rows_follow_the_students_target_rows(tiny, pair_student, packed):
    """For each of the student's target rows, in its order, the teacher row predicts a token that spells what the
    student's target spells (where `aligned`), and sees only its own sample's tokens (its segment), packed or not."""
    from transformers import AutoTokenizer

    s_tok, t_tok = AutoTokenizer.from_pretrained(pair_student), AutoTokenizer.from_pretrained(tiny["tok"])
    samples = _samples(s_tok, t_tok, ["abcd:ABCDEF", "hgfe:GHA", "abab:CDCDCDAB", "x:Q", "cdcd:EFGHABCDA"])
    batch = collate_packed(samples, 40, 0) if packed else collate(samples, 0)
    teacher, n = batch.teacher, batch.target_rows.shape[0]
    assert teacher.target_rows.shape[0] == n + batch.spans.teacher_rows and batch.aligned.shape[0] == n
    t_flat = teacher.input_ids.flatten()
    assert 0.3 < float(batch.aligned.mean()) < 1.0  # pairs make some groups two-to-one: the span term there
    s_seg, t_seg = batch._segments().flatten(), teacher._segments().flatten()
    spans = batch.spans
    assert len(spans.first_row) > 0
    in_span = torch.zeros(n, dtype=torch.bool)
    in_span[spans.rows] = True
    assert not bool((in_span & (batch.aligned > 0)).any())  # a row is in a group of several or one to one
    for g, first in enumerate(spans.first_row):  # each group: the same text on both sides, in the same sample
        s_rows = spans.rows[spans.offsets[g]:spans.offsets[g + 1]]
        t_rows = teacher.target_rows[n + spans.teacher_offsets[g]:n + spans.teacher_offsets[g + 1]]
        t_labels = teacher.target_ids[n + spans.teacher_offsets[g]:n + spans.teacher_offsets[g + 1]]
        assert int(s_rows[0]) == first and torch.equal(s_rows, torch.arange(first, first + len(s_rows)))
        assert len(s_rows) > 1 or len(t_rows) > 1
        s_text = "".join(s_tok.convert_ids_to_tokens(batch.target_ids[s_rows].tolist()))
        assert s_text == "".join(t_tok.convert_ids_to_tokens(t_labels.tolist()))
        assert torch.equal(t_flat[t_rows + 1], t_labels)
        assert {int(s_seg[batch.target_rows[r]]) for r in s_rows} == {int(t_seg[r]) for r in t_rows}
    for s_row, t_row, label, t_label, aligned in zip(batch.target_rows, teacher.target_rows, batch.target_ids,
                                                     teacher.target_ids, batch.aligned):
        if aligned:
            assert s_tok.convert_ids_to_tokens(int(label)) == t_tok.convert_ids_to_tokens(int(t_label))
            assert int(t_flat[t_row + 1]) == int(t_label)
            assert int(s_seg[s_row]) == int(t_seg[t_row])
            s_row_start = int(s_row) // batch.input_ids.shape[1]
            assert s_row_start == int(t_row) // teacher.input_ids.shape[1]  # the same row of the layout


def test_the_same_tokenizer_across_the_alignment_is_live_kd(tiny, tmp_path):
    """cross_tokenizer with the student's own tokenizer: every position aligns and every token is shared, so one
    step's gradients and loss equal the plain live run's (2 ranks, micro-batch 1, 6 samples per rank)."""
    flags = dict(train_batch_size=12, micro_train_batch_size=1, kd_coef=0.8, kd_loss="jsd")
    live = _grads(tiny, tmp_path, "live", **flags)
    cross = _grads(tiny, tmp_path, "cross", cross_tokenizer="true", **flags)
    assert cross["metrics"]["loss"] == pytest.approx(live["metrics"]["loss"], rel=1e-5)
    assert cross["metrics"]["kl_shared_buckets"] == pytest.approx(live["metrics"]["kl"], rel=1e-4)  # the cross path
    assert cross["metrics"]["kd_token_share"] == live["metrics"]["kd_token_share"] == 1.0
    assert live["grads"].keys() == cross["grads"].keys() and live["grads"]
    for name, g in live["grads"].items():
        assert float((cross["grads"][name] - g).abs().max()) <= 1e-5 * float(g.abs().max()) + 1e-9, name


def _grads(tiny, tmp_path, name, nproc=2, **flags):
    out = tmp_path / f"{name}.pt"
    torchrun([WORKER, "grads", str(out), *train_args(tiny, tmp_path / name, **flags)], nproc=nproc)
    return torch.load(out, weights_only=True)


def test_a_teacher_with_another_tokenizer_teaches_the_student(tiny, pair_student, tmp_path):
    """The pair-tokenizer student from the character-tokenizer teacher, 2 ranks, packed, with an odd eval set: the
    start-up line says what maps, the KD term falls, and the metrics are named for what they are."""
    proc = torchrun([TRAIN, *train_args(tiny, tmp_path / "out", pretrain=pair_student, cross_tokenizer="true",
                                        kd_coef=1.0, max_steps=10, learning_rate=1e-2, packing_samples="true",
                                        max_len=64, eval_dataset=tiny["eval"], eval_steps=10)])
    assert "77 tokens map exactly between the vocabularies" in proc.stdout
    assert "align one to one with a teacher token" in proc.stdout
    assert "| kl (shared tokens) " in proc.stdout  # the step lines name the metric for what it is
    lines = read_metrics(tmp_path / "out")
    train = [m for m in lines if "loss" in m]
    assert not any(m.get("skipped") for m in lines)  # every step finite and taken
    assert "kl_shared_buckets" in train[0] and "kl" not in train[0]
    for m in train:  # every trained token has a KD term (per token, or the span term's) or a reason why not, counted
        left_out = [m[f"kd_left_out_{why}"] for why in LEFT_OUT.values()]
        assert m["kd_tokens"] + m["kd_span_tokens"] + sum(left_out) == m["tokens"]
        assert m["kd_token_share"] == pytest.approx((m["kd_tokens"] + m["kd_span_tokens"]) / m["tokens"])
    assert sum(m["kd_span_tokens"] for m in train) > 0  # the pairs make some groups two to one: the span term's
    assert all(m["kd_token_share"] > m["kd_tokens"] / m["tokens"] for m in train if m["kd_span_tokens"])
    assert train[-1]["kd"] < 0.7 * train[0]["kd"]
    assert np.isfinite([m["loss"] for m in train]).all()
    assert any("eval_kl_shared_buckets" in m for m in lines)


def test_a_cache_is_refused_where_one_vocabulary_is_all_shared(tiny, pair_student, tmp_path):
    """The character teacher's every token is the pair student's too: the live loss renormalizes the student over
    the shared tokens there, which a cache's bucket loss cannot yet. The build says so in one line, before the
    teacher loads."""
    args = train_args(tiny, tmp_path / "unused", pretrain=pair_student, cross_tokenizer="true", uld_weight=0.0,
                      span_weight=0.0, teacher_cache=str(tmp_path / "cache"))
    proc = python_run(["-m", "fsdp_kd.cache_teacher", *args])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "every token of the teacher's vocabulary is in the other's" in lines[0]
    assert "loading the teacher" not in proc.stdout


def test_a_student_whose_vocabulary_the_teacher_holds_whole_trains_every_divergence(tiny, pair_student, tmp_path):
    """The roles swapped: the character student under the pair-tokenizer teacher. Every student token is shared, so
    the student has no rest bucket and the teacher's pair-token mass would make forward KL infinite; the teacher is
    renormalized over the shared tokens instead, and every step is taken (forward KL, then AKL)."""
    for kd_loss in ("forward_kl", "akl"):
        out = tmp_path / kd_loss
        torchrun([TRAIN, *train_args(tiny, out, teacher_model=pair_student, cross_tokenizer="true", kd_loss=kd_loss,
                                     kd_coef=1.0, max_steps=3)])
        lines = read_metrics(out)
        assert len(lines) == 3 and not any(m.get("skipped") for m in lines)
        assert all(np.isfinite(m["loss"]) and m["kd"] > 0 for m in lines)


def test_prefix_buckets_put_the_pair_tokens_in_their_first_characters_bucket(tiny, pair_student, tmp_path):
    """With prefix_buckets the pair student's pair tokens join their first character's bucket (neither side has
    a rest, so neither is renormalized): the start-up line says so, every step is taken and the KD term falls."""
    proc = torchrun([TRAIN, *train_args(tiny, tmp_path / "out", pretrain=pair_student, cross_tokenizer="true",
                                        prefix_buckets="true", kd_coef=1.0, max_steps=8, learning_rate=1e-2)])
    assert "(with 6 of the student's and 0 of the teacher's tokens that start with them)" in proc.stdout
    train = [m for m in read_metrics(tmp_path / "out") if "loss" in m]
    assert not any(m.get("skipped") for m in train) and np.isfinite([m["loss"] for m in train]).all()
    assert train[-1]["kd"] < 0.7 * train[0]["kd"]


@pytest.mark.parametrize("flags,message", [
    (dict(teacher_cache="/tmp/cache"), "a teacher cache across tokenizers holds the exact part only"),
    (dict(teacher_cache="/tmp/cache", uld_weight=0, cache_mode="sampled"), "set cache_mode topk"),
    (dict(teacher_cache="/tmp/cache", uld_weight=0), "holds no span term"),
    (dict(teacher_cache="/tmp/cache", uld_weight=0, span_weight=0, prefix_buckets="true"),
     "folds the teacher's tokens without a counterpart into its rest bucket"),
    (dict(span_weight=-1), "span_weight must be >= 0"),
    (dict(kd_loss="reverse_kl_student_topk"), "no counterpart in the teacher's vocabulary"),
    (dict(uld_topk=0), "uld_topk >= 1"),
])
def test_what_cross_tokenizer_refuses_before_anything_loads(flags, message):
    args = ["--pretrain", "s", "--teacher_model", "t", "--dataset", "d.jsonl", "--cross_tokenizer", "true"]
    for key, value in flags.items():
        args += [f"--{key}", str(value)]
    with pytest.raises(ConfigError, match=message):
        parse_config(args)


def test_on_policy_responses_are_re_tokenized_for_the_teacher(tiny, pair_student, tmp_path):
    """Every micro-batch on-policy (λ = 1): the student's own responses get the teacher's tokens and alignment at
    step time, and train against it (the KL on the student's text is logged, and finite)."""
    torchrun([TRAIN, *train_args(tiny, tmp_path / "out", pretrain=pair_student, cross_tokenizer="true",
                                 on_policy_ratio=1.0, generate_max_new_tokens=6, max_steps=3, kd_coef=1.0,
                                 kd_loss="reverse_kl")])
    train = [m for m in read_metrics(tmp_path / "out") if "loss" in m]
    assert not any(m.get("skipped") for m in train)  # reverse KL is finite: the student's pair tokens have no
    # teacher counterpart, so it is compared over the shared tokens, renormalized (`VocabMap.renormalized`)
    assert len(train) == 3 and all(m["on_policy_share"] == 1.0 for m in train)
    assert all(np.isfinite(m["kl_on_policy"]) and m["kl_on_policy"] > 0 for m in train)
    # the student's own responses are counted like the data's: a KD term, or a reason why not
    assert all(m["kd_tokens"] + m["kd_span_tokens"] + sum(m[f"kd_left_out_{why}"] for why in LEFT_OUT.values())
               == m["tokens"] for m in train)


def test_a_cache_across_tokenizers_trains_like_the_live_teacher_without_uld(tiny, pair_student, pair_teacher,
                                                                             tmp_path):
    """cache_teacher with cross_tokenizer stores the teacher's top-k in the student's vocabulary (k = V_t, float32:
    its unshared pair tokens folded into the rest bucket) and no distribution where a token has no aligned
    counterpart; training from it, with no teacher loaded, logs the live cross-tokenizer run's losses at uld_weight
    0, step by step and in the evaluation (2 ranks, micro-batch 1, three eval samples, reverse KL). So does a run of
    two teachers routed per record (`teacher_key`), the cache for every third record, eval ones included, the live
    teacher for the rest."""
    from fsdp_kd.testing.tiny import read_jsonl, write_jsonl

    data, eval_path = tmp_path / "train.jsonl", tmp_path / "eval3.jsonl"  # each record names its teacher
    for path, records in ((data, read_jsonl(tiny["train"])), (eval_path, read_jsonl(tiny["eval"])[:3])):
        write_jsonl(str(path), [{**r, "domain": "cached" if i % 3 == 0 else "live"} for i, r in enumerate(records)])
    common = dict(pretrain=pair_student, teacher_model=pair_teacher, cross_tokenizer="true", uld_weight=0.0,
                  span_weight=0.0, train_batch_size=6, dataset=str(data),
                  micro_train_batch_size=1, max_steps=3, eval_dataset=str(eval_path), eval_steps=3, kd_coef=0.8,
                  kd_loss="reverse_kl")
    cache = tmp_path / "cache"
    torchrun(["-m", "fsdp_kd.cache_teacher", *train_args(tiny, tmp_path / "unused", teacher_cache=str(cache),
                                                         cache_k=200, cache_log_p_dtype="float32", **common)])
    torchrun([TRAIN, *train_args(tiny, tmp_path / "live", **common)])
    torchrun([TRAIN, *train_args(tiny, tmp_path / "cached", **{**common, "teacher_model": None},
                                 teacher_cache=str(cache))])
    teachers = (f"{{cached: {{teacher_cache: {cache}, cross_tokenizer: true}}, "
                f"live: {{teacher_model: {pair_teacher}, cross_tokenizer: true}}}}")
    torchrun([TRAIN, *train_args(tiny, tmp_path / "routed", **{**common, "teacher_model": None, "cross_tokenizer": None},
                                 teachers=teachers, teacher_key="domain")])
    live, cached, routed = (read_metrics(tmp_path / run) for run in ("live", "cached", "routed"))
    assert len(live) == len(cached) == len(routed) == 4 and not any(m.get("skipped") for m in live + cached + routed)
    reasons = {f"kd_left_out_{why}" for why in LEFT_OUT.values()}
    for a, b in zip(live, routed):  # every figure the two runs both log (the teachers' own ones are by name)
        prefix = "eval_" if "eval_loss" in a else ""
        shared = set(a) & set(b) - {"tokens_per_sec", "peak_mem_gb"} - reasons
        assert {f"{prefix}{name}" for name in ("loss", "kd", "kl_shared_buckets", "kd_tokens")} <= shared
        for name in shared:
            assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), (name, a, b)
        assert b[f"{prefix}tokens_cached"] > 0 and b[f"{prefix}tokens_live"] > 0
        if not prefix:  # the reasons are the live teacher's rows' (a cache keeps none: its rows are just untaught)
            assert sum(b[k] for k in reasons) == b["tokens_live"] - b["kd_tokens_live"]
    assert sum(m["tokens_cached"] - m["kd_tokens_cached"] for m in routed if "loss" in m) > 0
    for m in (m for m in live if "loss" in m):  # span_weight 0: the groups' tokens are left out, counted as such
        left_out = [m[f"kd_left_out_{why}"] for why in LEFT_OUT.values()]
        assert m["kd_span_tokens"] == 0 and m["kd_tokens"] + sum(left_out) == m["tokens"]
    assert sum(m["kd_left_out_multi_token_group"] for m in live if "loss" in m) > 0
    for a, b in zip(live, cached):
        for name in ("loss", "ce", "kd", "eval_loss"):
            if name in a:
                assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), (name, a, b)
        if "kl_shared_buckets" in a:  # the same quantity under the same name (the cache's teacher entropy and
            # top-1 are over its buckets, and named so)
            assert b["kl_shared_buckets"] == pytest.approx(a["kl_shared_buckets"], rel=1e-5, abs=1e-6)
            assert "teacher_entropy_buckets_aligned" in b and "teacher_entropy_aligned" in a


def test_groups_of_several_tokens_train_the_same_on_any_split_into_ranks(tiny, pair_student, pair_teacher, tmp_path):
    """Each side has pairs of its own, so groups of several tokens fall on both sides: the span term (summed per
    group, divided by the global token count as every term) gives one step the same gradients and loss on 1, 2 and 3
    ranks and any micro-batch size, and with span_weight 0 it is gone (the loss changes)."""
    common = dict(pretrain=pair_student, teacher_model=pair_teacher, cross_tokenizer="true", train_batch_size=6,
                  kd_coef=0.8, kd_loss="jsd")
    runs = {nproc: _grads(tiny, tmp_path, f"w{nproc}", nproc, micro_train_batch_size=micro, **common)
            for nproc, micro in ((1, 2), (2, 3), (3, 1))}
    without = _grads(tiny, tmp_path, "off", 2, micro_train_batch_size=3, span_weight=0.0, **common)
    for nproc in (2, 3):
        assert runs[nproc]["metrics"]["loss"] == pytest.approx(runs[1]["metrics"]["loss"], rel=1e-5)
        for name, g in runs[1]["grads"].items():
            assert float((runs[nproc]["grads"][name] - g).abs().max()) <= 1e-5 * float(g.abs().max()) + 1e-9, name
    assert without["metrics"]["kd"] < runs[1]["metrics"]["kd"]  # the groups' D is part of the KD term

