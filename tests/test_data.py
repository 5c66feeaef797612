"""Tokenization, the shifted response mask, truncation, rank sharding and bad-row messages."""

import json

import pytest
import torch

from fsdp_kd.config import TrainConfig, token_settings
from fsdp_kd.data import EpochOrder, StepSampler, collate, eval_shards
from fsdp_kd.tokenizer_compat import load_tokenizer
from fsdp_kd.records import IGNORE_INDEX, DataError, make_sample, record_to_sample, tokenize_pair, truncate
from fsdp_kd.tokenized import open_tokenized

from assets import real_asset


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


def load_samples(path, cfg, tok, tmp_path, max_samples=None):
    """(samples, stats) of a source through the real path: tokenized into a cache under tmp_path, read back."""
    cfg.data_cache_dir = str(tmp_path / "tokenized")
    table = open_tokenized(str(path), "train", max_samples, token_settings(cfg), cfg.data_cache_dir, tok, local_rank=0,
                           log=lambda *a: None)
    return [table[i] for i in range(len(table))], table.stats


@pytest.mark.parametrize("name,end_of_turn", [("tok_qwen2.5_instruct", "<|im_end|>"),
                                              ("tok_phi3_mini_instruct", "<|end|>"),
                                              ("tok_smollm_360m_instruct", "<|im_end|>")])
def test_chat_template_mask_covers_exactly_the_assistant_turn(name, end_of_turn):
    tok = load_tokenizer(str(real_asset(name)), trust_remote_code=False)
    response = "The answer is 42."
    settings = token_settings(_cfg(apply_chat_template=True))
    prompt_ids, response_ids = tokenize_pair("What is 6*7?", response, settings, tok, "t")
    trained = tok.decode(response_ids)
    assert trained.startswith(response)
    assert end_of_turn in trained  # the end-of-turn token is trained, even where it differs from EOS (Phi-3)
    assert response not in tok.decode(prompt_ids)
    rendered = tok.apply_chat_template([{"role": "user", "content": "What is 6*7?"},
                                        {"role": "assistant", "content": response}], tokenize=False)
    assert prompt_ids + response_ids == tok(rendered, add_special_tokens=False)["input_ids"]


def test_input_template_and_eos(tiny):
    tok = load_tokenizer(tiny["tok"], False)
    prompt_ids, response_ids = tokenize_pair("ab", "CD", token_settings(_cfg(input_template="Q: {}\nA: ")), tok, "t")
    assert tok.decode(prompt_ids) == "Q: ab\nA: " and response_ids[-1] == tok.eos_token_id


def test_sampler_ranks_are_disjoint_and_cover_the_global_batch():
    cfg = _cfg(train_batch_size=8, micro_train_batch_size=2)
    order = EpochOrder([40], None, cfg.seed, batch_size=cfg.train_batch_size)
    ranks = [StepSampler(order, cfg.micro_train_batch_size, r, 2, accumulation=2) for r in range(2)]
    for step in range(ranks[0].steps_per_epoch):
        parts = [sum(s.indices(0, step), []) for s in ranks]
        assert not set(parts[0]) & set(parts[1])
        single = sum(StepSampler(order, cfg.micro_train_batch_size, 0, 1, accumulation=4).indices(0, step), [])
        assert parts[0] + parts[1] == single  # same samples whatever the split
    assert ranks[0].indices(0, 0) == ranks[0].indices(0, 0)
    assert ranks[0].indices(0, 0) != ranks[0].indices(1, 0)


def test_eval_shards_are_padded_with_masked_copies(tiny):
    samples = [make_sample([1, 2], [3, 4]) for _ in range(5)]
    per_rank = [[collate(b, pad_id=0) for b in eval_shards(samples, 2, r, 2)] for r in range(2)]
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
        load_samples(path, _cfg(), load_tokenizer(tiny["tok"], False), tmp_path)


def test_samples_without_a_trainable_token_are_dropped_and_counted(tiny, tmp_path):
    path = _write(tmp_path, [json.dumps({"input": "a" * 40, "output": "B"}), json.dumps({"input": "a", "output": "B"})])
    samples, stats = load_samples(path, _cfg(max_len=2), load_tokenizer(tiny["tok"], False), tmp_path)
    assert stats.read == 2 and stats.kept == 2 and stats.truncated == 2
    assert all(s.trainable_tokens >= 1 for s in samples)


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "It is 4."}]


