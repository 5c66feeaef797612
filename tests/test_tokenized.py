"""The tokenized cache: built once per node, equal sample for sample to the records it came from, keyed by what
changes tokens, and bad rows still named by file and line."""

import json
import os

import pytest
import torch

from fsdp_kd.config import TrainConfig, token_settings
from fsdp_kd.tokenizer_compat import load_tokenizer
from fsdp_kd.records import DataError, read_records, record_to_sample
from fsdp_kd.testing.tiny import write_jsonl
from fsdp_kd.tokenized import open_tokenized, sample_from_spans, spans_of

from assets import real_asset
from conftest import qa_records


def _cfg(tmp_path, **kw):
    return TrainConfig(pretrain="x", dataset="x.jsonl", kd_coef=0.0, data_cache_dir=str(tmp_path / "cache"), **kw)


def _open(path, cfg, tok, max_samples=None):
    return open_tokenized(str(path), "train", max_samples, token_settings(cfg), cfg.data_cache_dir, tok, local_rank=0,
                          log=lambda *a: None)


def test_cached_samples_equal_the_records_and_a_second_open_reuses_them(tmp_path):
    """3,000 GSM8K records through the Qwen2.5 chat template, tokenized by 2 worker processes: every sample equals
    `record_to_sample` on its record, in order; opening again reads the same table without building."""
    tok = load_tokenizer(str(real_asset("tok_qwen2.5_instruct")), False)
    gsm8k = real_asset("gsm8k/train.jsonl")
    cfg = _cfg(tmp_path, input_key="question", output_key="answer", apply_chat_template=True, max_len=256)
    table = _open(gsm8k, cfg, tok, max_samples=3000)
    records = list(read_records(str(gsm8k)))[:3000]
    assert len(table) == 3000 and table.stats.truncated > 0
    for i, (record, where) in enumerate(records):
        assert table[i] == record_to_sample(record, token_settings(cfg), tok, where)[0], where
    assert [int(n) for n in table.lengths[:5]] == [len(table[i].input_ids) for i in range(5)]
    again = _open(gsm8k, cfg, tok, max_samples=3000)
    assert again.directory == table.directory and again.meta == table.meta
    assert len(os.listdir(tmp_path / "cache")) == 1  # no work directory left behind


def test_what_changes_tokens_changes_the_cache(tmp_path, tiny):
    tok = load_tokenizer(tiny["tok"], False)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input": "ab" * k, "output": "CD"}) + "\n" for k in range(1, 30)))
    base = _open(data, _cfg(tmp_path), tok)
    assert _open(data, _cfg(tmp_path, max_len=8), tok).directory != base.directory
    assert _open(data, _cfg(tmp_path, input_template="Q: {}"), tok).directory != base.directory
    data.write_text(data.read_text() + json.dumps({"input": "x", "output": "Y"}) + "\n")
    changed = _open(data, _cfg(tmp_path), tok)
    assert changed.directory != base.directory and len(changed) == len(base) + 1
    assert changed.samples_sha256 != base.samples_sha256


def test_a_bad_row_past_the_first_records_is_named_and_nothing_is_cached(tmp_path, tiny):
    tok = load_tokenizer(tiny["tok"], False)
    lines = [json.dumps({"input": "ab", "output": "CD"})] * 99 + ['{"input": "ab", "answer": "CD"}']
    data = tmp_path / "late.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"late\.jsonl:100: missing key 'output'"):
        _open(data, _cfg(tmp_path), tok)
    assert os.listdir(tmp_path / "cache") == []
    table = _open(data, _cfg(tmp_path, skip_bad_rows=True), tok)
    assert len(table) == 99 and table.stats.dropped == {"bad rows": 1}


def test_conversations_are_found_by_their_shape(tmp_path, chat_bpe_tok):
    """ShareGPT records (FastChat's layout: 1 to 3 human/gpt exchanges) train with the chat template without naming
    `conversations` as input_key."""
    tok = load_tokenizer(chat_bpe_tok, False)
    path = tmp_path / "sharegpt.json"
    chats = [{"id": f"c{i}", "conversations": [{"from": role, "value": f"{r['question']} {role} {turn}"}
                                               for turn in range(1 + i % 3) for role in ("human", "gpt")]}
             for i, r in enumerate(qa_records(20, seed=3))]
    path.write_text(json.dumps(chats))
    table = _open(path, _cfg(tmp_path, apply_chat_template=True, max_len=1024), tok)
    named = _cfg(tmp_path, apply_chat_template=True, max_len=1024, input_key="conversations")
    records = list(read_records(str(path)))
    assert len(table) == len(records) == 20
    for i, (record, where) in enumerate(records):
        assert table[i] == record_to_sample(record, token_settings(named), tok, where)[0]


def test_spans_round_trip():
    from fsdp_kd.records import sample_from_mask

    ids = list(range(10, 22))
    sample = sample_from_mask(ids, [False, False, True, True, False, True, True, True, False, False, True, True])
    assert sample_from_spans(ids, spans_of(sample)) == sample


@pytest.mark.parametrize("packed", [False, True])
def test_micro_batches_from_the_cache_equal_those_from_the_records(tmp_path, packed, chat_bpe_tok):
    """The same samples give the same tensors (ids, mask, targets, trained rows, packing layout), so the loss and
    gradients computed from the cache are those computed from the records."""
    from fsdp_kd.data import collate, collate_packed

    tok = load_tokenizer(chat_bpe_tok, False)
    data = tmp_path / "qa.jsonl"
    write_jsonl(str(data), qa_records(24))
    cfg = _cfg(tmp_path, input_key="question", output_key="answer", apply_chat_template=True, max_len=128)
    table = _open(data, cfg, tok)
    direct = [record_to_sample(r, token_settings(cfg), tok, w)[0] for r, w in read_records(str(data))]
    assert table.stats.truncated > 0 and len({len(s.input_ids) for s in direct}) > 12  # cut and uneven lengths
    pad = tok.pad_token_id
    for start in range(0, 24, 6):
        cached = [table[i] for i in range(start, start + 6)]
        a = collate_packed(cached, 128, pad) if packed else collate(cached, pad)
        b = collate_packed(direct[start:start + 6], 128, pad) if packed else collate(direct[start:start + 6], pad)
        for name in ("input_ids", "attention_mask", "targets", "target_rows", "target_ids", "segment_ids",
                     "position_ids"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), name
