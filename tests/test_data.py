"""Tokenization, the shifted response mask, truncation, rank sharding and bad-row messages."""

import json

import pytest

from fsdp_kd.config import TrainConfig
from fsdp_kd.data import (IGNORE_INDEX, DataError, StepSampler, eval_batches, load_sft_dataset, make_sample,
                          tokenize_pair, truncate)
from fsdp_kd.models import load_tokenizer

from conftest import REALDATA


def test_targets_are_the_next_response_token_only():
    sample = make_sample([10, 11, 12], [20, 21, 22])
    assert sample.input_ids == [10, 11, 12, 20, 21, 22]
    # position 2 (last prompt token) predicts 20; the final position predicts nothing
    assert sample.targets == [IGNORE_INDEX, IGNORE_INDEX, 20, 21, 22, IGNORE_INDEX]


def test_truncation_keeps_prompt_end_and_response_start():
    prompt, response, cut = truncate(list(range(10)), list(range(100, 110)), 12)
    assert cut and prompt == list(range(4, 10)) and response == list(range(100, 106))
    prompt, response, cut = truncate([1, 2], list(range(100, 120)), 8)
    assert prompt == [1, 2] and response == list(range(100, 106))
    assert truncate([1], [2], 8) == ([1], [2], False)


def _cfg(**kw):
    return TrainConfig(pretrain="x", dataset="x.jsonl", kd_coef=0.0, **kw)


@pytest.mark.parametrize("name,end_of_turn", [("tok_qwen2.5_instruct", "<|im_end|>"),
                                              ("tok_phi3_mini_instruct", "<|end|>"),
                                              ("tok_smollm_360m_instruct", "<|im_end|>")])
def test_chat_template_mask_covers_exactly_the_assistant_turn(name, end_of_turn):
    tok = load_tokenizer(str(REALDATA / name), trust_remote_code=False)
    response = "The answer is 42."
    prompt_ids, response_ids = tokenize_pair("What is 6*7?", response, _cfg(apply_chat_template=True), tok, "t")
    trained = tok.decode(response_ids)
    assert trained.startswith(response)
    assert end_of_turn in trained  # the end-of-turn token is trained, even where it differs from EOS (Phi-3)
    assert response not in tok.decode(prompt_ids)
    rendered = tok.apply_chat_template([{"role": "user", "content": "What is 6*7?"},
                                        {"role": "assistant", "content": response}], tokenize=False)
    assert prompt_ids + response_ids == tok(rendered, add_special_tokens=False)["input_ids"]


def test_input_template_and_eos(tiny):
    tok = load_tokenizer(tiny["tok"], False)
    prompt_ids, response_ids = tokenize_pair("ab", "CD", _cfg(input_template="Q: {}\nA: "), tok, "t")
    assert tok.decode(prompt_ids) == "Q: ab\nA: " and response_ids[-1] == tok.eos_token_id


def test_sampler_ranks_are_disjoint_and_cover_the_global_batch():
    cfg = _cfg(train_batch_size=8, micro_train_batch_size=2)
    ranks = [StepSampler(40, cfg, r, 2, accumulation=2) for r in range(2)]
    for step in range(ranks[0].steps_per_epoch):
        parts = [sum(s.indices(0, step), []) for s in ranks]
        assert not set(parts[0]) & set(parts[1])
        single = sum(StepSampler(40, cfg, 0, 1, accumulation=4).indices(0, step), [])
        assert parts[0] + parts[1] == single  # same samples whatever the split
    assert ranks[0].indices(0, 0) == ranks[0].indices(0, 0)
    assert ranks[0].indices(0, 0) != ranks[0].indices(1, 0)


def test_eval_shards_are_padded_with_masked_copies(tiny):
    samples = [make_sample([1, 2], [3, 4]) for _ in range(5)]
    per_rank = [eval_batches(samples, 2, r, 2, pad_id=0) for r in range(2)]
    assert [len(b) for b in per_rank] == [2, 2]
    assert sum(b.trainable_tokens for b in per_rank[0]) == 3 * 2
    assert sum(b.trainable_tokens for b in per_rank[1]) == 2 * 2  # 2 real, 1 masked stand-in


def _write(tmp_path, lines):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("line,message", [
    ('{"input": "ab"', r"bad\.jsonl:2: not valid JSON"),
    ('{"input": "ab"}', r"bad\.jsonl:2: missing key 'output'"),
    ('{"input": "ab", "output": 5}', r"bad\.jsonl:2: key 'output' must be a string, got int"),
    ('{"input": "ab", "output": "  "}', r"bad\.jsonl:2: key 'output' is empty"),
    ('["ab", "cd"]', r"bad\.jsonl:2: expected a JSON object, got list"),
])
def test_bad_rows_name_file_line_and_key(tiny, tmp_path, line, message):
    path = _write(tmp_path, ['{"input": "ab", "output": "CD"}', line])
    with pytest.raises(DataError, match=message):
        load_sft_dataset(path, _cfg(), load_tokenizer(tiny["tok"], False), None)


def test_samples_without_a_trainable_token_are_dropped_and_counted(tiny, tmp_path):
    path = _write(tmp_path, [json.dumps({"input": "a" * 40, "output": "B"}), json.dumps({"input": "a", "output": "B"})])
    samples, stats = load_sft_dataset(path, _cfg(max_len=2), load_tokenizer(tiny["tok"], False), None)
    assert stats.read == 2 and stats.kept == 2 and stats.truncated == 2
    assert all(s.trainable_tokens >= 1 for s in samples)