def _trained_text(tok, sample):
    """The trained tokens, decoded span by span."""
    spans, current = [], []
    for i, t in enumerate(sample.targets):
        if t != IGNORE_INDEX:
            current.append(t)
        elif current:
            spans.append(tok.decode(current))
            current = []
    return spans + ([tok.decode(current)] if current else [])


@pytest.mark.parametrize("name,end_of_turn", [("tok_qwen2.5_instruct", "<|im_end|>"),
                                              ("tok_phi3_mini_instruct", "<|end|>"),
                                              ("tok_smollm_360m_instruct", "<|im_end|>")])
@pytest.mark.parametrize("multiturn", [True, False])
def test_multiturn_masks_cover_each_assistant_turn_and_nothing_else(name, end_of_turn, multiturn):
    tok = load_tokenizer(str(real_asset(name)), False)
    cfg = _cfg(apply_chat_template=True, multiturn=multiturn, input_key="messages")
    sample, cut = record_to_sample({"messages": CONVERSATION}, token_settings(cfg), tok, "t")
    spans = _trained_text(tok, sample)
    expected = ["Hello! How can I help?", "It is 4."] if multiturn else ["It is 4."]
    assert len(spans) == len(expected) and not cut
    for span, content in zip(spans, expected):
        assert span.startswith(content) and end_of_turn in span
        assert "2+2" not in span and "Be brief" not in span and "Hi there" not in span


@pytest.mark.parametrize("multiturn", [True, False])
def test_a_long_conversation_is_cut_from_its_start_and_keeps_its_final_turn(chat_bpe_tok, multiturn):
    """Truncation keeps what is trained, as a prompt/response keeps its response: the earliest turns go, the final
    assistant turn stays whole and trained, and in multiturn the turns that still fit stay trained too."""
    tok = load_tokenizer(chat_bpe_tok, False)
    turns = [("how many apples does one day sell", "three apples and then two pears so five"),
             ("what is the total each week", "the total is seven apples every week"),
             ("and how much more than one day", "two more apples than one day so the answer is nine")]
    messages = [{"role": r, "content": c} for q, a in turns for r, c in (("user", q), ("assistant", a))]
    cfg = _cfg(apply_chat_template=True, multiturn=multiturn, input_key="messages")
    whole, cut = record_to_sample({"messages": messages}, token_settings(cfg), tok, "t")
    assert not cut
    first_trained = next(i for i, t in enumerate(whole.targets) if t != IGNORE_INDEX)
    assert first_trained > 10  # the first user turn is more than 10 tokens
    cfg.max_len = len(whole.input_ids) - 10
    sample, cut = record_to_sample({"messages": messages}, token_settings(cfg), tok, "t")
    spans = _trained_text(tok, sample)
    assert cut and sample.input_ids == whole.input_ids[10:]  # the earliest tokens went
    assert spans[-1].startswith(turns[-1][1] + "<|im_end|>")
    assert spans == (_trained_text(tok, whole) if multiturn else [spans[-1]])
    # a final turn longer than max_len keeps its start, after at least half of max_len of what precedes it
    cfg.max_len = 8
    sample, cut = record_to_sample({"messages": messages}, token_settings(cfg), tok, "t")
    assert cut and len(sample.input_ids) == 8 and sample.targets[3:7] == sample.input_ids[4:8]
    assert _trained_text(tok, whole)[-1].startswith(_trained_text(tok, sample)[0])


def test_sharegpt_layout_from_real_data_trains_every_gpt_turn():
    from fsdp_kd.records import read_records

    tok = load_tokenizer(str(real_asset("tok_qwen2.5_instruct")), False)
    cfg = _cfg(apply_chat_template=True, multiturn=True, input_key="conversations", max_len=4096)
    for record, where in list(read_records(str(real_asset("fastchat/dummy_conversation.json"))))[:20]:
        sample, _ = record_to_sample(record, token_settings(cfg), tok, where)
        gpt_turns = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
        spans = _trained_text(tok, sample)
        assert len(spans) == len(gpt_turns), where
        for span, turn in zip(spans, gpt_turns):
            assert span.startswith(turn.strip()[:20]), where


def test_alpaca_layout_from_real_data(tmp_path):
    from fsdp_kd.records import read_records

    tok = load_tokenizer(str(real_asset("tok_smollm_360m_instruct")), False)
    cfg = _cfg(apply_chat_template=True)
    records = list(read_records(str(real_asset("llamafactory/alpaca_en_demo.json"))))
    with_input = next((r, w) for r, w in records if r["input"].strip())
    sample, _ = record_to_sample(with_input[0], token_settings(cfg), tok, with_input[1])
    prompt_text = tok.decode([t for t, y in zip(sample.input_ids, [IGNORE_INDEX] + sample.targets[:-1])
                              if y == IGNORE_INDEX])
    assert with_input[0]["instruction"][:30] in prompt_text and with_input[0]["input"][:30] in prompt_text
    assert _trained_text(tok, sample)[0].startswith(with_input[0]["output"][:30])


def test_pretrain_mode_trains_every_token(tiny):
    sample, _ = record_to_sample({"input": "abcdef"}, token_settings(_cfg(pretrain_mode=True)),
                                 load_tokenizer(tiny["tok"], False), "t")
    assert sample.trainable_tokens == len(sample.input_ids) - 1


def test_skip_bad_rows_counts_them(tiny, tmp_path):
    path = _write(tmp_path, ['{"input": "ab", "output": "CD"}', '{"input": "ab"}', '{"input": "a", "output": 3}'])
    samples, stats = load_samples(path, _cfg(skip_bad_rows=True), load_tokenizer(tiny["tok"], False), tmp_path)
    assert len(samples) == 1 and stats.dropped == {"bad rows": 2}
    assert "bad.jsonl:2: missing key 'output'" in stats.summary("train")


def test_one_source_epoch_is_a_seeded_permutation():
    order = EpochOrder([50], None, seed=7, batch_size=10)
    for epoch in range(3):
        assert order(epoch).tolist() == torch.randperm(50, generator=torch.Generator().manual_seed(7 + epoch)).tolist()


def test_mixing_follows_the_weights_and_drops_nothing():
    """0.9/0.1 over 100 and 10,000 samples: an epoch is 10,100 draws, 9,090 from the small source (90.9 passes) and
    1,010 from the large one, interleaved; the large source's draws continue from epoch to epoch, so ten epochs
    read all of it, and only their last 100 draws start its second pass."""
    order = EpochOrder([100, 10_000], [0.9, 0.1], seed=0, batch_size=100)
    assert order.length == 10_100 and order.draws == [9090, 1010]
    seen_large = []
    for epoch in range(10):
        indices = order(epoch)
        from_large = indices >= 100
        assert int(from_large.sum()) == 1010
        for part in indices.chunk(10):  # interleaved: every tenth of the epoch has about a tenth of the draws
            share = float((part >= 100).float().mean())
            assert abs(share - 0.1) < 4 * (0.1 * 0.9 / len(part)) ** 0.5
        small = indices[~from_large]
        assert torch.bincount(small, minlength=100).min() >= 90  # whole passes: each sample 90 or 91 times
        seen_large += indices[from_large].tolist()
    assert set(seen_large) == set(range(100, 10_100)) and len(set(seen_large[:10_000])) == 10_000
    assert order.describe(["a", "b"])[1] == "b: 10000 samples, 1010 per epoch (0.10 passes, weight 0.1)"


def test_mixing_trains_every_draw_so_each_pass_covers_its_source_once():
    """Two sources and a global batch that does not divide the epoch: what the steps train of each source, read in
    order across epochs, is whole passes (each sample exactly once per pass), so no draw is taken from a source's
    stream and then left untrained. The order of an epoch does not depend on which epochs were asked for before."""
    cfg = _cfg(train_batch_size=6, micro_train_batch_size=2)
    sizes = [7, 13]
    order = EpochOrder(sizes, [0.3, 0.7], seed=3, batch_size=6)
    sampler = StepSampler(order, cfg.micro_train_batch_size, 0, 1, accumulation=3)
    trained = [[], []]
    for epoch in range(12):
        for step in range(sampler.steps_per_epoch):
            for i in sum(sampler.indices(epoch, step), []):
                trained[int(i >= sizes[0])].append(i - sizes[0] * (i >= sizes[0]))
    for size, seen in zip(sizes, trained):
        passes = len(seen) // size
        assert passes >= 4, "too few draws to test whole passes"
        for p in range(passes):
            assert sorted(seen[p * size:(p + 1) * size]) == list(range(size)), f"pass {p} of a {size}-sample source"
    assert torch.equal(EpochOrder(sizes, [0.3, 0.7], seed=3, batch_size=6)(11), order(11))


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_packed_logits_equal_unpacked_logits(tiny, attn):
    """sdpa and eager isolate packed samples with a block mask; flex attention (like flash attention) reads the
    boundaries off the restarting position_ids, with no mask."""
    import torch
    from transformers import AutoModelForCausalLM

    from fsdp_kd.data import collate_packed, pack
    from fsdp_kd.distill import hidden_at_targets

    lm = AutoModelForCausalLM.from_pretrained(tiny["student"], attn_implementation=attn).eval()
    g = torch.Generator().manual_seed(0)
    samples = [make_sample(torch.randint(3, 70, (p,), generator=g).tolist(), torch.randint(3, 70, (r,), generator=g).tolist())
               for p, r in ((3, 5), (7, 2), (2, 9), (4, 4), (6, 3))]
    with torch.no_grad():
        packed = hidden_at_targets(lm, collate_packed(samples, 24, pad_id=0))
        order = [s for row in pack(samples, 24) for s in row]
        separate = hidden_at_targets(lm, collate(order, pad_id=0))  # one sample per row, right-padded
        unisolated = collate_packed(samples, 24, pad_id=0)
        unisolated.segment_ids, unisolated.position_ids = None, None  # a plain padding mask: samples see each other
        leaked = hidden_at_targets(lm, unisolated)
    assert collate_packed(samples, 24, pad_id=0).input_ids.shape[0] < len(samples)
    assert torch.allclose(packed, separate, atol=1e-5)
    assert not torch.allclose(leaked, separate, atol=1e-3)


@pytest.mark.parametrize("attn", ["flash_attention_2", "flash_attention_3", "flex_attention"])
def test_varlen_attention_gets_restarting_positions_and_no_mask(attn):
    """HF's flash-attention path expects no 4-D mask; it finds the packed samples from position_ids restarting at 0.
    (The packed = unpacked check for flash attention itself needs a GPU.)"""
    from fsdp_kd.data import collate_packed

    samples = [make_sample([5, 6, 7], [8, 9]), make_sample([10, 11], [12, 13, 14, 15])]
    batch = collate_packed(samples, 16, pad_id=0)
    inputs = batch.model_inputs(attn, torch.bfloat16)
    assert "attention_mask" not in inputs
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]]  # longest sample first


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_sliding_window_model_keeps_its_window_padded_and_packed(attn, tmp_path):
    """A 4-D mask is taken as it is, so a model with sliding-window layers must not get one: padded and packed
    batches give each sample's own forward, window included, at sequences longer than the window."""
    from transformers import MistralConfig, MistralForCausalLM

    from fsdp_kd.data import collate_packed, pack, uses_sliding_window
    from fsdp_kd.distill import hidden_at_targets

    config = MistralConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4, attn_implementation=attn)
    torch.manual_seed(0)
    lm = MistralForCausalLM(config).eval()
    assert uses_sliding_window(lm.config)
    g = torch.Generator().manual_seed(1)
    samples = [make_sample(torch.randint(3, 70, (p,), generator=g).tolist(),
                           torch.randint(3, 70, (r,), generator=g).tolist()) for p, r in ((3, 9), (2, 5), (4, 6))]
    with torch.no_grad():
        alone = torch.cat([hidden_at_targets(lm, collate([s], pad_id=0)) for s in samples])
        padded = hidden_at_targets(lm, collate(samples, pad_id=0))
        order = [s for row in pack(samples, 24) for s in row]
        packed = hidden_at_targets(lm, collate_packed(samples, 24, pad_id=0))
        packed_alone = torch.cat([hidden_at_targets(lm, collate([s], pad_id=0)) for s in order])
    assert torch.allclose(padded, alone, atol=1e-5)
    assert torch.allclose(packed, packed_alone, atol=1e-5)
    windowless = collate(samples, pad_id=0).model_inputs(attn, torch.float32)  # what a full-attention model gets
    with torch.no_grad():
        leaked = lm.model(**windowless).last_hidden_state
    assert not torch.allclose(leaked.flatten(0, 1).index_select(0, collate(samples, pad_id=0).target_rows), alone,
                              atol=1e-3)


def test_sdpa_and_eager_get_a_block_mask():
    from fsdp_kd.data import collate_packed

    samples = [make_sample([5, 6, 7], [8, 9]), make_sample([10, 11], [12, 13, 14, 15])]
    batch = collate_packed(samples, 16, pad_id=0)
    for attn in ("sdpa", "eager"):
        mask = batch.model_inputs(attn, torch.float32)["attention_mask"]
        assert mask.dim() == 4 and mask.shape[-1] == 11


def test_parquet_csv_and_directory_sources(tiny, tmp_path):
    import datasets

    records = [{"input": "ab", "output": "CD"}, {"input": "abc", "output": "EF"}]
    folder = tmp_path / "mixed"
    folder.mkdir()
    datasets.Dataset.from_list(records).to_parquet(str(folder / "part1.parquet"))
    datasets.Dataset.from_list(records).to_csv(str(folder / "part2.csv"))
    tok = load_tokenizer(tiny["tok"], False)
    for path, expected in ((folder / "part1.parquet", 2), (folder / "part2.csv", 2), (folder, 4)):
        samples, stats = load_samples(path, _cfg(), tok, tmp_path)
        assert len(samples) == expected and stats.kept == expected


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_data_that_is_not_utf8_names_the_file_and_line(tmp_path, suffix):
    from fsdp_kd.records import read_records

    path = tmp_path / f"data{suffix}"
    good = b'{"input": "ab", "output": "cd"}'
    body = good + b"\n" + b'{"input": "\xff", "output": "x"}\n' if suffix == ".jsonl" else b"[" + good + b', "\xff"]'
    path.write_bytes(body)
    where = f"{path}:2" if suffix == ".jsonl" else str(path)
    with pytest.raises(DataError, match=rf"^{where}: not UTF-8 text \(byte 0xff at offset \d+\); re-save"):
        list(read_records(str(path)))


@pytest.mark.parametrize("name", ["tok_qwen2.5_instruct", "tok_phi3_mini_instruct", "tok_smollm_360m_instruct"])
def test_one_rendering_chat_masks_equal_the_prefix_definition(name):
    """Real multi-turn data (ShareGPT chats, tool calls with function/observation turns, a system prompt) under
    three real chat templates, every assistant turn and the last only."""
    from fsdp_kd.records import _conversation, chat_token_mask, read_records
    from fsdp_kd.testing.reference import prefix_chat_token_mask

    tok = load_tokenizer(str(real_asset(name)), False)
    conversations = []
    for source in ("fastchat/dummy_conversation.json", "llamafactory/glaive_toolcall_en_demo.json"):
        for record, where in list(read_records(str(real_asset(source))))[:25]:
            conversations.append(_conversation(record["conversations"], "conversations", where))
    conversations.append(CONVERSATION)
    for messages in conversations:
        for all_turns in (True, False):
            assert chat_token_mask(messages, tok, all_turns, "t") == prefix_chat_token_mask(messages, tok, all_turns)


def test_a_source_left_empty_by_the_holdout_is_one_line(tiny, tmp_path):
    """Mixing divides by each source's size: a source that eval_holdout_ratio empties is refused, not a
    ZeroDivisionError."""
    from types import SimpleNamespace

    from fsdp_kd.errors import ConfigError
    from fsdp_kd.preflight import data_spec, open_training_data
    from fsdp_kd.testing.tiny import write_jsonl

    big, single = tmp_path / "big.jsonl", tmp_path / "single.jsonl"
    write_jsonl(big, [{"input": "ab:", "output": "CD"}] * 8)
    write_jsonl(single, [{"input": "ab:", "output": "CD"}])
    cfg = TrainConfig(pretrain="x", dataset=f"{big},{single}", dataset_probs="0.5,0.5", kd_coef=0.0,
                      eval_holdout_ratio=0.5, train_batch_size=2, data_cache_dir=str(tmp_path / "tokenized"))
    tok = load_tokenizer(tiny["tok"], False)
    with pytest.raises(ConfigError, match=f"{single} has no training sample left after eval_holdout_ratio"):
        open_training_data(data_spec(cfg), SimpleNamespace(local_rank=0), tok, log=lambda *a: None)
